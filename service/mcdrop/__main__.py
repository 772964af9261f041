"""`python -m mcdrop ...` runs the `mcdrop` command."""

import sys

from mcdrop.cli.main import main

sys.exit(main())

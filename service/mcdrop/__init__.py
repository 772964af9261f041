"""mcdrop: Monte Carlo dropout uncertainty service.

A small lazy facade: `import mcdrop` imports neither torch nor FastAPI; each name below is
imported from its module the first time it is used (`mcdrop.ServedModel`, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "ServedModel": "mcdrop.model",
    "MCEngine": "mcdrop.engine.core",
    "MCOptions": "mcdrop.engine.core",
    "Settings": "mcdrop.config",
    "create_app": "mcdrop.app",
}
__all__ = ["MCEngine", "MCOptions", "ServedModel", "Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from mcdrop.app import create_app
    from mcdrop.config import Settings
    from mcdrop.engine.core import MCEngine, MCOptions
    from mcdrop.model import ServedModel


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), so `import mcdrop` stays light."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mcdrop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""The `mcdrop` command: serve, predict, train, evaluate, models, demo (and its table reader).

The top of the import order: it may import anything of mcdrop, heavy modules lazily so that
commands that need no torch start fast.
"""

"""`python -m pixeldit_eqx ...` is the `pixeldit-eqx` command line."""

from ._cli import run


run()

"""The reference fixtures' helpers under their former module name (they live in `tests/helpers.py`)."""

from .helpers import FIXTURES as FIXTURES, load_case as load_case, MANIFEST as MANIFEST, rel_err as rel_err

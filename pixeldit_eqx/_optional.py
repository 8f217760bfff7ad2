"""Imports of optional dependencies: a missing one names the extra that installs it."""

import importlib
from types import ModuleType


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """`import module`, or an `ImportError` that says which `pixeldit-eqx[extra]` installs it.

    **Arguments:**

    - `module`: the module to import (`"optax"`, `"safetensors.numpy"`, ...).
    - `extra`: the optional extra of `pixeldit-eqx` that provides it (`"train"`, ...).
    - `needed_by`: what needs it, for the message (`"pixeldit_eqx.train"`, ...).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{needed_by} needs the optional package `{module.split('.')[0]}`, which is not installed: "
            f"install it with `pip install 'pixeldit-eqx[{extra}]'`."
        ) from e

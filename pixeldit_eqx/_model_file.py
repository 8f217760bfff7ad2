"""The model file: one self-describing PixelDiT, PixelDiTT2I or PixelDiT2 (`save_model`,
`load_model`; a line of JSON holding the variant and `model.config.to_dict()`, then the
leaves), and the file helpers the training checkpoints share with it (`pixeldit_eqx.train`
re-exports both functions)."""

import json
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from ._atomic import atomic_write, read_checksummed, write_checksummed
from ._config import build, CONFIGS
from ._custom_types import Checkpoint
from ._torch_pickle import CheckpointFormatError
from .modules import trainable


_MODEL_FORMAT = "pixeldit_eqx.model"
# Version 2 adds the checksum (`sha256`, `size`) to the header; version 1 files load unverified.
_MODEL_FORMAT_VERSION = 2


def _write(path: Any, header: dict[str, Any], write_data: Callable[[Any], None]) -> None:
    """Write a checksummed file: atomically to a path, or to an open binary file."""
    if hasattr(path, "write"):
        write_checksummed(path, header, write_data)
    else:
        with atomic_write(path) as f:
            write_checksummed(f, header, write_data)


def _where(path: Any) -> str:
    return repr(path) if isinstance(path, str | os.PathLike) else f"<{type(path).__name__}>"


def _refuse_nonfinite(tree: PyTree, path: Any, what: str) -> None:
    """Raise `CheckpointFormatError` naming the leaves of `tree` holding NaN or inf."""
    bad = []
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if eqx.is_inexact_array(leaf) and not np.isfinite(np.asarray(leaf).astype(np.float32)).all():
            bad.append(jax.tree_util.keystr(leaf_path))
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise CheckpointFormatError(
            f"`path`: the {what} in {_where(path)} holds non-finite values (nan/inf) in {shown}; pass "
            "allow_nonfinite=True to load it anyway."
        )


def _peek(f: Any) -> bytes:
    position = f.tell()
    head = f.read(1)
    f.seek(position)
    return head


def _open_and(path: Any, read: Callable[[Any], Any]) -> Any:
    if hasattr(path, "read"):
        return read(path)
    with open(path, "rb") as f:
        return read(f)


def _read_json_line(f: Any, where: str, what: str) -> dict[str, Any]:
    line = f.readline(1 << 20)
    try:
        header = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"`path`: the header line of {where} is not a JSON object ({what} file damaged?): got {line[:120]!r}."
        )
    return header


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def save_model(path: Any, model: PyTree) -> None:
    """Writes a PixelDiT to a self-describing file: no skeleton is needed to load it.

    The file is one line of JSON (format, `variant`, `config` — `model.config.to_dict()`,
    the constructor arguments —, parameter `dtype` and `compute_dtype`, and the `sha256`
    and `size` that loading verifies), then the leaves as `eqx.tree_serialise_leaves`
    writes them. This is Equinox's documented pattern for saving hyperparameters with
    a model. The write is atomic (see
    [`save_checkpoint`][pixeldit_eqx.train.save_checkpoint]).

    **Arguments:**

    - `path`: a file path, or a binary file object open for writing.
    - `model`: a `PixelDiT`, `PixelDiTT2I` or `PixelDiT2` (e.g. `state.ema`), whose
        trainable parameters share one dtype.
    """
    variant = getattr(type(model), "variant", None)
    config = getattr(model, "config", None)
    if variant not in CONFIGS or not isinstance(config, CONFIGS[variant]):
        raise ValueError(
            "`model`: expected a PixelDiT, PixelDiTT2I or PixelDiT2 (with `variant` and `config`), got "
            f"{type(model).__name__}."
        )
    dtypes = {x.dtype for x in jax.tree.leaves(eqx.filter(model, trainable(model)))}
    if len(dtypes) != 1:
        raise ValueError(
            "`model`: expected trainable parameters of a single dtype, got "
            f"{sorted(jnp.dtype(d).name for d in dtypes)}."
        )
    header = {
        "format": _MODEL_FORMAT,
        "version": _MODEL_FORMAT_VERSION,
        "variant": variant,
        "config": config.to_dict(),
        "dtype": _dtype_name(dtypes.pop()),
        "compute_dtype": _dtype_name(getattr(model, "compute_dtype", None)),
    }
    _write(path, header, lambda f: eqx.tree_serialise_leaves(f, model))


def _read_header(f: Any, path: Any) -> dict[str, Any]:
    where = _where(path)
    line = f.readline(1 << 20)
    try:
        header = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        header = None
    if (
        not isinstance(header, dict)
        or header.get("format") != _MODEL_FORMAT
        or not isinstance(header.get("config"), dict)
        or header.get("variant") not in CONFIGS
    ):
        raise CheckpointFormatError(
            f"`path`: {where} is not a pixeldit_eqx model file: expected a first line "
            f'of JSON with "format": "{_MODEL_FORMAT}", "variant" and "config", got '
            f"{line[:120]!r}."
        )
    if header.get("version") not in (1, _MODEL_FORMAT_VERSION):
        raise CheckpointFormatError(
            f"`path`: {where} has model-file version {str(header.get('version'))[:20]!r}; this "
            f"version of pixeldit_eqx reads versions 1 and {_MODEL_FORMAT_VERSION}."
        )
    return header


def load_model(path: Any, *, checkpoint: Checkpoint = False, allow_nonfinite: bool = False) -> PyTree:
    """Reads a model written by [`save_model`][].

    The file's checksum is verified first (a version-1 file, written before checksums
    existed, loads unverified). The skeleton is built from the header with
    `eqx.filter_eval_shape(pixeldit_eqx.build, ...)` (no parameters are initialised),
    then filled with the stored leaves.

    **Arguments:**

    - `path`: a file path, or a binary file object open for reading.
    - `checkpoint`: what the blocks keep for the backward pass (`False`, `"lean"` or
        `True`, as `PixelDiT`'s; a runtime choice, not stored in the file).
    - `allow_nonfinite`: load weights holding NaN or inf (refused by default, as
        `load_reference` refuses them).

    **Returns:**

    The `PixelDiT`, `PixelDiTT2I` or `PixelDiT2`, bit-identical to the one saved.

    Raises `CheckpointFormatError` (a `ValueError`) when the header is missing or
    corrupt, the file truncated, corrupt or followed by trailing bytes, when the stored
    leaves do not fit the model it describes, or hold non-finite values.
    """
    where = _where(path)

    def read(f: Any) -> PyTree:
        header = _read_header(f, path)
        if header["version"] != 1:
            f = read_checksummed(f, header, f"`path`: {where}")
        try:
            skeleton = eqx.filter_eval_shape(
                build,
                header["config"],
                header["variant"],
                key=jr.key(0),
                dtype=header.get("dtype"),
                compute_dtype=header.get("compute_dtype"),
                checkpoint=checkpoint,
            )
        except (TypeError, ValueError, KeyError, OverflowError, MemoryError, RecursionError) as e:
            raise CheckpointFormatError(f"`path`: the header of {where} describes no valid model: {e}") from e
        try:
            model = eqx.tree_deserialise_leaves(f, skeleton)
        except (RuntimeError, ValueError, EOFError, OSError, TypeError, KeyError, MemoryError) as e:
            raise CheckpointFormatError(
                f"`path`: the leaves in {where} do not fit the model its header describes: {str(e)[:300]}"
            ) from e
        if f.read(1):
            raise CheckpointFormatError(
                f"`path`: the leaves in {where} do not fit the model its header "
                "describes: expected the end of the file after the last leaf, got more data."
            )
        return model

    model = _open_and(path, read)
    if not allow_nonfinite:
        _refuse_nonfinite(model, path, "model")
    return model

"""What the command line reads: weights by name, any weights file, and what a file holds."""

import collections
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .. import _hub, _infer
from .._convert import CONFIG_KEY, state_dict, VARIANT_KEY
from .._model import build
from .._presets import PRESETS


# Where the weights of a reference model sit in a checkpoint, EMA first (as `load_reference`).
EMA_PREFIX = "ema_denoiser."
RAW_PREFIXES = ("denoiser.", "model.", "module.")

_MODEL_FILE_START = b'{"'


def _resolve_weights(spec: str, option: str = "--weights") -> pathlib.Path:
    """A `--weights` value (or the file argument named `option`) -> the local file it names:
    a path, or a Hugging Face file id `hf://owner/repo[@revision]/path/in/repo`, fetched
    into (or found in, with `HF_HUB_OFFLINE=1`) the Hugging Face cache."""
    if _hub.is_hub_id(spec):
        try:
            return pathlib.Path(_hub.hub_download(spec))
        except (ValueError, OSError) as e:
            raise type(e)(f"`{option}`: {e}") from e
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec):
        scheme = spec.split("://", 1)[0]
        raise ValueError(
            f"`{option}`: {scheme}:// ids are not supported, got {spec!r}; pass a local path or an "
            "hf://owner/repo/file id."
        )
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"`{option}`: no such file: {spec!r}.")
    return path


def stored_config(path: pathlib.Path, kind: str) -> tuple[str | None, dict[str, Any]] | None:
    """`(variant, config)` that `save_safetensors` stored in a `.safetensors` file's
    metadata, or None (a torch checkpoint, or a file written without them)."""
    if kind != "safetensors":
        return None
    from .._optional import require

    safe_open = require("safetensors", "safetensors", "reading a .safetensors file").safe_open
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # The Rust reader's errors have no common Python base.
        raise ValueError(f"`{path}`: not a readable .safetensors file: {e}") from e
    if CONFIG_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except ValueError as e:
        raise ValueError(f"`{path}`: its {CONFIG_KEY!r} metadata is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"`{path}`: its {CONFIG_KEY!r} metadata is not a JSON object.")
    return metadata.get(VARIANT_KEY), config


def kind_of(path: pathlib.Path) -> str:
    """`"model"` (a file of `train.save_model`), `"safetensors"` or `"torch"` (a `torch.save` zip)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_MODEL_FILE_START):
        return "model"
    if head.startswith(b"PK"):
        return "torch"
    if len(head) >= 10 and head[8:10] == _MODEL_FILE_START:  # u64 header size, then a JSON header
        return "safetensors"
    raise ValueError(
        f"`{path}`: not a file pixeldit-eqx reads: expected a pixeldit_eqx model file (train.save_model), "
        f"a .safetensors file or a torch checkpoint (.pt, .pth, .ckpt), got a file starting with {head[:8]!r}."
    )


def read_tensors(path: pathlib.Path, kind: str) -> tuple[dict[str, Any], list[str]]:
    """The string-keyed tensors of a safetensors or torch file (a Lightning file's `state_dict`),
    and the names of the other top-level entries (`epoch`, `optimizer_states`, ...)."""
    if kind == "safetensors":
        from .._optional import require

        load_file = require("safetensors.numpy", "safetensors", "reading a .safetensors file").load_file
        try:
            return dict(load_file(os.fspath(path))), []
        except Exception as e:
            raise ValueError(f"`{path}`: not a readable .safetensors file: {e}") from e
    from .._torch_pickle import load_torch_file

    raw = load_torch_file(os.fspath(path))
    if not isinstance(raw, Mapping):
        raise ValueError(f"`{path}`: holds a {type(raw).__name__}, not a state dict (a mapping of key -> tensor).")
    others: list[str] = []
    if isinstance(raw.get("state_dict"), Mapping):
        others = sorted(str(k) for k in raw if k != "state_dict")
        raw = raw["state_dict"]
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    others += sorted(str(k) for k, v in raw.items() if not (isinstance(k, str) and isinstance(v, np.ndarray)))
    return tensors, others


def select(tensors: Mapping[str, Any], ema: bool | None) -> tuple[dict[str, Any], str, dict[str, int]]:
    """The weights of one model: `(weights without prefix, prefix, dropped prefix -> count)`.

    `ema=None` takes the EMA weights when the file has them, else the raw ones; `True`
    requires them; `False` refuses them.
    """
    prefixes = collections.Counter(k.split(".", 1)[0] + "." for k in tensors if "." in k)
    if ema is not False and EMA_PREFIX in prefixes:
        prefix = EMA_PREFIX
    elif ema is True:
        raise ValueError(
            f"`--ema`: the file has no EMA weights (no key under {EMA_PREFIX!r}); its key prefixes are "
            f"{sorted(prefixes)}. Leave --ema out, or pass --no-ema."
        )
    else:
        candidates = [p for p in RAW_PREFIXES if p in prefixes]
        prefix = candidates[0] if candidates else ""
    if prefix:
        kept = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        kept = dict(tensors)
    dropped = collections.Counter(
        (k.split(".", 1)[0] + ".*") if "." in k else k for k in tensors if prefix and not k.startswith(prefix)
    )
    return kept, prefix, dict(sorted(dropped.items()))


def infer_config(weights: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(variant, constructor arguments)` read from the weight names and shapes (see
    `pixeldit_eqx._infer.infer_config`)."""
    return _infer.infer_config(weights)


def preset_field(preset: Any, name: str) -> Any:
    """A field of a `PRESETS` entry (a mapping or an object), a config as a plain dict."""
    value = preset.get(name) if isinstance(preset, Mapping) else getattr(preset, name, None)
    if name == "config" and value is not None:
        value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    return value


def skeleton_shapes(config: Mapping[str, Any] | str, variant: str | None) -> dict[str, tuple[int, ...]]:
    """Reference key -> shape of the model `build(config, variant)` makes (nothing allocated)."""
    skeleton = eqx.filter_eval_shape(lambda: build(config, variant, key=jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in state_dict(skeleton).items()}


def mismatches(weights: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every missing, unexpected and misshaped key of `weights` against `expected`."""
    problems = [f"missing key {k!r} (expected shape {expected[k]})" for k in sorted(set(expected) - set(weights))]
    problems += [f"unexpected key {k!r}" for k in sorted(set(weights) - set(expected))]
    problems += [
        f"key {k!r}: expected shape {expected[k]}, got {tuple(np.shape(weights[k]))}"
        for k in sorted(set(weights) & set(expected))
        if tuple(np.shape(weights[k])) != tuple(expected[k])
    ]
    return problems


def fitting_presets(variant: str | None, config: Mapping[str, Any], weights: Mapping[str, Any]) -> list[str]:
    """The presets (of `variant`, default c2i) whose network has exactly the keys and shapes of `weights` (only the
    presets of the same variant, widths and depths as `config` are built, as skeletons)."""
    same = ("hidden_size", "patch_size", "patch_depth", "pixel_depth", "depth")
    return [
        name
        for name, preset in PRESETS.items()
        if preset_field(preset, "variant") == (variant or "c2i")
        and all(preset_field(preset, "config").get(k) == config.get(k) for k in same)
        and not mismatches(weights, skeleton_shapes(name, None))
    ]

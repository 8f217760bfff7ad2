"""What the command line reads: weights by name, any weights file, and what a file holds."""

import collections
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._convert import state_dict
from .._model import build
from .._presets import PRESETS


# Where the weights of a reference model sit in a checkpoint, EMA first (as `load_reference`).
EMA_PREFIX = "ema_denoiser."
RAW_PREFIXES = ("denoiser.", "model.", "module.")

_MODEL_FILE_START = b'{"'


def _resolve_weights(spec: str, option: str = "--weights") -> pathlib.Path:
    """A `--weights` value (or the file argument named `option`) -> the local file it names.

    Today a local path; other schemes (`hf://owner/repo/file`, a later step) resolve here
    to a file in a local cache, so every command that takes weights gains them at once.
    """
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec):
        scheme = spec.split("://", 1)[0]
        raise ValueError(
            f"`{option}`: {scheme}:// ids are not supported by this version, got {spec!r}; "
            "download the file and pass its local path."
        )
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"`{option}`: no such file: {spec!r}.")
    return path


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


def _depth(weights: Mapping[str, Any], stack: str) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(rf"^{stack}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _shape(weights: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in weights:
        raise KeyError(key)
    return tuple(np.shape(weights[key]))


def infer_config(weights: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(variant, constructor arguments)` read from the weight names and shapes of a PixelDiT.

    Arguments that leave no trace in the weights (`use_pixel_abs_pos`, `use_text_rope`,
    `text_rope_theta`, `mlp_ratio`) keep the reference defaults. Raises `ValueError` when the
    weights are not those of a PixelDiT.
    """
    if "y_pos_embedding" in weights:
        variant = "t2i"
    elif "y_embedder.embedding_table.weight" in weights:
        variant = "c2i"
    else:
        raise ValueError(
            "the weights are not those of a PixelDiT: neither 'y_embedder.embedding_table.weight' (class-"
            f"conditional) nor 'y_pos_embedding' (text-conditional) is among their {len(weights)} keys."
        )
    try:
        d, cpp = _shape(weights, "s_embedder.proj.weight")
        d_pix, channels = _shape(weights, "pixel_embedder.proj.weight")
        patch = math.isqrt(cpp // channels)
        config: dict[str, Any] = dict(
            in_channels=channels,
            patch_size=patch,
            hidden_size=d,
            pixel_hidden_size=d_pix,
            patch_depth=_depth(weights, "patch_blocks"),
            pixel_depth=_depth(weights, "pixel_blocks"),
        )
        q_norm = "patch_blocks.0.attn.q_norm_x.weight" if variant == "t2i" else "patch_blocks.0.attn.q_norm.weight"
        if config["patch_depth"]:
            config["num_groups"] = d // _shape(weights, q_norm)[0]
        if config["pixel_depth"]:
            n_mod = _shape(weights, "pixel_blocks.0.adaLN_modulation.0.weight")[0] // (d_pix * patch * patch)
            if n_mod == 4:
                config["pit_adaln_post_modulation"] = True
        if variant == "c2i":
            config["num_classes"] = _shape(weights, "y_embedder.embedding_table.weight")[0] - 1
        else:
            config["txt_embed_dim"] = _shape(weights, "y_embedder.proj.weight")[1]
            config["txt_max_length"] = _shape(weights, "y_pos_embedding")[1]
            if config["pixel_depth"]:
                attn = _shape(weights, "pixel_blocks.0.compress_to_attn.weight")[0]
                config["pixel_attn_hidden_size"] = attn
                config["pixel_num_groups"] = attn // _shape(weights, "pixel_blocks.0.attn.q_norm.weight")[0]
    except (KeyError, ValueError, ZeroDivisionError, IndexError) as e:
        raise ValueError(
            f"the weights look like a {variant} PixelDiT, but a weight that fixes its config is "
            f"missing or misshaped: {e}"
        ) from e
    return variant, config


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


def fitting_presets(variant: str, config: Mapping[str, Any], weights: Mapping[str, Any]) -> list[str]:
    """The presets whose network has exactly the keys and shapes of `weights` (only the
    presets of the same variant, widths and depths as `config` are built, as skeletons)."""
    same = ("hidden_size", "patch_size", "patch_depth", "pixel_depth")
    return [
        name
        for name, preset in PRESETS.items()
        if preset.get("variant") == variant
        and all(preset["config"].get(k) == config.get(k) for k in same)
        and not mismatches(weights, skeleton_shapes(name, None))
    ]

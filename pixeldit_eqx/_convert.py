"""PyTorch state dicts <-> Equinox modules, with strict accounting.

Every array of a module has one reference key, derived from its path: field names are
the reference's unless a class renames them in `_torch_names`; a `BlockStack` exports
its layer `i` as `<stack>.<i>.*`; `Buffer`s are never exported. Loading checks every
key and shape first and reports all problems at once; nothing is half-loaded.
"""

import collections
import heapq
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _hub, _infer
from ._blocks import BlockStack
from ._custom_types import Checkpoint
from ._model import build, PixelDiT, PixelDiTT2I
from ._optional import require
from ._pixeldit2 import PixelDiT2
from .modules import Buffer


class StateDictError(ValueError):
    """A state dict does not fit the module: names the missing, unexpected, mis-shaped
    or non-finite entries (the first few in the message, all of them in `problems`)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems: list[str] = list(problems)


# A message lists at most this many problems; past it, a count of each kind and the first of each.
_SHOWN_PROBLEMS = 10
_SHOWN_PER_KIND = 3


def _listing(problems: list[str]) -> list[str]:
    """The lines of a message that list `problems`: all of them when few, else a count of
    each kind and the first `_SHOWN_PER_KIND` of each."""
    if len(problems) <= _SHOWN_PROBLEMS:
        return problems
    kinds: dict[str, list[str]] = {"missing": [], "unexpected": [], "misshaped or not finite": []}
    for problem in problems:
        kind = problem.split(" ", 1)[0]
        kinds[kind if kind in kinds else "misshaped or not finite"].append(problem)
    counts = ", ".join(f"{len(found)} {kind}" for kind, found in kinds.items() if found)
    lines = [f"{counts} key(s); the first of each (all {len(problems)} in the error's `problems`):"]
    for found in kinds.values():
        lines += found[:_SHOWN_PER_KIND] + ([f"... and {len(found) - _SHOWN_PER_KIND} more"] if found[3:] else [])
    return lines


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _entries(module: eqx.Module) -> list[tuple[int, str, int | None]]:
    """`(leaf index, key pattern, stack depth or None)` for every array of `module`.

    A key pattern of a stacked leaf holds `{i}` where the layer index goes.
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(module, is_leaf=_is_leaf_array)[0]
    out = []
    for index, (path, leaf) in enumerate(leaves_with_path):
        if not _is_leaf_array(leaf):
            continue
        node, names, depth = module, [], None
        for entry in path:
            if isinstance(node, Buffer):
                break
            if not isinstance(entry, jax.tree_util.GetAttrKey):
                raise TypeError(f"cannot name array at {jax.tree_util.keystr(path)} in a reference state dict.")
            name = entry.name
            if isinstance(node, BlockStack) and name == "blocks":
                names.append("{i}")
                depth = node.depth
            else:
                names.append(getattr(type(node), "_torch_names", {}).get(name, name))
            node = getattr(node, name)
        else:
            out.append((index, ".".join(names), depth))
    return out


def _torch_shape(module: eqx.Module, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *shape) if key in getattr(type(module), "_torch_leading_one", ()) else shape


def _expected(
    module: eqx.Module,
) -> dict[str, tuple[int, int | None, tuple[int, ...], Any]]:
    """Reference key -> `(leaf index, layer or None, reference shape, port dtype)`."""
    leaves = jax.tree_util.tree_leaves(module, is_leaf=_is_leaf_array)
    expected = {}
    for index, pattern, depth in _entries(module):
        leaf = leaves[index]
        if depth is None:
            expected[pattern] = (
                index,
                None,
                _torch_shape(module, pattern, tuple(leaf.shape)),
                leaf.dtype,
            )
        else:
            for i in range(depth):
                expected[pattern.format(i=i)] = (
                    index,
                    i,
                    tuple(leaf.shape[1:]),
                    leaf.dtype,
                )
    return expected


def state_dict(module: eqx.Module) -> dict[str, np.ndarray | jax.ShapeDtypeStruct]:
    """Export `module`'s arrays under the reference's key names (PyTorch layout).

    Stacked blocks are unstacked to `<stack>.<i>.*`; `Buffer`s are left out. A module
    built under `eqx.filter_eval_shape` exports `jax.ShapeDtypeStruct`s instead.
    """
    leaves = jax.tree_util.tree_leaves(module, is_leaf=_is_leaf_array)
    out: dict[str, Any] = {}
    for key, (index, layer, shape, dtype) in _expected(module).items():
        leaf = leaves[index]
        if isinstance(leaf, jax.ShapeDtypeStruct):
            out[key] = jax.ShapeDtypeStruct(shape, dtype)
        else:
            value = np.asarray(leaf if layer is None else leaf[layer])
            out[key] = value.reshape(shape)
    return out


def _shape_of(value: Any) -> tuple[int, ...] | str:
    """`np.shape(value)`, or what `value` is when it has none (a ragged or too deep list
    from a checkpoint file, on which numpy raises)."""
    try:
        return tuple(np.shape(value))
    except (ValueError, TypeError, RecursionError, MemoryError):
        return f"none: a {type(value).__name__} that is not an array"


# A key only one variant has: found in a state dict loaded into the other, it names the mix-up.
_VARIANT_MARKERS = {
    "c2i": "y_embedder.embedding_table.weight",
    "t2i": "y_pos_embedding",
    "pixeldit2": "dino_conditioner.dino_proj.output_proj.weight",
}


def load_state_dict(module: eqx.Module, state_dict: Mapping[str, Any], *, allow_nonfinite: bool = False) -> Any:
    """Return `module` with its arrays replaced from a reference state dict.

    `state_dict` maps the reference's key names, relative to this module (e.g.
    `w1.weight` for a `SwiGLU`), to arrays (numpy, jax, or anything `np.asarray`
    takes; bf16/fp16 are cast to the module's dtypes). Per-layer keys fill the stacked
    blocks. Any missing, unexpected or mis-shaped key, or a non-finite tensor, raises
    one `StateDictError` naming them (all of them in its `problems`); then nothing is
    loaded. `module` may be a skeleton from `eqx.filter_eval_shape`.
    """
    return _load(module, state_dict, allow_nonfinite=allow_nonfinite, describe=False)


def _load(
    module: eqx.Module,
    state_dict: Mapping[str, Any],
    *,
    allow_nonfinite: bool,
    describe: bool,
    check_only: bool = False,
) -> Any:
    """`load_state_dict`; with `describe`, an error says what the weights look like (the
    sizes read from their names and shapes) before the problems; with `check_only`, the
    checks alone (returns None)."""
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"`state_dict` must be a mapping of reference key -> array, got {type(state_dict).__name__}; "
            "to read a checkpoint file use `pixeldit_eqx.load_reference`."
        )
    expected = _expected(module)
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems += [f"missing key {k!r} (expected shape {expected[k][2]})" for k in missing]
    problems += [f"unexpected key {k!r} (shape {_shape_of(state_dict[k])})" for k in unexpected]
    arrays = {}
    for key in sorted(set(expected) & set(state_dict)):
        value = state_dict[key]
        shape = _shape_of(value)
        want = expected[key][2]
        if shape != want:
            problems.append(f"key {key!r}: expected shape {want}, got {shape}")
            continue
        value = np.asarray(value)
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V" or "float" in value.dtype.name):
            problems.append(f"key {key!r}: expected a floating tensor, got dtype {value.dtype}")
            continue
        if not allow_nonfinite and not np.isfinite(value.astype(np.float32)).all():
            problems.append(f"key {key!r}: has non-finite values (nan/inf)")
            continue
        arrays[key] = value
    if problems:
        own = getattr(type(module), "variant", None)
        hints = [
            f"\n  hint: key {marker!r} belongs to a {other!r} model: these look like {other} weights "
            f"(load them with variant={other!r} and a {other} config)"
            for other, marker in _VARIANT_MARKERS.items()
            if own is not None
            and other != own
            and marker in state_dict
            # PixelDiT2 shares the c2i class table: its own marker rules the hint out.
            and _VARIANT_MARKERS.get(own) not in state_dict
        ]
        lines = [_infer.describe(state_dict)] if describe else []
        raise StateDictError(
            f"state dict does not fit {type(module).__name__} ({len(problems)} problem(s)); nothing was loaded:"
            + "".join(hints)
            + "".join(f"\n  {line}" for line in lines + _listing(problems)),
            problems,
        )
    if check_only:
        return None
    flat, treedef = jax.tree_util.tree_flatten(module, is_leaf=_is_leaf_array)
    per_leaf: dict[int, dict[int | None, np.ndarray]] = {}
    for key, (index, layer, _, _) in expected.items():
        per_leaf.setdefault(index, {})[layer] = arrays[key]
    for index, layers in per_leaf.items():
        dtype = flat[index].dtype
        if None in layers:
            value = layers[None].reshape(flat[index].shape)
        else:
            value = np.stack([layers[i] for i in range(len(layers))])
        flat[index] = jnp.asarray(value, dtype=dtype)
    return jax.tree_util.tree_unflatten(treedef, flat)


_PREFIXES = ("ema_denoiser.", "denoiser.", "model.", "module.", "")


# The safetensors `__metadata__` keys under which `save_safetensors` records the model.
CONFIG_KEY = "pixeldit_eqx.config"
VARIANT_KEY = "pixeldit_eqx.variant"


def _read(source: Any, name: str = "source") -> Any:
    return _read_with_metadata(source, name)[0]


def _read_with_metadata(source: Any, name: str = "source") -> tuple[Any, dict[str, str]]:
    """`(what the checkpoint holds, its safetensors metadata or {})` of a state dict, a
    path or a Hugging Face file id (`hf://owner/repo[@revision]/file`)."""
    if isinstance(source, Mapping):
        return source, {}
    if not isinstance(source, str | os.PathLike):
        raise ValueError(
            f"`{name}` must be a state dict (a mapping) or a checkpoint path, got {type(source).__name__}."
        )
    path = _hub.hub_download(source) if _hub.is_hub_id(source) else os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, with_metadata=True)
    from ._torch_pickle import load_torch_file

    return load_torch_file(path), {}


def _read_safetensors(path: str, with_metadata: bool = False) -> Any:
    """A `.safetensors` file's tensors, checked against the checksum in its metadata when
    it has one (as `save_safetensors` writes), with keys within the reading budget; with
    `with_metadata`, `(tensors, metadata)`."""
    safe_open = require("safetensors", "safetensors", "reading a .safetensors file").safe_open
    load_file = require("safetensors.numpy", "safetensors", "reading a .safetensors file").load_file
    from . import _torch_pickle
    from ._atomic import safetensors_checksum, SAFETENSORS_CHECKSUM_KEY
    from ._torch_pickle import CheckpointFormatError

    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except MemoryError as e:
        raise CheckpointFormatError(f"{path!r} is not a readable .safetensors file: out of memory") from e
    except Exception as e:  # The Rust reader's errors have no common Python base.
        raise CheckpointFormatError(f"{path!r} is not a readable .safetensors file: {str(e)[:300]}") from e
    limit = _torch_pickle.BUDGET.max_key_length
    longest = max(map(len, tensors), default=0)
    if longest > limit:
        raise CheckpointFormatError(
            f"{path!r}: over the reading budget for key length: {longest} > {limit} (`ReadBudget.max_key_length`)"
        )
    expected = metadata.get(SAFETENSORS_CHECKSUM_KEY)
    if expected is not None and safetensors_checksum(tensors) != expected:
        raise CheckpointFormatError(
            f"{path!r}: the tensors fail the sha256 checksum in the file's metadata: the file is corrupt "
            "(flipped bits: a damaged disk, download or copy)"
        )
    return (tensors, dict(metadata)) if with_metadata else tensors


def _infer_prefix(tensors: Mapping[str, Any], expected: set[str]) -> str:
    """The key prefix under which most of the model's weights sit (`""` for none); on a
    tie the first of `_PREFIXES`, so a Lightning checkpoint gives its EMA weights."""
    counts: collections.Counter[str] = collections.Counter()
    # Only a suffix as long as the longest expected key can match: looking at the dots
    # of the key's tail only keeps this linear in the keys' lengths (a key of 10^6 dots).
    longest = max(map(len, expected), default=0)
    for k in tensors:
        if k in expected:
            counts[""] += 1
        dot = k.rfind(".")
        while dot != -1 and len(k) - dot - 1 <= longest:
            if k[dot + 1 :] in expected:
                counts[k[: dot + 1]] += 1
            dot = k.rfind(".", 0, dot)
    if not counts:
        sample = [k if len(k) <= 80 else k[:77] + "..." for k in heapq.nsmallest(4, tensors)]
        raise StateDictError(
            f"no key of the checkpoint names a weight of this model, under any prefix: the model expects "
            f"{len(expected)} keys such as {sorted(expected)[:2]}; the checkpoint's keys include {sample} "
            f"({len(tensors)} in all). Is it a checkpoint of another model?"
        )
    best = max(counts.values())
    tied = [p for p, n in counts.items() if n == best]
    return min(tied, key=lambda p: (_PREFIXES.index(p) if p in _PREFIXES else len(_PREFIXES), len(p), p))


def _select_weights(raw: Any, prefix: str | None, expected: set[str]) -> dict[str, Any]:
    """Find the model's weights in a loaded checkpoint (plain or Lightning-style)."""
    if not isinstance(raw, Mapping):
        raise StateDictError(
            f"the checkpoint holds a {type(raw).__name__}, not a state dict (a mapping of key -> tensor)."
        )
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    tensors = {k: v for k, v in raw.items() if isinstance(k, str)}
    if prefix is None:
        prefix = _infer_prefix(tensors, expected)
    if prefix == "":
        return dict(tensors)
    chosen = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not chosen:
        found = sorted({k.split(".", 1)[0] + "." for k in tensors if "." in k})
        raise StateDictError(f"no weights under prefix {prefix!r}; prefixes present: {found}")
    return chosen


def _tensor_keys(raw: Any) -> list[str]:
    """The string keys of a loaded checkpoint (a Lightning file's `state_dict`)."""
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    return [k for k in raw if isinstance(k, str)] if isinstance(raw, Mapping) else []


def _config_and_variant(
    config: Mapping[str, Any] | str | None, variant: str | None, metadata: Mapping[str, str], raw: Any
) -> tuple[Mapping[str, Any] | str, str | None]:
    """The config and variant to build: an explicit `config` wins over the file's metadata;
    a missing `variant` is the preset's, else read from the config's argument names, the
    file's metadata or the weight names (`build` falls back to `"c2i"`)."""
    from ._presets import PRESETS
    from ._torch_pickle import CheckpointFormatError

    if config is None:
        stored = metadata.get(CONFIG_KEY)
        if stored is None:
            raise ValueError(
                "`config`: the weights carry no config (only files written by `save_safetensors` from a model, "
                "or with `config=`, do): pass `config=`, the reference constructor arguments (a dict, a "
                f"released YAML's `init_args`) or a preset name, one of {sorted(PRESETS)}."
            )
        try:
            config = json.loads(stored)
        except ValueError as e:
            raise CheckpointFormatError(f"the file's {CONFIG_KEY!r} metadata is not JSON: {e}") from e
        if not isinstance(config, Mapping | str):
            raise CheckpointFormatError(
                f"the file's {CONFIG_KEY!r} metadata must hold a JSON object, got {type(config).__name__}."
            )
    if variant is not None or isinstance(config, str):
        return config, variant  # a preset fixes its variant (`build` names a contradiction)
    return config, (
        _infer.variant_of_config(config) or metadata.get(VARIANT_KEY) or _infer.variant_of_weights(_tensor_keys(raw))
    )


def load_reference(
    source: Mapping[str, Any] | str | os.PathLike,
    config: Mapping[str, Any] | str | None = None,
    variant: str | None = None,
    *,
    prefix: str | None = None,
    encoder_weights: Mapping[str, Any] | str | os.PathLike | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    checkpoint: Checkpoint = False,
) -> PixelDiT | PixelDiTT2I | PixelDiT2:
    """Build a model and load reference weights into it.

    **Arguments:**

    - `source`: a state dict of arrays, a path to a `.safetensors`, `.pt`/`.pth` or
      Lightning `.ckpt` file (read without torch, by a restricted unpickler), or a
      Hugging Face file id `hf://owner/repo[@revision]/path/in/repo` (the `hub` extra;
      the Hub's cache and `HF_HUB_OFFLINE` apply).
    - `config`: the reference constructor arguments or a preset name. Default: the config
      that `save_safetensors` stored in the file's metadata; a file without one needs
      `config`. An explicit `config` wins over the stored one (to change what leaves no
      trace in the weights, a dropout say); the weights are checked against it as always.
    - `variant`: `"c2i"`, `"t2i"` or `"pixeldit2"`. Default: the preset's; else the one
      the config's argument names belong to (`txt_embed_dim` -> t2i, `depth` -> pixeldit2,
      ...); else the file's stored variant; else the one the weight names belong to
      (`dino_conditioner.*` -> pixeldit2, `y_pos_embedding` -> t2i); else `"c2i"`.
    - `prefix`: where the weights sit in the checkpoint (`"ema_denoiser."`,
      `"denoiser."`, ...). Default: the prefix (any, or none) under which most of the
      model's keys are found; on a tie the first of `ema_denoiser.`, `denoiser.`,
      `model.`, `module.`, none, so a Lightning checkpoint loads its EMA weights. Keys
      outside the prefix are ignored; inside it, the accounting is strict.
    - `encoder_weights` (PixelDiT2 only): the grounding encoder's weights, a timm DINOv3
      state dict, `.safetensors` file or `hf://` id (timm key names, any prefix), for a
      checkpoint that lacks them; they replace any encoder weights `source` holds. timm's
      non-persistent `rope.periods` and zero `attn.k_bias` entries are dropped.
    - `dtype`, `compute_dtype`, `checkpoint`: as for `build`.

    Weights that do not fit the config raise a `StateDictError` that says first what the
    weights look like (`hidden_size=64, patch_depth=2, ...`, read from their names and
    shapes), then the problems.
    """
    raw, metadata = _read_with_metadata(source)
    config, variant = _config_and_variant(config, variant, metadata, raw)
    skeleton = eqx.filter_eval_shape(
        lambda: build(
            config,
            variant,
            key=jax.random.key(0),
            dtype=dtype,
            compute_dtype=compute_dtype,
            checkpoint=checkpoint,
        )
    )
    if encoder_weights is not None and not isinstance(skeleton, PixelDiT2):
        raise ValueError(
            f"`encoder_weights` is for PixelDiT2 (its grounding encoder); this is a {type(skeleton).__name__}."
        )
    weights = _select_weights(raw, prefix, set(_expected(skeleton)))
    if encoder_weights is not None:
        weights = _with_encoder_weights(skeleton, weights, _read(encoder_weights, "encoder_weights"))
    return _load(skeleton, weights, allow_nonfinite=False, describe=True)


_ENCODER_PREFIX = "dino_conditioner.encoder."


def _with_encoder_weights(skeleton: Any, weights: dict[str, Any], raw: Any) -> dict[str, Any]:
    """`weights` with the PixelDiT2 grounding encoder's entries taken from a timm DINOv3
    state dict `raw` (found under any prefix)."""
    wanted = {k[len(_ENCODER_PREFIX) :] for k in _expected(skeleton) if k.startswith(_ENCODER_PREFIX)}
    encoder = _select_weights(raw, None, wanted)
    problems = []
    for key in [k for k in encoder if k == "rope.periods" or k.endswith("attn.k_bias")]:
        value = encoder.pop(key)
        if key.endswith("k_bias") and np.any(np.asarray(value, np.float32) != 0):
            problems.append(f"{key!r} is not zero (DINOv3 has no key bias)")
    if problems:
        raise StateDictError("`encoder_weights` do not fit the DINOv3 grounding encoder: " + "; ".join(problems))
    merged = {k: v for k, v in weights.items() if not k.startswith(_ENCODER_PREFIX)}
    merged.update({_ENCODER_PREFIX + k: v for k, v in encoder.items()})
    return merged


def _plain_config(config: Any) -> dict[str, Any]:
    """A model's (or a given) config as plain JSON-able values: a config object's
    `to_dict()`, a mapping, or a preset's arguments."""
    if isinstance(config, str):
        from ._presets import resolve

        config = resolve(config)[0]
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in config.items()}


def save_safetensors(
    path: str | os.PathLike,
    module_or_state_dict: Any,
    *,
    config: Mapping[str, Any] | str | None = None,
    variant: str | None = None,
) -> None:
    """Write a module's reference state dict (or a state dict) as `.safetensors`.

    The write is atomic (a temporary file replaces `path` whole: an interrupted save
    leaves the previous file), and the file's metadata holds the sha256 of its tensors
    (`pixeldit_eqx.sha256`), which `load_reference` verifies. For a model, the metadata
    also holds its config (`pixeldit_eqx.config`, JSON) and variant
    (`pixeldit_eqx.variant`), so `load_reference(path)` needs nothing else; for a state
    dict, pass `config` (constructor arguments or a preset name) and, unless the config's
    argument names or the weight names tell, `variant` to store them: the weights are
    checked against them first (a `StateDictError`, and nothing written, when they do
    not fit).
    """
    save = require("safetensors.numpy", "safetensors", "save_safetensors").save

    from ._atomic import atomic_write, safetensors_checksum, SAFETENSORS_CHECKSUM_KEY

    is_model = not isinstance(module_or_state_dict, Mapping)
    if is_model and (config is not None or variant is not None):
        raise ValueError("`config`/`variant`: a model carries its own; pass them only with a state dict.")
    sd = state_dict(module_or_state_dict) if is_model else module_or_state_dict
    if is_model:
        config = getattr(module_or_state_dict, "config", None)
        variant = getattr(type(module_or_state_dict), "variant", None)
    elif variant is not None and config is None:
        raise ValueError("`variant`: store it with its `config`, got a variant and no config.")
    metadata: dict[str, str] = {}
    if config is not None:
        if isinstance(config, str) and variant is None:
            from ._presets import resolve

            variant = resolve(config)[1]
        plain = _plain_config(config)
        variant = variant or _infer.variant_of_config(plain) or _infer.variant_of_weights(sd)
        if not is_model:  # the file must load as it says
            skeleton = eqx.filter_eval_shape(lambda: build(plain, variant, key=jax.random.key(0)))
            _load(skeleton, sd, allow_nonfinite=True, describe=True, check_only=True)
        try:
            metadata[CONFIG_KEY] = json.dumps(plain, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`config`: its values must be plain JSON values (numbers, strings, lists): {e}") from e
        if variant is not None:
            metadata[VARIANT_KEY] = variant
    tensors = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    metadata[SAFETENSORS_CHECKSUM_KEY] = safetensors_checksum(tensors)
    data = save(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)

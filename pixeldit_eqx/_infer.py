"""What a config or a set of weights says about the model: its variant, and the sizes
read from the weight names and shapes (for `load_reference`'s errors and `pixeldit-eqx info`)."""

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


# Constructor arguments only one family takes (the t2i reference's two ignored ones included).
_T2I_ONLY = frozenset(
    {
        "txt_embed_dim",
        "txt_max_length",
        "pixel_attn_hidden_size",
        "pixel_num_groups",
        "use_text_rope",
        "text_rope_theta",
        "num_text_blocks",
        "repa_encoder_index",
    }
)
_PIXELDIT2_ONLY = frozenset(
    {
        "num_heads",
        "depth",
        "in_context_len",
        "in_context_start",
        "attn_dropout",
        "proj_dropout",
        "mlp_hidden_multiple",
        "grounding_encoder",
        "grounding_proj_blocks",
        "grounding_proj_heads",
        "single_silu_cond",
        "encoder",
        "pretrained_encoder",
    }
)
# Arguments of PixelDiT (c2i and t2i) that PixelDiT2 does not take.
_PIXELDIT_ONLY = frozenset(
    {
        "patch_depth",
        "pixel_depth",
        "pixel_hidden_size",
        "num_groups",
        "use_pixel_abs_pos",
        "mlp_ratio",
        "pit_adaln_post_modulation",
    }
)


def variant_of_config(config: Mapping[str, Any]) -> str | None:
    """The variant whose constructor alone takes some of `config`'s argument names, or None
    when the names fit more than one (or none): `txt_embed_dim` & co. -> `"t2i"`,
    `depth`/`num_heads`/`grounding_encoder` & co. -> `"pixeldit2"`, PixelDiT's
    `patch_depth`/`pixel_depth` & co. with `num_classes` -> `"c2i"`."""
    keys = set(config)
    t2i, pixeldit2, pixeldit = keys & _T2I_ONLY, keys & _PIXELDIT2_ONLY, keys & _PIXELDIT_ONLY
    if t2i and not pixeldit2:
        return "t2i"
    if pixeldit2 and not (t2i or pixeldit):
        return "pixeldit2"
    if pixeldit and not (t2i or pixeldit2) and "num_classes" in keys:
        return "c2i"
    return None


def variant_of_weights(keys: Iterable[str]) -> str | None:
    """The variant that reference weight names (under any prefix) belong to, or None:
    PixelDiT2 has `dino_conditioner.*` and `in_context_posemb`, the t2i PixelDiT
    `y_pos_embedding` and its text stream, the c2i PixelDiT a class table and pixel blocks."""
    class_table = pixel_blocks = False
    for key in keys:
        if not isinstance(key, str):
            continue
        dotted = "." + key
        if ".dino_conditioner." in dotted or dotted.endswith(".in_context_posemb"):
            return "pixeldit2"
        if dotted.endswith(".y_pos_embedding") or "adaLN_modulation_txt" in key:
            return "t2i"
        class_table = class_table or dotted.endswith(".y_embedder.embedding_table.weight")
        pixel_blocks = pixel_blocks or ".pixel_blocks." in dotted
    return "c2i" if class_table and pixel_blocks else None


def _depth(weights: Mapping[str, Any], stack: str) -> int:
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    found = {int(m.group(1)) for k in weights if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _shape(weights: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in weights:
        raise KeyError(f"no weight {key!r}")
    return tuple(np.shape(weights[key]))


def _patch(cpp: int, channels: tuple[int, ...]) -> tuple[int, int]:
    """`(in_channels, patch_size)` of a patch embedding's input width `C * p * p`."""
    for c in channels:
        if cpp % c == 0 and math.isqrt(cpp // c) ** 2 == cpp // c:
            return c, math.isqrt(cpp // c)
    raise ValueError(f"a patch embedding of input width {cpp} is not C * p * p for C in {channels}")


def _pixeldit(weights: Mapping[str, Any], variant: str, config: dict[str, Any]) -> None:
    """Fills `config` with what the weights of a c2i or t2i PixelDiT fix, in order (raises
    `KeyError`/`ValueError` at the first weight missing or misshaped)."""
    d, cpp = _shape(weights, "s_embedder.proj.weight")
    config["hidden_size"] = d
    d_pix, channels = _shape(weights, "pixel_embedder.proj.weight")
    config["in_channels"] = channels
    config["patch_size"] = math.isqrt(cpp // channels)
    config["pixel_hidden_size"] = d_pix
    config["patch_depth"] = _depth(weights, "patch_blocks")
    config["pixel_depth"] = _depth(weights, "pixel_blocks")
    if variant == "c2i":
        config["num_classes"] = _shape(weights, "y_embedder.embedding_table.weight")[0] - 1
    else:
        config["txt_embed_dim"] = _shape(weights, "y_embedder.proj.weight")[1]
        config["txt_max_length"] = _shape(weights, "y_pos_embedding")[1]
    q_norm = "patch_blocks.0.attn.q_norm_x.weight" if variant == "t2i" else "patch_blocks.0.attn.q_norm.weight"
    if config["patch_depth"]:
        config["num_groups"] = d // _shape(weights, q_norm)[0]
    if config["pixel_depth"]:
        patch = config["patch_size"]
        n_mod = _shape(weights, "pixel_blocks.0.adaLN_modulation.0.weight")[0] // (d_pix * patch * patch)
        if n_mod == 4:
            config["pit_adaln_post_modulation"] = True
        if variant == "t2i":
            attn = _shape(weights, "pixel_blocks.0.compress_to_attn.weight")[0]
            config["pixel_attn_hidden_size"] = attn
            config["pixel_num_groups"] = attn // _shape(weights, "pixel_blocks.0.attn.q_norm.weight")[0]


_ENCODER = "dino_conditioner.encoder."
_PROJ = "dino_conditioner.dino_proj."


class _NotInWeights(ValueError):
    """A constructor argument the weights do not fix."""


def _pixeldit2(weights: Mapping[str, Any], config: dict[str, Any]) -> None:
    """Fills `config` with what the weights of a PixelDiT2 fix, in order."""
    from ._dinov3 import DINOV3_PRESETS, TIMM_DINOV3

    d, cpp = _shape(weights, "s_embedder.proj.weight")
    config["hidden_size"] = d
    config["in_channels"], config["patch_size"] = _patch(cpp, (3, 1))
    config["depth"] = _depth(weights, "patch_blocks")
    config["num_classes"] = _shape(weights, "y_embedder.embedding_table.weight")[0] - 1
    config["in_context_len"] = _shape(weights, "in_context_posemb")[1] if "in_context_posemb" in weights else 0
    if config["depth"] <= 8:  # traceless; the reference default 8 needs a deeper network
        config["in_context_start"] = max(config["depth"] - 1, 0)
    if config["depth"]:
        config["num_heads"] = d // _shape(weights, "patch_blocks.0.attn.q_norm.weight")[0]
        hidden = _shape(weights, "patch_blocks.0.mlp.w1.weight")[0]
        plain = int(2 * int(d * 4.0) / 3)
        # Every multiple that rounds `plain` up to `hidden` builds the same network: the largest power of two.
        multiples = [m for m in (2**i for i in range(12)) if -(-plain // m) * m == hidden and hidden != plain]
        config["mlp_hidden_multiple"] = max(multiples) if multiples else 0
    width = _shape(weights, _PROJ + "input_proj.weight")[1]  # the encoder's feature width
    depth = _depth(weights, _ENCODER + "blocks")
    names = [
        name
        for name, timm in DINOV3_PRESETS.items()
        if TIMM_DINOV3[timm].embed_dim == width and depth in (0, TIMM_DINOV3[timm].depth)
    ]
    config["grounding_proj_blocks"] = _depth(weights, _PROJ + "blocks")
    if config["grounding_proj_blocks"]:
        config["grounding_proj_heads"] = d // _shape(weights, _PROJ + "blocks.0.attn.q_norm.weight")[0]
    if not names:
        raise _NotInWeights(
            f"the grounding encoder ({width} wide, {depth} blocks) is none of {sorted(DINOV3_PRESETS)}: its "
            "config (`grounding_encoder`) does not follow from the weights"
        )
    config["grounding_encoder"] = names[0]


def read_config(weights: Mapping[str, Any]) -> tuple[str | None, dict[str, Any], str | None]:
    """`(variant, sizes, problem)`: the variant of reference weights (keys without prefix)
    and the constructor arguments their names and shapes fix, as far as they could be
    read; `problem` says why the reading stopped early (None when it did not)."""
    variant = variant_of_weights(weights)
    config: dict[str, Any] = {}
    if variant is None:
        return (
            None,
            config,
            (
                "the weights are not those of a PixelDiT: no key names a class table with pixel blocks (c2i), "
                f"a 'y_pos_embedding' (t2i) or a 'dino_conditioner.*' (PixelDiT2) among their {len(weights)} keys"
            ),
        )
    try:
        if variant == "pixeldit2":
            _pixeldit2(weights, config)
        else:
            _pixeldit(weights, variant, config)
    except _NotInWeights as e:
        return variant, config, str(e)
    except (KeyError, ValueError, ZeroDivisionError, IndexError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return variant, config, f"a weight that fixes the config is missing or misshaped: {message}"
    return variant, config, None


def infer_config(weights: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(variant, constructor arguments)` read from the weight names and shapes of a
    PixelDiT or PixelDiT2 (keys without prefix).

    Arguments that leave no trace in the weights keep the defaults: `use_pixel_abs_pos`,
    `use_text_rope`, `text_rope_theta`, `mlp_ratio` (PixelDiT); `in_context_start`, the
    dropouts and `single_silu_cond` (PixelDiT2, whose `grounding_encoder` is read from the
    encoder's width when it is a released one; `in_context_start` is the reference's 8, or
    `depth - 1` for a network of 8 blocks or fewer). Raises `ValueError` when the weights are
    not those of a PixelDiT or a weight that fixes the config is missing or misshaped.
    """
    variant, config, problem = read_config(weights)
    if variant is None or problem is not None:
        raise ValueError(problem if variant is None else f"the weights look like a {variant} model, but {problem}")
    return variant, config


def describe(weights: Mapping[str, Any]) -> str:
    """One line on what reference weights look like: `"a c2i PixelDiT: hidden_size=64,
    patch_depth=2, ..."` (as far as the names and shapes tell), for error messages."""
    variant, config, problem = read_config(weights)
    if variant is None:
        return f"the weights are {len(weights)} tensors of no PixelDiT model"
    what = {"c2i": "a c2i PixelDiT", "t2i": "a t2i PixelDiT", "pixeldit2": "a PixelDiT2"}[variant]
    sizes = ", ".join(f"{k}={v!r}" for k, v in config.items())
    text = f"the weights look like {what}" + (f": {sizes}" if sizes else "")
    return text + (f" (then {problem})" if problem else "")

"""The frozen DINOv3 ViT that grounds PixelDiT2: timm's `vit_{small,base,large}_patch16_dinov3_qkvb`
(`timm.models.eva.Eva` with `RotaryEmbeddingDinoV3`), at any resolution.

Structure (timm names): `cls_token`, 4 `reg_token`s, no absolute position embedding, a
16x16 patch convolution, blocks `x + gamma_1 * attn(norm1 x)`, `x + gamma_2 * mlp(norm2 x)`
with LayerNorm (eps 1e-5), fused `qkv` with `q_bias`/`v_bias` and a zero `k_bias`, DINOv3
rope (rotate-half layout) on the patch tokens only, exact GELU, a final LayerNorm.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._attention import _check_heads, attend
from ._blocks import BlockStack
from ._custom_types import Image
from ._ops import dense, keep, linear
from ._tokens import check_image_size, patchify
from .modules import PixelMLP


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
    """The sizes of a DINOv3 ViT (timm `Eva` arguments); the rest of the structure is fixed.

    - `embed_dim`, `depth`, `num_heads`: width, blocks and heads (the feature width is
      `embed_dim`).
    - `patch_size`: side of the square patches (16 for every released DINOv3).
    - `mlp_ratio`: the MLP's hidden width over `embed_dim`.
    - `num_reg_tokens`: register tokens after the class token.
    - `rope_temperature`: the base of the rope periods.
    - `in_chans`: image channels.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    mlp_ratio: float = 4.0
    num_reg_tokens: int = 4
    rope_temperature: float = 100.0
    in_chans: int = 3

    def __post_init__(self):
        for name in ("embed_dim", "num_heads", "patch_size", "in_chans"):
            _positive_int(name, getattr(self, name))
        for name in ("depth", "num_reg_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DINOv3: `{name}` must be a non-negative integer, got {value!r}.")
        for name in ("mlp_ratio", "rope_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"DINOv3: `{name}` must be a positive number, got {value!r}.")
        _check_heads(self.embed_dim, self.num_heads, "DINOv3")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"DINOv3: the rope needs a head dim divisible by 4, got embed_dim / num_heads = "
                f"{self.embed_dim} / {self.num_heads}."
            )
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"DINOv3: `embed_dim * mlp_ratio` must be >= 1, got {self.embed_dim} * {self.mlp_ratio}.")

    @property
    def num_prefix_tokens(self) -> int:
        """Class token + registers, which precede the patch tokens."""
        return 1 + self.num_reg_tokens

    @property
    def feature_dim(self) -> int:
        return self.embed_dim


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"DINOv3: `{name}` must be a positive integer, got {value!r}.")


#: timm model names (without the pretrained tag) -> their sizes.
TIMM_DINOV3: dict[str, DINOv3Config] = {
    "vit_small_patch16_dinov3_qkvb": DINOv3Config(384, 12, 6),
    "vit_base_patch16_dinov3_qkvb": DINOv3Config(768, 12, 12),
    "vit_large_patch16_dinov3_qkvb": DINOv3Config(1024, 24, 16),
}

#: The reference's grounding encoder names (`grounding.GROUNDING_ENCODERS`) -> timm model.
DINOV3_PRESETS: dict[str, str] = {
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb",
    "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb",
}

# timm keyword arguments that change nothing a frozen encoder computes here.
_IGNORED_TIMM_KWARGS = ("pretrained", "dynamic_img_size", "img_size")
_SIZE_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DINOv3Config))


def encoder_config(spec: "str | Mapping[str, Any] | DINOv3Config") -> DINOv3Config:
    """The `DINOv3Config` of an encoder spec.

    `spec` is a preset name (`"dinov3_vits16"`, `"dinov3_vitb16"`, `"dinov3_vitl16"`),
    a timm model name (`"vit_small_patch16_dinov3_qkvb.lvd1689m"`), a mapping like the
    reference fixtures' `encoder` entries (`{"timm.create_model": name, "kwargs":
    {size overrides}, "feature_dim": ..., "patch_size": ...}`), a mapping of
    `DINOv3Config` fields, or a `DINOv3Config`.
    """
    if isinstance(spec, DINOv3Config):
        return spec
    if isinstance(spec, str):
        if spec in DINOV3_PRESETS:
            return TIMM_DINOV3[DINOV3_PRESETS[spec]]
        base = spec.split(".", 1)[0]
        if base in TIMM_DINOV3:
            return TIMM_DINOV3[base]
        raise ValueError(
            f"unknown grounding encoder {spec!r}: expected one of {sorted(DINOV3_PRESETS)}, a timm name among "
            f"{sorted(TIMM_DINOV3)}, or a mapping describing the encoder."
        )
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"a grounding encoder must be a preset name, a timm name or a mapping, got {type(spec).__name__}."
        )
    if "timm.create_model" not in spec:
        unknown = sorted(set(spec) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"grounding encoder mapping: unknown field(s) {unknown}; expected `timm.create_model` (+ `kwargs`, "
                f"`feature_dim`, `patch_size`) or DINOv3Config fields {list(_CONFIG_FIELDS)}."
            )
        return DINOv3Config(**spec)
    name = spec["timm.create_model"]
    if not isinstance(name, str) or name.split(".", 1)[0] not in TIMM_DINOV3:
        raise ValueError(
            f"grounding encoder mapping: `timm.create_model` must name one of {sorted(TIMM_DINOV3)} "
            f"(with or without a pretrained tag), got {name!r}."
        )
    kwargs = dict(spec.get("kwargs") or {})
    unknown = sorted(set(kwargs) - set(_IGNORED_TIMM_KWARGS) - set(_SIZE_KWARGS))
    if unknown:
        raise ValueError(
            f"grounding encoder mapping: unsupported timm kwargs {unknown}; supported: "
            f"{sorted(_SIZE_KWARGS + _IGNORED_TIMM_KWARGS)}."
        )
    if kwargs.get("dynamic_img_size", True) is not True:
        raise ValueError("grounding encoder mapping: the grounding encoder runs with `dynamic_img_size=True`.")
    overrides = {k: kwargs[k] for k in _SIZE_KWARGS if k in kwargs}
    config = dataclasses.replace(TIMM_DINOV3[name.split(".", 1)[0]], **overrides)
    for field, value in (("feature_dim", config.embed_dim), ("patch_size", config.patch_size)):
        if field in spec and spec[field] != value:
            raise ValueError(
                f"grounding encoder mapping: `{field}`={spec[field]!r} does not match the encoder built from "
                f"{name!r} with kwargs {overrides}, whose {field} is {value}."
            )
    return config


def rope_dinov3(
    head_dim: int, height: int, width: int, temperature: float = 100.0
) -> tuple[Float[Array, "{height*width} {head_dim}"], Float[Array, "{height*width} {head_dim}"]]:
    """`(sin, cos)` of DINOv3's rope on a `height x width` patch grid, rotate-half layout.

    Reference: timm `RotaryEmbeddingDinoV3.get_embed` in eval mode (no coordinate
    augmentation), which returns `cat([sin, cos], -1)`: patch centres normalised per axis
    to [-1, 1], `periods = temperature ** (2 arange(hd/4) / (hd/2))`, angles
    `2 pi coord / period` ordered `[rows (hd/4), columns (hd/4)]`, tiled twice.
    """
    if head_dim % 4:
        raise ValueError(f"DINOv3 rope needs a head dim divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    exponents = 2.0 * jnp.arange(quarter, dtype=jnp.float32) / (head_dim // 2)
    periods = jnp.power(jnp.float32(temperature), exponents)
    rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) / jnp.float32(height)
    cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) / jnp.float32(width)
    rows = jnp.broadcast_to(rows[:, None], (height, width)).reshape(-1)
    cols = jnp.broadcast_to(cols[None, :], (height, width)).reshape(-1)
    coords = 2.0 * jnp.stack([rows, cols], axis=-1) - 1.0  # (HW, 2)
    angles = jnp.float32(2 * math.pi) * coords[:, :, None] / periods[None, None, :]
    angles = jnp.tile(angles.reshape(height * width, 2 * quarter), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def _apply_rope_half(x: Array, sin: Array, cos: Array) -> Array:
    """`x cos + rotate_half(x) sin` per head (timm `apply_rot_embed_cat(half=True)`),
    `x (N, heads, hd)`, in float32, cast back."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _trunc_normal(key: PRNGKeyArray, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> Array:
    """timm's `trunc_normal_(std)`: normal(0, std) truncated to [-2, 2] (absolute bounds)."""
    return std * jr.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype or jnp.float32)


def _init_linear(layer: eqx.nn.Linear, key: PRNGKeyArray) -> eqx.nn.Linear:
    """timm Eva's Linear init: weight trunc_normal(0.02), zero bias."""
    layer = eqx.tree_at(lambda m: m.weight, layer, _trunc_normal(key, layer.weight.shape, layer.weight.dtype))
    if layer.bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.zeros_like(layer.bias))
    return layer


class LayerNorm(eqx.Module):
    """`(x - mean) / sqrt(var + eps) * weight + bias` over the last axis, statistics in
    float32 (timm `LayerNorm`, i.e. `F.layer_norm`)."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-5, dtype: Any = None):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = (centred * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        shape = (1,) * (x.ndim - 1) + self.weight.shape
        return normed * self.weight.astype(x.dtype).reshape(shape) + self.bias.astype(x.dtype).reshape(shape)


class _Conv(eqx.Module):
    """A patch convolution's weight `(D, C, p, p)` and bias `(D,)`, PyTorch's layout."""

    weight: Float[Array, "D C p p"]
    bias: Float[Array, " D"]


class PatchEmbed(eqx.Module):
    """Non-overlapping `p x p` convolution as a matmul on `(C, p, p)`-ordered patches
    (timm `PatchEmbed`, key `proj.*`); patches row-major."""

    proj: _Conv

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, dtype: Any = None, *, key: PRNGKeyArray):
        # PyTorch's Conv2d default init: uniform(+-1/sqrt(fan_in)) for weight and bias.
        kw, kb = jr.split(key)
        bound = 1.0 / math.sqrt(in_chans * patch_size * patch_size)
        dtype = dtype or jnp.float32
        shape = (embed_dim, in_chans, patch_size, patch_size)
        self.proj = _Conv(
            jr.uniform(kw, shape, dtype, -bound, bound),
            jr.uniform(kb, (embed_dim,), dtype, -bound, bound),
        )

    def __call__(self, x: Image) -> Float[Array, "L D"]:
        d, _, p, _ = self.proj.weight.shape
        return dense(patchify(x, p), self.proj.weight.reshape(d, -1), self.proj.bias)


class DINOv3Attention(eqx.Module):
    """timm `EvaAttention` as DINOv3 uses it: fused `qkv` weight with `q_bias`, a zero
    `k_bias` (not a parameter, as in timm where it is a non-persistent zero buffer) and
    `v_bias`; rope on the tokens after the `num_prefix_tokens`; no q/k norm."""

    qkv: eqx.nn.Linear
    q_bias: Float[Array, " D"]
    v_bias: Float[Array, " D"]
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    num_prefix_tokens: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, num_prefix_tokens: int, dtype: Any = None, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.qkv = _init_linear(eqx.nn.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, key=k1), k1)
        self.q_bias = jnp.zeros((dim,), dtype)
        self.v_bias = jnp.zeros((dim,), dtype)
        self.proj = _init_linear(eqx.nn.Linear(dim, dim, dtype=dtype, key=k2), k2)
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens

    def __call__(
        self, x: Float[Array, "N D"], sin: Float[Array, "L hd"], cos: Float[Array, "L hd"]
    ) -> Float[Array, "N D"]:
        n, dim = x.shape
        bias = jnp.concatenate([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias])
        qkv = keep(dense(x, self.qkv.weight, bias)).reshape(n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        npt = self.num_prefix_tokens
        q = jnp.concatenate([q[:npt], _apply_rope_half(q[npt:], sin, cos)])
        k = jnp.concatenate([k[:npt], _apply_rope_half(k[npt:], sin, cos)])
        return keep(linear(self.proj, attend(q, k, v).reshape(n, dim)))


class DINOv3Block(eqx.Module):
    """timm `EvaBlock` with layer scale: `x + gamma_1 * attn(norm1 x)`, then
    `x + gamma_2 * mlp(norm2 x)` (GELU MLP `fc1`, `fc2`)."""

    norm1: LayerNorm
    attn: DINOv3Attention
    gamma_1: Float[Array, " D"]
    norm2: LayerNorm
    mlp: PixelMLP
    gamma_2: Float[Array, " D"]

    def __init__(self, config: DINOv3Config, dtype: Any = None, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jr.split(key, 4)
        dim = config.embed_dim
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn = DINOv3Attention(dim, config.num_heads, config.num_prefix_tokens, dtype, key=k1)
        self.gamma_1 = jnp.full((dim,), 1e-5, dtype)  # timm's init_values
        self.norm2 = LayerNorm(dim, dtype=dtype)
        mlp = PixelMLP(dim, config.mlp_ratio, dtype, key=k2)
        self.mlp = eqx.tree_at(lambda m: (m.fc1, m.fc2), mlp, (_init_linear(mlp.fc1, k3), _init_linear(mlp.fc2, k4)))
        self.gamma_2 = jnp.full((dim,), 1e-5, dtype)

    def __call__(
        self, x: Float[Array, "N D"], sin: Float[Array, "L hd"], cos: Float[Array, "L hd"]
    ) -> Float[Array, "N D"]:
        x = x + self.gamma_1.astype(x.dtype)[None, :] * self.attn(self.norm1(x), sin, cos)
        return x + self.gamma_2.astype(x.dtype)[None, :] * self.mlp.apply(self.norm2(x))


def _stop_gradient(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a) if eqx.is_inexact_array(a) else a, tree)


class DINOv3(eqx.Module):
    """A frozen DINOv3 ViT (timm `vit_*_patch16_dinov3_qkvb`), one image per call, any
    resolution that is a multiple of the patch size.

    Frozen by construction: `pixeldit_eqx.trainable` leaves all its arrays out of the
    optimiser (its class sets `frozen_parameters`), and a call reads them through
    `lax.stop_gradient`, so no gradient reaches them. Weights come from a timm state dict
    (`pixeldit_eqx.load_state_dict(encoder, timm_state_dict)`); a fresh one is randomly
    initialised as timm does (layer scale 1e-5).

    **Arguments:**

    - `encoder`: a preset name (`"dinov3_vits16"`, `"dinov3_vitb16"`, `"dinov3_vitl16"`),
      a timm model name, a mapping (timm name + `kwargs` size overrides, or
      `DINOv3Config` fields) or a `DINOv3Config`.
    - `pretrained`: accepted for the reference's sake and ignored (weights come from a
      state dict).
    - `dtype`: parameter dtype; `key`: a PRNG key.

    ```python
    encoder = DINOv3("dinov3_vits16", key=jr.key(0))
    tokens = jax.vmap(encoder)(images)  # (B, 3, 256, 256) -> (B, 5 + 256, 384)
    ```
    """

    cls_token: Float[Array, "1 1 D"]
    reg_token: Float[Array, "1 R D"] | None
    patch_embed: PatchEmbed
    blocks: BlockStack[DINOv3Block]
    norm: LayerNorm
    config: DINOv3Config = eqx.field(static=True)

    frozen_parameters: ClassVar[bool] = True

    def __init__(
        self,
        encoder: "str | Mapping[str, Any] | DINOv3Config" = "dinov3_vits16",
        pretrained: bool = False,
        *,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        del pretrained  # weights come from a state dict
        config = encoder_config(encoder)
        kc, kr, kp, kb = jr.split(key, 4)
        dim = config.embed_dim
        self.cls_token = _trunc_normal(kc, (1, 1, dim), dtype)
        self.reg_token = _trunc_normal(kr, (1, config.num_reg_tokens, dim), dtype) if config.num_reg_tokens else None
        self.patch_embed = PatchEmbed(config.in_chans, dim, config.patch_size, dtype, key=kp)
        blocks = BlockStack(lambda k: DINOv3Block(config, dtype, key=k), config.depth, key=kb)
        # timm's `fix_init_weight`: block i's output projections scaled by 1/sqrt(2 (i + 1)).
        scale = 1.0 / jnp.sqrt(2.0 * jnp.arange(1, config.depth + 1, dtype=jnp.float32))[:, None, None]
        blocks = eqx.tree_at(
            lambda s: (s.blocks.attn.proj.weight, s.blocks.mlp.fc2.weight),
            blocks,
            (
                (blocks.blocks.attn.proj.weight * scale).astype(blocks.blocks.attn.proj.weight.dtype),
                (blocks.blocks.mlp.fc2.weight * scale).astype(blocks.blocks.mlp.fc2.weight.dtype),
            ),
        )
        self.blocks = blocks
        self.norm = LayerNorm(dim, dtype=dtype)
        self.config = config

    @property
    def num_prefix_tokens(self) -> int:
        """Class token + registers (5 for the released encoders)."""
        return self.config.num_prefix_tokens

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def rope_table(self, height: int, width: int) -> Float[Array, "{height*width} hd2"]:
        """timm's `rope.get_embed((height, width))`: `cat([sin, cos], -1)`, `(H*W, 2*hd)`,
        for a grid of `height x width` patches."""
        sin, cos = rope_dinov3(
            self.config.embed_dim // self.config.num_heads, height, width, self.config.rope_temperature
        )
        return jnp.concatenate([sin, cos], axis=-1)

    def __call__(self, x: Image) -> Float[Array, "N {self.config.embed_dim}"]:
        """All tokens after the final norm, `[cls, registers, patches (row-major)]` (timm
        `forward_features`); `x` is an ImageNet-normalised image `(in_chans, H, W)`."""
        config = self.config
        if x.ndim != 3 or x.shape[0] != config.in_chans:
            raise ValueError(
                f"`x`: expected one image of shape ({config.in_chans}, H, W) (batch with `jax.vmap`), "
                f"got shape {tuple(x.shape)}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`x`: expected a floating-point image, got dtype {x.dtype}.")
        gh, gw = check_image_size(x.shape[1], x.shape[2], config.patch_size)
        model = _stop_gradient(self)
        dtype = model.patch_embed.proj.weight.dtype
        patches = model.patch_embed(x.astype(dtype))
        prefix = [model.cls_token[0].astype(dtype)]
        if model.reg_token is not None:
            prefix.append(model.reg_token[0].astype(dtype))
        tokens = jnp.concatenate([*prefix, patches])
        sin, cos = rope_dinov3(config.embed_dim // config.num_heads, gh, gw, config.rope_temperature)
        tokens = model.blocks(tokens, sin, cos)
        return model.norm(tokens)

    def patch_tokens(self, x: Image) -> Float[Array, "L {self.config.embed_dim}"]:
        """The patch tokens of `__call__` (prefix tokens dropped), row-major."""
        return self(x)[self.num_prefix_tokens :]

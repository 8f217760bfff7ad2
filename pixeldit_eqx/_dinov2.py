"""DINOv2 ViT (timm's `vit_{base,large}_patch14_dinov2`): PixelDiT2's frozen REPA teacher.

Field names are timm's (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `ls1.gamma`,
...), so `pixeldit_eqx.load_state_dict` fills it from a timm state dict. The absolute position
embedding is resampled to the input's grid the way PixelDiT2's teacher does it
(`grounded_diffusion._dinov2_pos_embed`, DINOv2's own rule): bicubic with the scale factor
`(grid_out + 0.1) / grid` given to `F.interpolate`.

Reference: timm `VisionTransformer` (`Block`, `Attention`, `LayerScale`, `Mlp`, `PatchEmbed`
with `dynamic_img_size=True`) and `REPATeacher` in `c2i/src/grounded_diffusion.py`.
"""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._blocks import BlockStack
from ._checks import check_choice, check_int
from ._custom_types import Array, Float, Image
from ._resize import resize_bicubic


#: The teachers the reference offers: timm name, patch size, width, depth, heads.
DINOV2_PRESETS: dict[str, dict[str, Any]] = {
    "dinov2_vitb14": dict(timm_name="vit_base_patch14_dinov2.lvd142m", embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14": dict(timm_name="vit_large_patch14_dinov2.lvd142m", embed_dim=1024, depth=24, num_heads=16),
}

# The offset DINOv2 adds to the target grid when it resamples its position embedding.
_INTERPOLATE_OFFSET = 0.1


class LayerScale(eqx.Module):
    """`x * gamma` (timm `LayerScale`)."""

    gamma: Float[Array, " D"]

    def __init__(self, dim: int, init_values: float = 1e-5):
        self.gamma = jnp.full((dim,), init_values, dtype=jnp.float32)

    def __call__(self, x: Float[Array, "N D"]) -> Float[Array, "N D"]:
        return x * self.gamma[None, :]


class _Attention(eqx.Module):
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.proj = eqx.nn.Linear(dim, dim, key=k2)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "N D"]) -> Float[Array, "N D"]:
        n, d = x.shape
        hd = d // self.num_heads
        qkv = jax.vmap(self.qkv)(x).reshape(n, 3, self.num_heads, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, heads, hd)
        logits = jnp.einsum("qhd,khd->hqk", q * jnp.float32(hd**-0.5), k)
        out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)
        return jax.vmap(self.proj)(out.reshape(n, d))


class _Mlp(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(dim, hidden, key=k1)
        self.fc2 = eqx.nn.Linear(hidden, dim, key=k2)

    def __call__(self, x: Float[Array, "N D"]) -> Float[Array, "N D"]:
        return jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(x), approximate=False))


class _Block(eqx.Module):
    """timm `Block`: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`."""

    norm1: eqx.nn.LayerNorm
    attn: _Attention
    ls1: LayerScale
    norm2: eqx.nn.LayerNorm
    mlp: _Mlp
    ls2: LayerScale

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.norm1 = eqx.nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, key=k1)
        self.ls1 = LayerScale(dim)
        self.norm2 = eqx.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), key=k2)
        self.ls2 = LayerScale(dim)

    def __call__(self, x: Float[Array, "N D"]) -> Float[Array, "N D"]:
        x = x + self.ls1(self.attn(jax.vmap(self.norm1)(x)))
        return x + self.ls2(self.mlp(jax.vmap(self.norm2)(x)))


class _PatchEmbed(eqx.Module):
    proj: "_Conv"

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, key: PRNGKeyArray):
        self.proj = _Conv(in_channels, dim, patch_size, key=key)


class _Conv(eqx.Module):
    """A stride-`p` `p x p` convolution (torch layout `(out, in, p, p)`, bias `(out,)`)."""

    weight: Float[Array, "D C p p"]
    bias: Float[Array, " D"]

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, key: PRNGKeyArray):
        wkey, bkey = jr.split(key)
        bound = 1.0 / (in_channels * patch_size * patch_size) ** 0.5
        shape = (dim, in_channels, patch_size, patch_size)
        self.weight = jr.uniform(wkey, shape, jnp.float32, -bound, bound)
        self.bias = jr.uniform(bkey, (dim,), jnp.float32, -bound, bound)

    def __call__(self, x: Float[Array, "C H W"]) -> Float[Array, "gh gw D"]:
        d, c, p, _ = self.weight.shape
        gh, gw = x.shape[1] // p, x.shape[2] // p
        patches = x[:, : gh * p, : gw * p].reshape(c, gh, p, gw, p)
        return jnp.einsum("cipjq,dcpq->ijd", patches, self.weight) + self.bias[None, None, :]


class DINOv2(eqx.Module):
    """A DINOv2 ViT (cls token, absolute position embedding, layer scale, LayerNorm 1e-6,
    exact GELU), frozen: no gradient flows into its parameters.

    `__call__` returns the patch tokens after the final norm (`forward_features(x)[:, 1:]`)
    for an image of any size (cropped to whole patches, as the patch convolution does),
    resampling the position embedding as PixelDiT2's teacher does. The input is expected
    ImageNet-normalised.

    Reference: timm `vit_base_patch14_dinov2` / `vit_large_patch14_dinov2` with
    `dynamic_img_size=True` and `grounded_diffusion._dinov2_pos_embed`. Deviation: the
    reference passes the two scale factors in `(W, H)` order and so fails on non-square
    grids; here each axis uses its own (equal on square grids).

    **Arguments:**

    - `model_name`: `"dinov2_vitb14"` or `"dinov2_vitl14"` (the reference's
        `REPA_ENCODERS`); the sizes below override its.
    - `embed_dim`, `depth`, `num_heads`: width, blocks and heads.
    - `img_size`: the training resolution: the position embedding covers
        `(img_size // patch_size)**2` patches (518 for the released DINOv2).
    - `patch_size`, `mlp_ratio`, `in_channels`, `init_values`: as in timm.
    - `key`: a PRNG key for the random initialisation (real weights come from a state dict).
    """

    # Every array is frozen: `pixeldit_eqx.trainable` leaves them out.
    frozen_parameters: ClassVar[bool] = True

    patch_embed: _PatchEmbed
    cls_token: Float[Array, "1 1 D"]
    pos_embed: Float[Array, "1 N D"]
    blocks: BlockStack[_Block]
    norm: eqx.nn.LayerNorm
    patch_size: int = eqx.field(static=True)
    grid_size: int = eqx.field(static=True)
    embed_dim: int = eqx.field(static=True)

    def __init__(
        self,
        model_name: str = "dinov2_vitb14",
        *,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        img_size: int = 518,
        patch_size: int = 14,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        check_choice("model_name", model_name, sorted(DINOV2_PRESETS))
        preset = DINOV2_PRESETS[model_name]
        embed_dim = check_int("embed_dim", preset["embed_dim"] if embed_dim is None else embed_dim, 1)
        depth = check_int("depth", preset["depth"] if depth is None else depth, 1)
        num_heads = check_int("num_heads", preset["num_heads"] if num_heads is None else num_heads, 1)
        img_size = check_int("img_size", img_size, 1)
        patch_size = check_int("patch_size", patch_size, 1)
        if embed_dim % num_heads:
            raise ValueError(f"`embed_dim` must be a multiple of `num_heads`={num_heads}, got embed_dim={embed_dim}.")
        if img_size < patch_size:
            raise ValueError(f"`img_size` must be >= patch_size={patch_size}, got img_size={img_size}.")
        pkey, ckey, poskey, bkey = jr.split(key, 4)
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.embed_dim = embed_dim
        self.patch_embed = _PatchEmbed(in_channels, embed_dim, patch_size, key=pkey)
        self.cls_token = 1e-6 * jr.normal(ckey, (1, 1, embed_dim), jnp.float32)
        self.pos_embed = 0.02 * jr.truncated_normal(poskey, -2.0, 2.0, (1, 1 + self.grid_size**2, embed_dim))
        self.blocks = BlockStack(lambda k: _Block(embed_dim, num_heads, mlp_ratio, key=k), depth, key=bkey)
        self.norm = eqx.nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embedding(self, grid: tuple[int, int]) -> Float[Array, "N D"]:
        """`[cls + pos[0], resampled patch pos]` for a `grid = (gh, gw)` patch grid, float32:
        `_dinov2_pos_embed` applied to zeros (the patch positions resampled bicubically with
        scale factor `(g_out + 0.1) / g` when the grid is not the training grid)."""
        pos = jax.lax.stop_gradient(self.pos_embed[0]).astype(jnp.float32)
        g, d = self.grid_size, self.embed_dim
        patch = pos[1:].reshape(g, g, d).transpose(2, 0, 1)
        gh, gw = grid
        if (gh, gw) != (g, g):
            scale = ((gh + _INTERPOLATE_OFFSET) / g, (gw + _INTERPOLATE_OFFSET) / g)
            patch = resize_bicubic(patch, scale_factor=scale)
        patch = patch.transpose(1, 2, 0).reshape(gh * gw, d)
        return jnp.concatenate([pos[:1], patch])

    def __call__(self, x: Image) -> Float[Array, "L {self.embed_dim}"]:
        """The patch tokens `(gh * gw, D)` of an ImageNet-normalised image `(C, H, W)`."""
        if x.ndim != 3 or x.shape[1] < self.patch_size or x.shape[2] < self.patch_size:
            raise ValueError(
                f"`x`: expected an image (C, H, W) of at least {self.patch_size}x{self.patch_size}, got {x.shape}."
            )
        net = eqx.combine(jax.lax.stop_gradient(eqx.filter(self, eqx.is_array)), eqx.filter(self, eqx.is_array, True))
        tokens = net.patch_embed.proj(x)  # (gh, gw, D)
        gh, gw, d = tokens.shape
        tokens = jnp.concatenate([net.cls_token[0], tokens.reshape(gh * gw, d)])
        tokens = tokens + net.position_embedding((gh, gw)).astype(tokens.dtype)
        tokens = net.blocks(tokens)
        return jax.vmap(net.norm)(tokens)[1:]

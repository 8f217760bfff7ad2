"""Tokens: patch and pixel tokens of a channel-first image, class and text tokens.

References: `torch.nn.functional.unfold`/`fold` as the models use them,
`pixeldit_c2i.PixelTokenEmbedder`, `modules.PatchTokenEmbedder`, `modules.ClassEmbedder`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._custom_types import Image
from ._ops import _low_precision, linear, sincos_axes, token_wise
from .modules import RMSNorm


def check_image_size(height: int, width: int, patch_size: int, what: str = "x") -> tuple[int, int]:
    """`(H/p, W/p)`, or a `ValueError` naming `what` when a side is not a multiple of p."""
    if height < 1 or width < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"`{what}`: image height and width must be positive multiples of the patch size "
            f"{patch_size}, got (H, W) = ({height}, {width})."
        )
    return height // patch_size, width // patch_size


def patchify(x: Image, patch_size: int) -> Float[Array, "L C*{patch_size}*{patch_size}"]:
    """`(C, H, W)` -> `(L, C*p*p)`: patches row-major, each flattened channel-major
    `(C, p_row, p_col)` like PyTorch's `unfold`."""
    c, h, w = x.shape
    hs, ws = check_image_size(h, w, patch_size)
    p = patch_size
    return x.reshape(c, hs, p, ws, p).transpose(1, 3, 0, 2, 4).reshape(hs * ws, c * p * p)


def unpatchify(tokens: Float[Array, "L p2 C"], patch_size: int, height: int, width: int) -> Image:
    """Per-patch pixels `(L, p*p, C)` (row-major inside each patch) -> image `(C, H, W)`."""
    hs, ws = check_image_size(height, width, patch_size, "height/width")
    p, c = patch_size, tokens.shape[-1]
    return tokens.reshape(hs, ws, p, p, c).transpose(4, 0, 2, 1, 3).reshape(c, height, width)


class PatchEmbedder(eqx.Module):
    """Linear patch embedding `C*p*p -> D`; xavier-uniform weight, zero bias.

    Reference: `modules.PatchTokenEmbedder` as `s_embedder` (key `proj.*`).

    **Arguments:**

    - `in_features`: the patch's flattened size `C*p*p`.
    - `hidden_size`: the token width `D`.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    proj: eqx.nn.Linear

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        proj = eqx.nn.Linear(in_features, hidden_size, dtype=dtype, key=key)
        weight = jax.nn.initializers.glorot_uniform()(key, proj.weight.shape, proj.weight.dtype)
        self.proj = eqx.tree_at(lambda m: (m.weight, m.bias), proj, (weight, jnp.zeros(hidden_size, proj.weight.dtype)))

    def __call__(self, patches: Float[Array, "L in"]) -> Float[Array, "L D"]:
        """Patch vectors `(L, C*p*p)` (see `patchify`) -> patch tokens `(L, D)`."""
        return token_wise(self.proj, patches)


def _few_channel_linear(layer: eqx.nn.Linear, x: Array) -> Array:
    """`linear(layer, x)` for a handful of input features, as elementwise
    multiply-adds: a matmul with K = 3 runs at a few percent of the matmul rate, while
    this fuses into one pass over the output.

    bf16 (or f16) inputs are summed in float32 and rounded once after the bias, as
    `dense` does: a chain of bf16 multiply-adds would round after each, and its
    weight gradients would be sums of bf16-rounded products."""
    weight, bias, dtype = layer.weight, layer.bias, x.dtype
    low = _low_precision(*(a for a in (x, weight, bias) if a is not None))
    if low:
        x, weight = x.astype(jnp.float32), weight.astype(jnp.float32)
        bias = None if bias is None else bias.astype(jnp.float32)
    shape = (1,) * (x.ndim - 1) + (weight.shape[0],)
    out = x[..., 0:1] * weight[:, 0].reshape(shape)
    for i in range(1, x.shape[-1]):
        out = out + x[..., i : i + 1] * weight[:, i].reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out.astype(dtype) if low else out


class PixelEmbedder(eqx.Module):
    """Per-pixel Linear `C -> D_pix` (+ the 2D sincos table), grouped per patch.

    Reference: `pixeldit_c2i.PixelTokenEmbedder` (key `proj.*`). Returns
    `(L, p*p, D_pix)`, patches row-major, pixels row-major inside each patch.

    **Arguments:**

    - `in_channels`: the image channels `C`.
    - `pixel_size`: the pixel token width `D_pix`.
    - `use_abs_pos`: add the 2D sincos table over the image's pixels (computed per call).
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    proj: eqx.nn.Linear
    use_abs_pos: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        pixel_size: int,
        use_abs_pos: bool = True,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        if use_abs_pos and pixel_size % 4:
            raise ValueError(f"`pixel_hidden_size` must be divisible by 4 for the sincos table, got {pixel_size}.")
        self.proj = eqx.nn.Linear(in_channels, pixel_size, dtype=dtype, key=key)
        self.use_abs_pos = use_abs_pos

    def __call__(self, x: Image, patch_size: int) -> Float[Array, "L {patch_size*patch_size} D_pix"]:
        """An image `(C, H, W)` -> pixel tokens grouped per patch, `(L, p*p, D_pix)`."""
        c, h, w = x.shape
        hs, ws = check_image_size(h, w, patch_size)
        p = patch_size
        # Group the pixels per patch before embedding them: the transpose then moves
        # the C input channels of each pixel rather than its D_pix features.
        pixels = x.reshape(c, hs, p, ws, p).transpose(1, 3, 2, 4, 0).reshape(hs * ws, p * p, c)
        pix = _few_channel_linear(self.proj, pixels) if c <= 4 else linear(self.proj, pixels)
        if self.use_abs_pos:
            # The table's rows for the same pixels, in the same (patch, pixel) order,
            # assembled from its per-column and per-row halves.
            d = pix.shape[-1]
            col, row = sincos_axes(d, h, w)
            grid = (hs, ws, p, p, d // 2)
            col = jnp.broadcast_to(col.reshape(1, ws, 1, p, d // 2), grid)
            row = jnp.broadcast_to(row.reshape(hs, 1, p, 1, d // 2), grid)
            table = jnp.concatenate([col, row], axis=-1).reshape(hs * ws, p * p, d)
            pix = pix + table.astype(pix.dtype)
        return pix


class ClassEmbedder(eqx.Module):
    """Class-label table with one extra row, label `num_classes`, the null class.

    Reference: `modules.ClassEmbedder(num_classes + 1, D)` (key `embedding_table.weight`),
    initialised normal(0.02).

    **Arguments:**

    - `num_classes`: the number of real classes (the table has `num_classes + 1` rows).
    - `hidden_size`: the embedding width `D`.
    - `dtype`: the table's dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    embedding_table: eqx.nn.Embedding

    def __init__(
        self,
        num_classes: int,
        hidden_size: int,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        weight = 0.02 * jr.normal(key, (num_classes + 1, hidden_size), dtype=dtype or jnp.float32)
        self.embedding_table = eqx.nn.Embedding(weight=weight)

    def __call__(self, label: Int[Array, ""]) -> Float[Array, " D"]:
        """The embedding of one class label (`num_classes` is the null class)."""
        return self.embedding_table(label)


class TextEmbedder(eqx.Module):
    """Text embedding `norm(proj(text))`: Linear `txt -> D` then RMSNorm.

    Reference: `modules.PatchTokenEmbedder(txt_dim, D, norm_layer=RMSNorm)` as the
    t2i `y_embedder` (keys `proj.*`, `norm.weight`).

    **Arguments:**

    - `text_dim`: the width of the text encoder's embeddings.
    - `hidden_size`: the token width `D`.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    proj: eqx.nn.Linear
    norm: RMSNorm

    def __init__(self, text_dim: int, hidden_size: int, dtype: Any = None, *, key: PRNGKeyArray):
        self.proj = eqx.nn.Linear(text_dim, hidden_size, dtype=dtype, key=key)
        self.norm = RMSNorm(hidden_size, dtype=dtype)

    def __call__(self, text: Float[Array, "T txt"]) -> Float[Array, "T D"]:
        """Text embeddings `(T, txt)` -> text tokens `(T, D)`."""
        return self.norm.apply(linear(self.proj, text))

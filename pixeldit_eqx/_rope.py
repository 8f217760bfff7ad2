"""Rotary position tables (reference `modules.precompute_freqs_cis_2d`,
`PixDiT_T2I.fetch_pos_text`) and their application (`modules.apply_rotary_emb`).

Tables are angles `(N, hd/2)` (the reference stores `exp(i angle)`), computed with
`jnp` from static ints so that any grid works and nothing is baked into programs.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._linspace import torch_linspace


def rope_2d(
    head_dim: int, height: int, width: int, theta: float = 10000.0, scale: float = 16.0
) -> Float[Array, "{height*width} {head_dim//2}"]:
    """Axial 2D rope angles on fractional positions `linspace(0, scale, n)`.

    Rows are the `height*width` grid positions, row-major over (y, x). Pair `j` of the
    head dim turns by `x * f[j//2]` when `j` is even and `y * f[j//2]` when odd, with
    `f = 1/theta^(arange(0, hd, 4)[:hd//4] / hd)`.
    """
    if head_dim % 4:
        raise ValueError(f"2D rope needs a head dim divisible by 4, got head_dim={head_dim}.")
    x = torch_linspace(0.0, scale, width)
    y = torch_linspace(0.0, scale, height)
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32)[: head_dim // 4] / head_dim))
    x_ang = jnp.tile(x, height)[:, None] * freqs[None, :]
    y_ang = jnp.repeat(y, width)[:, None] * freqs[None, :]
    return jnp.stack([x_ang, y_ang], axis=-1).reshape(height * width, head_dim // 2)


def rope_1d(head_dim: int, length: int, theta: float = 10000.0) -> Float[Array, "{length} {head_dim//2}"]:
    """1D rope angles on integer positions `0..length-1`, `f = 1/theta^(arange(0, hd, 2)/hd)`."""
    if head_dim % 2:
        raise ValueError(f"1D rope needs an even head dim, got head_dim={head_dim}.")
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]


def apply_rope(x: Float[Array, "N heads hd"], angles: Float[Array, "N hd//2"]) -> Float[Array, "N heads hd"]:
    """Rotate consecutive pairs `(x[2j], x[2j+1])` by `angles[:, j]`, in float32, cast back.

    Computed as `x * c + swap(x) * s`, with `swap` exchanging the two numbers of every
    pair, `c = (cos, cos)` and `s = (-sin, sin)` per pair: the same products and sums
    as the complex rotation (bit for bit), but without splitting and re-stacking the
    pairs, and with the cosines and sines computed once per table (`N * hd/2` of each)
    rather than once per head.
    """
    n, heads, hd = x.shape
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    c = jnp.stack([cos, cos], axis=-1).reshape(n, 1, hd)
    s = jnp.stack([-sin, sin], axis=-1).reshape(n, 1, hd)
    # Materialise the two small tables, so that the compiler does not fuse (and repeat)
    # the cosines and sines into every element of the rotation.
    c, s = jax.lax.optimization_barrier((c, s))
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(n, heads, hd // 2, 2), axis=-1).reshape(n, heads, hd)
    return (x32 * c + swapped * s).astype(x.dtype)

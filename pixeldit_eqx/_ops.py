"""The operations the layers are made of, shared by every file of the package:
Linears as one matmul on the last axis (`linear`, `dense`), the residual names the
scanned stacks keep (`keep`), activations (`gelu`, `silu_gate`) and the sincos tables.
"""

import math
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from ._dots import lowp_dot, rows_dot


# ---------------------------------------------------------------------------------------
# Sinusoidal tables
# ---------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """`[sin(pos w), cos(pos w)]` with `w = 1/10000^(arange(D/2)/(D/2))`, float64 numpy.

    Reference: `modules.get_1d_sincos_pos_embed_from_grid`; `pos` of any shape is
    flattened to `(M,)`; returns `(M, embed_dim)`.
    """
    if embed_dim % 2:
        raise ValueError(f"`embed_dim` must be even, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """2D table from a `(2, ...)` grid: first half encodes `grid[0]`, second `grid[1]`."""
    if embed_dim % 2:
        raise ValueError(f"`embed_dim` must be even, got {embed_dim}.")
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def sincos_2d(embed_dim: int, h: int, w: int) -> Float[Array, "{h*w} {embed_dim}"]:
    """`jnp` twin of `get_2d_sincos_pos_embed`, computed per call in float32.

    Deliberate deviation: the reference computes in float64 and casts; float32 here
    (JAX's default precision) differs by at most a few ulp of the arguments.
    """
    col, row = sincos_axes(embed_dim, h, w)
    half = embed_dim // 2
    cols = jnp.broadcast_to(col[None, :, :], (h, w, half))
    rows = jnp.broadcast_to(row[:, None, :], (h, w, half))
    return jnp.concatenate([cols, rows], axis=-1).reshape(h * w, embed_dim)


def sincos_axes(
    embed_dim: int, h: int, w: int
) -> tuple[Float[Array, "{w} {embed_dim//2}"], Float[Array, "{h} {embed_dim//2}"]]:
    """The two halves of the 2D sincos table: `[sin, cos]` of the column index (first
    half of every row of the table) and of the row index (second half), float32.

    The table's row for the pixel at `(r, c)` is `concat(col[c], row[r])`; building a
    table in any pixel order from these costs `(h + w) * D/2` sines and cosines rather
    than `h * w * D`.
    """
    if embed_dim % 4:
        raise ValueError(f"`embed_dim` must be divisible by 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def embed(n):
        out = jnp.arange(n, dtype=jnp.float32)[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)

    return embed(w), embed(h)


# ---------------------------------------------------------------------------------------
# Linears, residual names, activations
# ---------------------------------------------------------------------------------------


def zero_linear(linear: eqx.nn.Linear) -> eqx.nn.Linear:
    """The same Linear with weight (and bias) set to zero."""
    linear = eqx.tree_at(lambda m: m.weight, linear, jnp.zeros_like(linear.weight))
    if linear.bias is not None:
        linear = eqx.tree_at(lambda m: m.bias, linear, jnp.zeros_like(linear.bias))
    return linear


def _float_bits(*xs: Array) -> int | None:
    """The width of the one floating dtype all of `xs` share; None if they do not share one."""
    dtype = xs[0].dtype
    if all(x.dtype == dtype for x in xs) and jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return None


def _low_precision(*xs: Array) -> bool:
    """All of `xs` share one floating dtype narrower than float32 (bf16, f16)."""
    bits = _float_bits(*xs)
    return bits is not None and bits < 32


def linear(layer: eqx.nn.Linear, x: Float[Array, "*batch d_in"], dtype: Any = None) -> Float[Array, "*batch d_out"]:
    """`layer` applied to the last axis of `x`, any leading axes, as one matmul, with
    its output in `dtype` (default: the inputs'; a wider one costs nothing, the matmul
    accumulates in it anyway, and skips one rounding).

    The same numbers as `jax.vmap(layer)`, but `x @ W^T` is contracted on the last
    axis so the result keeps the row-major `(..., out)` layout: a vmapped matrix-vector
    product lowers to `W @ X^T` and pays a transpose of every activation.
    """
    return dense(x, layer.weight, layer.bias, dtype)


def dense(
    x: Float[Array, "*batch d_in"],
    weight: Float[Array, "d_out d_in"],
    bias: Float[Array, " d_out"] | None,
    dtype: Any = None,
) -> Float[Array, "*batch d_out"]:
    """`x @ weight^T + bias` on the last axis of `x`: `linear` for a weight and bias
    that are not held by an `eqx.nn.Linear` (e.g. a row-permuted view of one)."""
    # A bf16 (or f16) matmul accumulates and returns float32, rounded once to the
    # inputs' dtype after the bias: XLA:CPU runs bf16 x bf16 -> float32 dots on the
    # CPU's bf16 dot instructions, but bf16 x bf16 -> bf16 ones on a slow path
    # (`tests/benchmarks/bf16_dots.py`), and `lowp_dot` keeps the backward matmuls bf16
    # too. Deliberate deviation from rounding the product and then the sum with the
    # bias: one rounding instead of two (`test_precision.py::test_low_precision_dense_rounds_once`).
    # A float32 (or float64) one is `rows_dot`: under `jax.vmap` its weight gradient is one
    # matmul contracting a single axis, which XLA:CPU does without transposing the
    # cotangent (`_dots`). Same values forward; the weight gradient summed in another order.
    dims = ((x.ndim - 1,), (1,))
    bits = _float_bits(x, weight)
    low = dtype is None and bits is not None and bits < 32
    if low:
        out = lowp_dot(x, weight, dims)
    elif bits is not None and bits >= 32 and (dtype is None or jnp.dtype(dtype) == x.dtype):
        out = rows_dot(x, weight, dims)
    else:
        out = jax.lax.dot_general(x, weight, (dims, ((), ())), preferred_element_type=dtype)
    if bias is not None:
        out = out + bias.astype(out.dtype).reshape((1,) * (out.ndim - 1) + bias.shape)
    return out.astype(x.dtype) if low else out


RESIDUAL = "pixeldit_residual"
# The kept values that are wider than the block's stream (the per-pixel adaLN
# modulation, the SwiGLU hidden layers): `checkpoint="lean"` recomputes them.
WIDE_RESIDUAL = "pixeldit_wide_residual"


def keep(x: Array, wide: bool = False) -> Array:
    """Name `x` as a residual that `BlockStack` keeps for the backward pass.

    An identity (`jax.ad_checkpoint.checkpoint_name`); it only matters inside a
    `jax.checkpoint` whose policy saves this name. Everything a block does not `keep`
    is recomputed in the backward pass from the kept values: elementwise work and the
    tiny per-pixel matmuls, which cost more memory to store than time to redo.
    `wide=True` marks a matmul output wider than the stream it came from, which
    `checkpoint="lean"` recomputes (one more matmul) instead of keeping.
    """
    return checkpoint_name(x, WIDE_RESIDUAL if wide else RESIDUAL)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, `x/2 * (1 + erf(x/sqrt 2))`, the reference's `nn.GELU()`.

    Equal to `jax.nn.gelu(x, approximate=False)` (which goes through `erfc`, a
    two-branch approximation that costs several times more on CPU) to float rounding.
    A bf16 (or f16) `x` is evaluated in float32 and rounded once, as PyTorch's
    kernels do; XLA:CPU would otherwise round every intermediate, and take longer.
    """
    if _low_precision(x):
        return _gelu(x.astype(jnp.float32)).astype(x.dtype)
    return _gelu(x)


def _gelu(x: Array) -> Array:
    half = jnp.asarray(0.5, x.dtype)
    return half * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


def silu_gate(gate: Float[Array, "*shape"], value: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`silu(gate) * value`, SwiGLU's gating (reference `modules.FeedForward`:
    `F.silu(w1(x)) * w3(x)`), equal to `jax.nn.silu(gate) * value`.

    Only its derivative is written out, so that the backward pass ends each cotangent
    with a division: `d_gate = ct * value * (1 + gate * (1 - s)) / (1 + e)` and
    `d_value = ct * gate / (1 + e)` (`e = exp(-gate)`, `s = 1 / (1 + e)`). XLA then
    computes them once, row-major, and transposes the result for the weight
    gradients; with autodiff's products it re-derives them inside the transposing copy,
    a slow loop on CPU (`nox -s bench` measures a scanned SwiGLU stack's
    forward+backward both ways; `docs/performance.md` records the result).
    The same values up to float rounding; forward, reverse and higher-order autodiff
    all go through it. bf16 (or f16) operands are evaluated in float32 and the product
    rounded once, like `gelu` (deliberate deviation: under autocast PyTorch rounds the
    SiLU and then the product, twice; `test_modules.py::test_low_precision_activations_round_once`).
    """
    if _low_precision(gate, value):
        return _silu_gate(gate.astype(jnp.float32), value.astype(jnp.float32)).astype(gate.dtype)
    return _silu_gate(gate, value)


@jax.custom_jvp
def _silu_gate(gate: Array, value: Array) -> Array:
    return jax.nn.silu(gate) * value


@_silu_gate.defjvp
def _silu_gate_jvp(primals, tangents):
    gate, value = primals
    d_gate, d_value = tangents
    one_e = 1 + jnp.exp(-gate)  # inf for very negative gates: the divisions give 0
    s = 1 / one_e
    # Divide first, so that the transposes (the cotangents) end with the division.
    tangent = (d_gate / one_e) * (value * (1 + gate * (1 - s))) + (d_value / one_e) * gate
    return _silu_gate(gate, value), tangent


def token_wise(layer: Callable[..., Array], x: Array) -> Array:
    """Apply a one-vector layer to every vector of `x` (all leading axes).

    Linears and the layers of `modules` with an `apply` method run as whole-array
    operations on the last axis; anything else is `vmap`ped over the flattened rows.
    """
    if isinstance(layer, eqx.nn.Linear):
        return linear(layer, x)
    apply = getattr(layer, "apply", None)
    if callable(apply):  # `RMSNorm`, `SwiGLU`, `PixelMLP`, `FinalLayer`
        return cast(Array, apply(x))
    flat = x.reshape(-1, x.shape[-1])
    out = jax.vmap(layer)(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])

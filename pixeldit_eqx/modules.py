"""PixelDiT's building blocks (reference `pixdit_core/modules.py`), one example per call.

Token-wise layers take one vector `(dim,)` like `eqx.nn.Linear`; batch them with
`jax.vmap`. Parameters live in the `dtype` given at construction (float32 by default);
the timestep sinusoid and RMSNorm statistics are always computed in float32.
"""

import math
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from ._custom_types import TimeLike
from ._lowp import lowp_dot


__all__ = [
    "Buffer",
    "FinalLayer",
    "PixelMLP",
    "RMSNorm",
    "SwiGLU",
    "TimestepConditioner",
    "cast_params",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "get_2d_sincos_pos_embed_from_grid",
    "silu_gate",
    "sincos_2d",
    "timestep_embedding",
    "trainable",
]


# ---------------------------------------------------------------------------------------
# Non-trainable state
# ---------------------------------------------------------------------------------------


class Buffer(eqx.Module):
    """A non-trainable array: read through `lax.stop_gradient`, skipped by `trainable`
    and by `cast_params`, kept by `eqx.tree_serialise_leaves`.

    **Arguments:**

    - `array`: the array to hold.

    Read it as `buffer.value`.
    """

    array: Array

    def __init__(self, array: ArrayLike):
        self.array = jnp.asarray(array)

    @property
    def value(self) -> Array:
        return jax.lax.stop_gradient(self.array)


def _is_buffer(x: Any) -> bool:
    return isinstance(x, Buffer)


def _is_frozen(x: Any) -> bool:
    """A `Buffer`, or a module whose class declares all its arrays frozen
    (`frozen_parameters = True`, e.g. the grounding encoder `DINOv3`)."""
    return _is_buffer(x) or getattr(type(x), "frozen_parameters", False) is True


def trainable(tree: PyTree) -> PyTree[bool]:
    """Filter spec for `eqx.partition`: True on inexact arrays, False inside `Buffer`s
    and inside frozen modules (those whose class sets `frozen_parameters = True`).

    ```python
    params, static = eqx.partition(model, pixeldit_eqx.trainable(model))
    ```
    """

    def spec(x):
        if _is_frozen(x):
            return jax.tree.map(lambda _: False, x)
        return eqx.is_inexact_array(x)

    return jax.tree.map(spec, tree, is_leaf=_is_frozen)


def cast_params(tree: PyTree, dtype: Any) -> PyTree:
    """Cast every floating array of `tree` to `dtype`, leaving `Buffer`s untouched.

    Integer arrays (and PRNG keys) keep their dtype.
    """

    def cast(x):
        if _is_buffer(x):
            return x
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree, is_leaf=_is_buffer)


# ---------------------------------------------------------------------------------------
# Sinusoidal embeddings
# ---------------------------------------------------------------------------------------


def timestep_embedding(t: TimeLike, dim: int, max_period: float = 10.0) -> Float[Array, " {dim}"]:
    """Sinusoidal embedding of a scalar time, `[cos(t f), sin(t f)]`, always float32.

    Reference: `TimestepConditioner.timestep_embedding`. Frequencies are
    `exp(-ln(max_period) * arange(dim//2) / (dim//2))` (max_period 10, no x1000 time
    scaling); an odd `dim` appends one zero.
    """
    if dim < 1:
        raise ValueError(f"timestep_embedding: `dim` must be >= 1, got {dim}.")
    half = dim // 2
    t = jnp.asarray(t, dtype=jnp.float32)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)])
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((1,), jnp.float32)])
    return emb


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


def get_2d_sincos_pos_embed(embed_dim: int, h: int, w: int | None = None) -> np.ndarray:
    """The 2D sincos table `(h*w, embed_dim)` as float32 numpy, rows row-major over (h, w).

    Reference: `modules.get_2d_sincos_pos_embed` (square, `w=None`) and the pixel
    embedder's non-square grid. The grid is `meshgrid(arange(w), arange(h))`, w first:
    the first half of each row encodes the column, the second half the row.
    Inside a model use `sincos_2d`, its `jnp` twin, so no table is baked into programs.
    """
    w = h if w is None else w
    if embed_dim % 4:
        raise ValueError(f"`embed_dim` must be divisible by 4, got {embed_dim}.")
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid).astype(np.float32)


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
# Layers
# ---------------------------------------------------------------------------------------


def _normal_weight(linear: eqx.nn.Linear, std: float, key: PRNGKeyArray) -> eqx.nn.Linear:
    w = std * jr.normal(key, linear.weight.shape, linear.weight.dtype)
    return eqx.tree_at(lambda m: m.weight, linear, w)


def zero_linear(linear: eqx.nn.Linear) -> eqx.nn.Linear:
    """The same Linear with weight (and bias) set to zero."""
    linear = eqx.tree_at(lambda m: m.weight, linear, jnp.zeros_like(linear.weight))
    if linear.bias is not None:
        linear = eqx.tree_at(lambda m: m.bias, linear, jnp.zeros_like(linear.bias))
    return linear


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
    # CPU's bf16 dot instructions, but bf16 x bf16 -> bf16 ones on a slow path (a
    # 2048 matmul at ~1/6 the rate; `tests/benchmarks/bf16_dots.py`), and `lowp_dot`
    # keeps the backward matmuls bf16 too. Deliberate deviation from rounding the
    # product and then the sum with the bias: one rounding instead of two
    # (`test_precision.py::test_low_precision_dense_rounds_once`).
    low = dtype is None and x.dtype == weight.dtype and jnp.finfo(x.dtype).bits < 32
    if low:
        out = lowp_dot(x, weight, ((x.ndim - 1,), (1,)))
    else:
        out = jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=dtype)
    if bias is not None:
        out = out + bias.astype(out.dtype).reshape((1,) * (out.ndim - 1) + bias.shape)
    return out.astype(x.dtype) if low else out


RESIDUAL = "pixeldit_residual"


def keep(x: Array) -> Array:
    """Name `x` as a residual that `BlockStack` keeps for the backward pass.

    An identity (`jax.ad_checkpoint.checkpoint_name`); it only matters inside a
    `jax.checkpoint` whose policy saves this name. Everything a block does not `keep`
    is recomputed in the backward pass from the kept values: elementwise work and the
    tiny per-pixel matmuls, which cost more memory to store than time to redo.
    """
    return checkpoint_name(x, RESIDUAL)


def _rms_normalise(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm over the last axis of `x` (any leading axes), statistics in float32."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(ms + eps)).astype(x.dtype)
    return weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + weight.shape) * normed


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, `x/2 * (1 + erf(x/sqrt 2))`, the reference's `nn.GELU()`.

    Equal to `jax.nn.gelu(x, approximate=False)` (which goes through `erfc`, a
    two-branch approximation that costs several times more on CPU) to float rounding.
    """
    half = jnp.asarray(0.5, x.dtype)
    return half * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


@jax.custom_jvp
def silu_gate(gate: Float[Array, "*shape"], value: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`silu(gate) * value`, SwiGLU's gating (reference `modules.FeedForward`:
    `F.silu(w1(x)) * w3(x)`), equal to `jax.nn.silu(gate) * value`.

    Only its derivative is written out, so that the backward pass ends each cotangent
    with a division: `d_gate = ct * value * (1 + gate * (1 - s)) / (1 + e)` and
    `d_value = ct * gate / (1 + e)` (`e = exp(-gate)`, `s = 1 / (1 + e)`). XLA then
    computes them once, row-major, and transposes the result for the weight
    gradients; with autodiff's products it re-derives them inside the transposing copy,
    a slow loop on CPU (`nox -s bench` measures a scanned SwiGLU stack's
    forward+backward 1.3x faster).
    The same values up to float rounding; forward, reverse and higher-order autodiff
    all go through it.
    """
    return jax.nn.silu(gate) * value


@silu_gate.defjvp
def _silu_gate_jvp(primals, tangents):
    gate, value = primals
    d_gate, d_value = tangents
    one_e = 1 + jnp.exp(-gate)  # inf for very negative gates: the divisions give 0
    s = 1 / one_e
    # Divide first, so that the transposes (the cotangents) end with the division.
    tangent = (d_gate / one_e) * (value * (1 + gate * (1 - s))) + (d_value / one_e) * gate
    return silu_gate(gate, value), tangent


class RMSNorm(eqx.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, statistics in float32.

    Reference: `modules.RMSNorm`. The normalised vector is cast back to the input dtype
    before the weight; the weight is cast to the input dtype too (explicit policy: the
    output has the input's dtype, where PyTorch would promote bf16 x fp32 to fp32).
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-6, dtype: Any = None):
        if dim < 1:
            raise ValueError(f"RMSNorm: `dim` must be >= 1, got {dim}.")
        self.weight = jnp.ones((dim,), dtype=dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """One vector `(dim,)`, RMS-normalised (statistics in float32) and scaled by `weight`."""
        return _rms_normalise(x, self.weight, self.eps)

    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """`__call__` on every vector of `x` (last axis), without `vmap`."""
        return _rms_normalise(x, self.weight, self.eps)


class SwiGLU(eqx.Module):
    """Gated feed-forward `w2(silu(w1 x) * w3 x)`, no biases.

    Reference: `modules.FeedForward(dim, int(dim * mlp_ratio))`, whose hidden width is
    `int(2 * int(dim * mlp_ratio) / 3)`.
    """

    w1: eqx.nn.Linear
    w2: eqx.nn.Linear
    w3: eqx.nn.Linear

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dtype: Any = None, *, key: PRNGKeyArray):
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        if dim < 1 or hidden < 1:
            raise ValueError(
                f"SwiGLU: need `dim` >= 1 and a positive hidden width, got dim={dim}, mlp_ratio={mlp_ratio}."
            )
        k1, k2, k3 = jr.split(key, 3)
        self.w1 = eqx.nn.Linear(dim, hidden, use_bias=False, dtype=dtype, key=k1)
        self.w2 = eqx.nn.Linear(hidden, dim, use_bias=False, dtype=dtype, key=k2)
        self.w3 = eqx.nn.Linear(dim, hidden, use_bias=False, dtype=dtype, key=k3)

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """One vector `(dim,)` through `w2(silu(w1 x) * w3 x)`."""
        return self.apply(x)

    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """`__call__` on every vector of `x` (last axis), as whole-array matmuls."""
        gate, value = keep(linear(self.w1, x)), keep(linear(self.w3, x))
        return keep(linear(self.w2, silu_gate(gate, value)))


class PixelMLP(eqx.Module):
    """`fc2(gelu(fc1 x))` with exact (erf) GELU, both Linears biased.

    Reference: `modules.MLP(dim, mlp_ratio)` (dropout 0).
    """

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dtype: Any = None, *, key: PRNGKeyArray):
        hidden = int(dim * mlp_ratio)
        if dim < 1 or hidden < 1:
            raise ValueError(
                f"PixelMLP: need `dim` >= 1 and a positive hidden width, got dim={dim}, mlp_ratio={mlp_ratio}."
            )
        k1, k2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(dim, hidden, dtype=dtype, key=k1)
        self.fc2 = eqx.nn.Linear(hidden, dim, dtype=dtype, key=k2)

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """One vector `(dim,)` through `fc2(gelu(fc1 x))`."""
        return self.apply(x)

    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """`__call__` on every vector of `x` (last axis), as whole-array matmuls."""
        return linear(self.fc2, gelu(linear(self.fc1, x)))


class TimestepConditioner(eqx.Module):
    """Scalar time -> `(hidden_size,)`: float32 sinusoid, then Linear, SiLU, Linear.

    Reference: `modules.TimestepConditioner` (keys `mlp.0.*`, `mlp.2.*`); weights
    normal(0.02), default biases.
    """

    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    freq_dim: int = eqx.field(static=True)

    _torch_names: ClassVar[dict[str, str]] = {"linear1": "mlp.0", "linear2": "mlp.2"}

    def __init__(
        self,
        hidden_size: int,
        freq_dim: int = 256,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        if hidden_size < 1 or freq_dim < 1:
            raise ValueError(
                f"TimestepConditioner: `hidden_size` and `freq_dim` must be >= 1, got {hidden_size} and {freq_dim}."
            )
        k1, k2, k3, k4 = jr.split(key, 4)
        self.linear1 = _normal_weight(eqx.nn.Linear(freq_dim, hidden_size, dtype=dtype, key=k1), 0.02, k2)
        self.linear2 = _normal_weight(eqx.nn.Linear(hidden_size, hidden_size, dtype=dtype, key=k3), 0.02, k4)
        self.freq_dim = freq_dim

    def __call__(self, t: TimeLike) -> Float[Array, " hidden"]:
        """A scalar time -> its conditioning vector `(hidden_size,)`."""
        emb = timestep_embedding(t, self.freq_dim).astype(self.linear1.weight.dtype)
        return self.linear2(jax.nn.silu(self.linear1(emb)))


class FinalLayer(eqx.Module):
    """RMSNorm then a zero-initialised biased Linear: the model outputs zero at init.

    Reference: `modules.FinalLayer` (keys `norm.weight`, `linear.*`).
    """

    norm: RMSNorm
    linear: eqx.nn.Linear

    def __init__(
        self,
        hidden_size: int,
        out_channels: int,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        if hidden_size < 1 or out_channels < 1:
            raise ValueError(
                f"FinalLayer: `hidden_size` and `out_channels` must be >= 1, got {hidden_size} and {out_channels}."
            )
        self.norm = RMSNorm(hidden_size, dtype=dtype)
        self.linear = zero_linear(eqx.nn.Linear(hidden_size, out_channels, dtype=dtype, key=key))

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " out"]:
        """One vector `(dim,)` -> `(out,)`: RMSNorm then the Linear."""
        return self.apply(x)

    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch out"]:
        """`__call__` on every vector of `x` (last axis), without `vmap`."""
        return linear(self.linear, self.norm.apply(x))


def token_wise(layer: Callable[..., Array], x: Array) -> Array:
    """Apply a one-vector layer to every vector of `x` (all leading axes).

    Linears and the layers of this module with an `apply` method run as whole-array
    operations on the last axis; anything else is `vmap`ped over the flattened rows.
    """
    if isinstance(layer, eqx.nn.Linear):
        return linear(layer, x)
    if isinstance(layer, RMSNorm | SwiGLU | PixelMLP | FinalLayer):
        return layer.apply(x)
    flat = x.reshape(-1, x.shape[-1])
    out = jax.vmap(layer)(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])

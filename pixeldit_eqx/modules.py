"""PixelDiT's building blocks (reference `pixdit_core/modules.py`), one example per call.

Token-wise layers take one vector `(dim,)` like `eqx.nn.Linear`; batch them with
`jax.vmap`. Parameters live in the `dtype` given at construction (float32 by default);
the timestep sinusoid and RMSNorm statistics are always computed in float32.
"""

import math
import warnings
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from . import _ops
from ._custom_types import TimeLike
from ._ops import gelu, keep, linear, zero_linear


__all__ = [
    "Buffer",
    "FinalLayer",
    "PixelMLP",
    "RMSNorm",
    "SwiGLU",
    "TimestepConditioner",
    "cast_params",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
    "trainable",
]

# Names this module exported before they moved to the private `_ops`; reading one
# warns and returns it (they will go in a later release).
_MOVED = ("get_1d_sincos_pos_embed_from_grid", "get_2d_sincos_pos_embed_from_grid", "silu_gate", "sincos_2d")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"`pixeldit_eqx.modules.{name}` is internal now and will be removed; copy it if you need it.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def get_2d_sincos_pos_embed(embed_dim: int, h: int, w: int | None = None) -> np.ndarray:
    """The 2D sincos table `(h*w, embed_dim)` as float32 numpy, rows row-major over (h, w).

    Reference: `modules.get_2d_sincos_pos_embed` (square, `w=None`) and the pixel
    embedder's non-square grid. The grid is `meshgrid(arange(w), arange(h))`, w first:
    the first half of each row encodes the column, the second half the row.
    Inside a model the package uses its `jnp` twin (`_ops.sincos_2d`, `_ops.sincos_axes`), so no table is baked into programs.
    """
    w = h if w is None else w
    if embed_dim % 4:
        raise ValueError(f"`embed_dim` must be divisible by 4, got {embed_dim}.")
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))
    return _ops.get_2d_sincos_pos_embed_from_grid(embed_dim, grid).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------


def _normal_weight(linear: eqx.nn.Linear, std: float, key: PRNGKeyArray) -> eqx.nn.Linear:
    w = std * jr.normal(key, linear.weight.shape, linear.weight.dtype)
    return eqx.tree_at(lambda m: m.weight, linear, w)


def _rms_normalise(x: Array, weight: Array, eps: float, low_precision_out: Any = None) -> Array:
    """RMSNorm over the last axis of `x` (any leading axes), statistics in float32; for a
    bf16 (f16) `x`, `low_precision_out=jnp.float32` returns the weight's float32 product
    unrounded (for a float32 op that follows, e.g. rope)."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(ms + eps)).astype(x.dtype)
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)
    if _ops._low_precision(x):
        # bf16 (f16): the product in float32 (as the reference's promotion to a float32
        # weight has it), rounded once to x's dtype. For a weight of x's dtype the values
        # are those of the bf16 product; the weight's gradient then sums float32
        # products, where bf16 autodiff would round each product first (and XLA:CPU
        # sums those in a slow tree of reduce-windows).
        return (normed.astype(jnp.float32) * weight.astype(jnp.float32)).astype(low_precision_out or x.dtype)
    return weight.astype(x.dtype) * normed


class RMSNorm(eqx.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, statistics in float32.

    Reference: `modules.RMSNorm`. The normalised vector is cast back to the input dtype
    before the weight; the weight is cast to the input dtype too (explicit policy: the
    output has the input's dtype, where PyTorch would promote bf16 x fp32 to fp32).

    **Arguments:**

    - `dim`: the width of the vectors it normalises (and of `weight`, initialised to ones).
    - `eps`: added to the mean square before the square root.
    - `dtype`: the dtype of `weight` (default float32).
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

    **Arguments:**

    - `dim`: input and output width.
    - `mlp_ratio`: hidden width `int(2 * int(dim * mlp_ratio) / 3)`, as the reference.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the three Linears' initialisation.
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

    @jax.named_scope("SwiGLU")
    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """`__call__` on every vector of `x` (last axis), as whole-array matmuls."""
        gate, value = keep(linear(self.w1, x), wide=True), keep(linear(self.w3, x), wide=True)
        return keep(linear(self.w2, _ops.silu_gate(gate, value)))


class PixelMLP(eqx.Module):
    """`fc2(gelu(fc1 x))` with exact (erf) GELU, both Linears biased.

    Reference: `modules.MLP(dim, mlp_ratio)` (dropout 0).

    **Arguments:**

    - `dim`: input and output width.
    - `mlp_ratio`: hidden width `int(dim * mlp_ratio)`.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the two Linears' initialisation.
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

    @jax.named_scope("PixelMLP")
    def apply(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """`__call__` on every vector of `x` (last axis), as whole-array matmuls."""
        return linear(self.fc2, gelu(linear(self.fc1, x)))


class TimestepConditioner(eqx.Module):
    """Scalar time -> `(hidden_size,)`: float32 sinusoid, then Linear, SiLU, Linear.

    Reference: `modules.TimestepConditioner` (keys `mlp.0.*`, `mlp.2.*`); weights
    normal(0.02), default biases.

    **Arguments:**

    - `hidden_size`: the output width `D`.
    - `freq_dim`: the width of the sinusoid (`timestep_embedding`, max period 10).
    - `dtype`: the parameters' dtype (default float32; the sinusoid is float32 and cast).
    - `key`: a PRNG key for the initialisation.
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

    **Arguments:**

    - `hidden_size`: input width (of the norm).
    - `out_channels`: output width of the Linear.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key (the Linear starts at zero; the key only builds it).
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

"""Physical parameters θ as condition tokens of the text-conditional PixelDiT.

For simulation-based inference the condition is a vector of parameters `θ (P,)`, not a
caption. [`ParameterTokens`][] turns it into the token sequence that `PixelDiTT2I` takes
in place of text embeddings; [`ParameterConditioned`][] composes the two into a velocity
`v(x, t, θ)`, the signature `flow.sample`, `flow.flow_matching_loss` and
`flow.log_likelihood` take, so that one can train on `(θ, x)` pairs, emulate, and
differentiate `log p(x | θ)` in θ.
"""

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ._checks import check_int
from ._custom_types import Array, ArrayLike, Float, Image, TimeLike
from .modules import Buffer


class ParameterTokens(eqx.Module):
    """`θ (P,)` to condition tokens: one token per parameter `(P, txt)`, or one pooled token `(1, txt)`.

    Each parameter is rescaled to `u = 2 (θ - low) / (high - low) - 1` over its prior range
    and expanded into Fourier features `[u, sin(π j u / 2), cos(π j u / 2)], j = 1..F`; its
    token is a learned embedding of its identity plus a learned linear map of the features.
    The features carry the value in the token's *direction*, which survives the RMSNorm of
    the model's text embedder (a value carried by a token's length would not). Pooled: the
    sum of the parameter tokens, one token.

    A NaN entry of θ is a missing parameter: its token is a learned null token instead.
    [`null_theta`][pixeldit_eqx.ParameterTokens.null_theta] (all NaN) is the unconditional
    condition of classifier-free guidance (`null_cond` of `flow.sample`, of
    `flow.flow_matching_loss`).

    **Arguments:**

    - `low`, `high`: the range of each parameter (its prior's support, say), shape `(P,)`.
    - `txt_embed_dim`: the token width, the model's `txt_embed_dim`.
    - `num_frequencies`: `F`, the Fourier features per parameter.
    - `pooled`: one pooled token instead of one per parameter.
    - `key`: a PRNG key for the initial embeddings.
    """

    low: Buffer
    high: Buffer
    identity: Float[Array, "P txt"]
    projection: Float[Array, "P txt F"]
    null: Float[Array, "P txt"]
    num_params: int = eqx.field(static=True)
    txt_embed_dim: int = eqx.field(static=True)
    num_frequencies: int = eqx.field(static=True)
    pooled: bool = eqx.field(static=True)

    def __init__(
        self,
        low: Float[ArrayLike, " P"],
        high: Float[ArrayLike, " P"],
        txt_embed_dim: int,
        *,
        num_frequencies: int = 4,
        pooled: bool = False,
        key: PRNGKeyArray,
    ):
        low_np, high_np = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        if low_np.ndim != 1 or low_np.shape != high_np.shape or low_np.size == 0:
            raise ValueError(
                f"`low` and `high` must be 1-D arrays of one shape (P,), P >= 1, got {low_np.shape} and {high_np.shape}."
            )
        if not np.all(np.isfinite(low_np) & np.isfinite(high_np) & (high_np > low_np)):
            raise ValueError(
                f"`high` must exceed `low`, both finite: got low={low_np.tolist()}, high={high_np.tolist()}."
            )
        txt_embed_dim = check_int("txt_embed_dim", txt_embed_dim, 1)
        num_frequencies = check_int("num_frequencies", num_frequencies, 0)
        num_params, features = low_np.size, 1 + 2 * num_frequencies
        k_id, k_proj, k_null = jr.split(key, 3)
        self.low = Buffer(low_np)
        self.high = Buffer(high_np)
        self.identity = jr.normal(k_id, (num_params, txt_embed_dim), jnp.float32)
        self.projection = jr.normal(k_proj, (num_params, txt_embed_dim, features), jnp.float32) / math.sqrt(features)
        self.null = jr.normal(k_null, (num_params, txt_embed_dim), jnp.float32)
        self.num_params = num_params
        self.txt_embed_dim = txt_embed_dim
        self.num_frequencies = num_frequencies
        self.pooled = bool(pooled)

    @property
    def num_tokens(self) -> int:
        """The length `T` of the token sequence: `P`, or 1 when pooled."""
        return 1 if self.pooled else self.num_params

    def null_theta(self) -> Float[Array, " P"]:
        """The unconditional θ: all NaN, every parameter missing."""
        return jnp.full((self.num_params,), jnp.nan, dtype=jnp.float32)

    def features(self, theta: Float[Array, " P"]) -> Float[Array, "P F"]:
        """The Fourier features `[u, sin(π j u / 2), cos(π j u / 2)]` of each parameter (NaN-free)."""
        missing = jnp.isnan(theta)
        low, high = self.low.value, self.high.value
        safe = jnp.where(missing, low, theta.astype(jnp.float32))  # NaN-free, so gradients stay finite
        u = 2 * (safe - low) / (high - low) - 1
        angles = u[:, None] * (jnp.arange(1, self.num_frequencies + 1, dtype=jnp.float32) * (math.pi / 2))[None]
        return jnp.concatenate([u[:, None], jnp.sin(angles), jnp.cos(angles)], axis=-1)

    def __call__(self, theta: Float[Array, " P"]) -> Float[Array, "T txt"]:
        """The condition tokens of one parameter vector: `(P, txt)`, or `(1, txt)` pooled."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"`theta`: expected shape ({self.num_params},), got {tuple(theta.shape)}.")
        tokens = self.identity + jnp.einsum("pdf,pf->pd", self.projection, self.features(theta))
        tokens = jnp.where(jnp.isnan(theta)[:, None], self.null, tokens)
        if self.pooled:
            return jnp.sum(tokens, axis=0, keepdims=True)
        return tokens


class ParameterConditioned(eqx.Module):
    """A text-conditional PixelDiT conditioned on parameters: `v(x, t, θ) = model(x, t, tokens(θ))`.

    The velocity function of `flow.sample`, `flow.flow_matching_loss` and
    `flow.log_likelihood` with `cond = θ`; the model and the tokens train together.

    **Arguments:**

    - `model`: a `PixelDiTT2I` (any `model(x, t, text, text_mask)` with `txt_embed_dim`
        and `txt_max_length` attributes).
    - `tokens`: the [`ParameterTokens`][] of θ, of the model's token width.
    """

    model: Any
    tokens: ParameterTokens

    def __init__(self, model: Any, tokens: ParameterTokens):
        width = getattr(model, "txt_embed_dim", None)
        if width != tokens.txt_embed_dim:
            raise ValueError(
                f"`tokens` must have the model's token width: expected txt_embed_dim={width}, got {tokens.txt_embed_dim}."
            )
        max_length = getattr(model, "txt_max_length", None)
        if max_length is None or max_length < tokens.num_tokens:
            raise ValueError(
                f"`model` must take {tokens.num_tokens} condition tokens: expected txt_max_length >= "
                f"{tokens.num_tokens}, got {max_length}."
            )
        self.model = model
        self.tokens = tokens

    def __call__(self, x: Image, t: TimeLike, theta: Float[Array, " P"]) -> Float[Array, "C H W"]:
        """The velocity `(C, H, W)` at `x`, time `t` (0 noise, 1 data), parameters `theta`."""
        text = self.tokens(theta)
        mask = jnp.ones((text.shape[0],), dtype=bool)
        return self.model(x, t, text, mask)

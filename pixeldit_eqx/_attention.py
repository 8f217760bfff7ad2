"""Rotary self-attention (reference `modules.RotaryAttention`) and the MMDiT joint
text-image attention (`pixeldit_t2i.MMDiTJointAttention`), on
`jax.nn.dot_product_attention` so that a GPU gets its fused kernel, and on the same
computation laid out heads-major on the CPU."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._ops import _low_precision, keep, linear
from ._rope import apply_rope
from .modules import _rms_normalise, RMSNorm


def _check_heads(dim: int, heads: int, what: str) -> int:
    if heads < 1 or dim < 1 or dim % heads:
        raise ValueError(f"{what}: width {dim} must be a positive multiple of the number of heads, got heads={heads}.")
    return dim // heads


def _sdpa(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    # `dot_product_attention` promotes internally (bf16 inputs, float32 logits); under
    # strict dtype promotion that raises, so it runs under standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)


@jax.custom_vjp
def _sdpa_float32_backward(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    return _sdpa(q, k, v, mask)


def _sdpa_fwd(q, k, v, mask):
    return _sdpa(q, k, v, mask), (q, k, v, mask)


def _sdpa_bwd(res, g):
    q, k, v, mask = res
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    _, vjp = jax.vjp(lambda q, k, v: _sdpa(q, k, v, mask), *f32)
    dq, dk, dv = vjp(g.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_sdpa_float32_backward.defvjp(_sdpa_fwd, _sdpa_bwd)


def _large_negative(dtype: Any) -> Array:
    """The masked logit of `jax.nn.dot_product_attention`: -0.7 x the dtype's maximum,
    capped at float32's so that it stays finite in the float32 softmax."""
    return jnp.asarray(-0.7 * min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max)), dtype)


def _heads_major(q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
    """The computation of `jax.nn.dot_product_attention`'s XLA implementation, with the
    heads moved in front of the tokens: `(heads, S, hd)` operands make XLA:CPU's batched
    dots and the softmax's reductions run over contiguous rows (heads-minor operands
    make it transpose around every dot, forward and backward)."""
    logits_dtype = q.dtype if jnp.finfo(q.dtype).bits > 32 else jnp.float32
    qh, kh, vh = (jnp.swapaxes(a, 0, 1) for a in (q, k, v))
    logits = jnp.einsum("hqd,hkd->hqk", qh, kh, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), logits_dtype)
    if key_mask is not None:
        logits = jnp.where(key_mask[None, None, :], logits, _large_negative(logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.swapaxes(jnp.einsum("hqk,hkd->hqd", probs, vh), 0, 1)


def _fused_kernel_backend() -> bool:
    """Whether attention goes to `jax.nn.dot_product_attention` (every backend but the
    CPU, where the heads-major einsums are faster and compute the same)."""
    return jax.default_backend() != "cpu"


def attend(
    q: Float[Array, "S heads hd"],
    k: Float[Array, "S heads hd"],
    v: Float[Array, "S heads hd"],
    key_mask: Bool[Array, " S"] | None = None,
) -> Float[Array, "S heads hd"]:
    """Softmax attention scaled by `1/sqrt(hd)`; `key_mask` False removes a key.

    The logits and the softmax are float32 for any input dtype, and the mask broadcasts
    over heads and queries: no `(S, S)` mask is built, and none at all when `key_mask`
    is None. On GPUs and TPUs this is `jax.nn.dot_product_attention`; on the CPU the same
    computation in a heads-major layout (`_heads_major`).
    """
    if not _fused_kernel_backend():
        return keep(_heads_major(q, k, v, key_mask))
    mask = None if key_mask is None else key_mask[None, None, :]
    if q.dtype != jnp.float32 and getattr(jax.config, "jax_numpy_dtype_promotion") == "strict":
        # jax 0.10 cannot lower the backward pass of `dot_product_attention` on bf16
        # inputs under strict promotion (its BF16_BF16_F32 dots meet float32
        # cotangents); there, and only there, that pass runs on float32 copies.
        return keep(_sdpa_float32_backward(q, k, v, mask))
    return keep(_sdpa(q, k, v, mask))


def split_qkv(
    qkv: Float[Array, "N 3 heads hd"],
) -> tuple[Float[Array, "N heads hd"], Float[Array, "N heads hd"], Float[Array, "N heads hd"]]:
    """`q, k, v`, each `(N, heads, hd)`, from a fused projection laid out `(N, 3, heads, hd)`
    (reference: `modules.RotaryAttention`'s `qkv[0], qkv[1], qkv[2]` after its permute).

    One `split` rather than three indexings: its transpose in the backward pass is one
    concatenation of the three cotangents, where indexing's is a sum of zero-padded
    copies, which under bf16 compute XLA:CPU evaluates through float32 round trips.
    Same values, bitwise.
    """
    n, _, heads, hd = qkv.shape
    q, k, v = jnp.split(qkv, 3, axis=1)
    return q.reshape(n, heads, hd), k.reshape(n, heads, hd), v.reshape(n, heads, hd)


def normed_rope(
    norm: RMSNorm, x: Float[Array, "N heads hd"], angles: Float[Array, "N hd2"]
) -> Float[Array, "N heads hd"]:
    """`apply_rope(norm.apply(x), angles)` (reference: `modules.RMSNorm` then
    `apply_rotary_emb`), rounded once: under bf16 (f16) compute the norm's float32
    product goes into rope's float32 rotation unrounded, as in the reference, whose
    RMSNorm returns float32 there (times its float32 weight); the backward pass then
    has no bf16 round trip in between. float32 is unchanged."""
    if not _low_precision(x):
        return apply_rope(norm.apply(x), angles)
    return apply_rope(_rms_normalise(x, norm.weight, norm.eps, jnp.float32), angles).astype(x.dtype)


class RotaryAttention(eqx.Module):
    """Multi-head self-attention with per-head q/k RMSNorm and rope on q and k.

    Reference: `modules.RotaryAttention(dim, num_heads, qkv_bias=False)`: `qkv` Linear
    (no bias) split as `(3, heads, hd)`, `q_norm`/`k_norm` over hd, `proj` biased.

    **Arguments:**

    - `dim`: the token width, split into `heads` heads of `dim // heads` (a multiple of
      `heads`; the rope tables need an even head width, 2D rope a multiple of 4).
    - `heads`: the number of heads.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the Linears' initialisation.
    """

    qkv: eqx.nn.Linear
    q_norm: RMSNorm
    k_norm: RMSNorm
    proj: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, dtype: Any = None, *, key: PRNGKeyArray):
        hd = _check_heads(dim, heads, "RotaryAttention")
        k1, k2 = jr.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, key=k1)
        self.q_norm = RMSNorm(hd, dtype=dtype)
        self.k_norm = RMSNorm(hd, dtype=dtype)
        self.proj = eqx.nn.Linear(dim, dim, dtype=dtype, key=k2)
        self.heads = heads

    def qkv_heads(self, x: Float[Array, "N dim"], angles: Float[Array, "N hd2"]) -> tuple[Array, Array, Array]:
        """Project, split, normalise and rotate: `q, k, v` of shape `(N, heads, hd)`."""
        n, dim = x.shape
        q, k, v = split_qkv(keep(linear(self.qkv, x)).reshape(n, 3, self.heads, dim // self.heads))
        return normed_rope(self.q_norm, q, angles), normed_rope(self.k_norm, k, angles), v

    @jax.named_scope("RotaryAttention")
    def __call__(
        self,
        x: Float[Array, "N dim"],
        angles: Float[Array, "N hd2"],
        key_mask: Bool[Array, " N"] | None = None,
    ) -> Float[Array, "N dim"]:
        """Self-attention over the `N` tokens of `x`, rope on queries and keys; `key_mask` False drops a token as a key."""
        q, k, v = self.qkv_heads(x, angles)
        out = attend(q, k, v, key_mask).reshape(x.shape)
        return keep(linear(self.proj, out))


class JointAttention(eqx.Module):
    """MMDiT joint attention: per-stream qkv, q/k norms and projections, one softmax
    over the concatenation `[text, image]` (text first).

    Reference: `pixeldit_t2i.MMDiTJointAttention`. 2D rope on the image stream, 1D rope
    on the text stream when `text_angles` is given. `text_mask` False removes a text
    token as a key (deliberate deviation: the reference builds its boolean SDPA mask as
    `mask == 0`, which would keep only padding; the released models run without a mask).

    **Arguments:**

    - `dim`: the width of both streams, split into `heads` heads.
    - `heads`: the number of heads.
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the Linears' initialisation.
    """

    qkv_x: eqx.nn.Linear
    qkv_y: eqx.nn.Linear
    q_norm_x: RMSNorm
    k_norm_x: RMSNorm
    q_norm_y: RMSNorm
    k_norm_y: RMSNorm
    proj_x: eqx.nn.Linear
    proj_y: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, dtype: Any = None, *, key: PRNGKeyArray):
        hd = _check_heads(dim, heads, "JointAttention")
        k1, k2, k3, k4 = jr.split(key, 4)
        self.qkv_x = eqx.nn.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, key=k1)
        self.qkv_y = eqx.nn.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, key=k2)
        self.q_norm_x = RMSNorm(hd, dtype=dtype)
        self.k_norm_x = RMSNorm(hd, dtype=dtype)
        self.q_norm_y = RMSNorm(hd, dtype=dtype)
        self.k_norm_y = RMSNorm(hd, dtype=dtype)
        self.proj_x = eqx.nn.Linear(dim, dim, dtype=dtype, key=k3)
        self.proj_y = eqx.nn.Linear(dim, dim, dtype=dtype, key=k4)
        self.heads = heads

    @jax.named_scope("JointAttention")
    def __call__(
        self,
        x: Float[Array, "L dim"],
        y: Float[Array, "T dim"],
        image_angles: Float[Array, "L hd2"],
        text_angles: Float[Array, "T hd2"] | None = None,
        text_mask: Bool[Array, " T"] | None = None,
    ) -> tuple[Float[Array, "L dim"], Float[Array, "T dim"]]:
        """Joint attention over `[text, image]`: returns the image and text streams `(x, y)`; padded text (`text_mask` False) takes no part as keys."""
        (n_x, dim), n_y = x.shape, y.shape[0]
        hd = dim // self.heads
        qx, kx, vx = split_qkv(keep(linear(self.qkv_x, x)).reshape(n_x, 3, self.heads, hd))
        qy, ky, vy = split_qkv(keep(linear(self.qkv_y, y)).reshape(n_y, 3, self.heads, hd))
        qx = normed_rope(self.q_norm_x, qx, image_angles)
        kx = normed_rope(self.k_norm_x, kx, image_angles)
        if text_angles is not None:
            qy, ky = normed_rope(self.q_norm_y, qy, text_angles), normed_rope(self.k_norm_y, ky, text_angles)
        else:
            qy, ky = self.q_norm_y.apply(qy), self.k_norm_y.apply(ky)
        key_mask = None
        if text_mask is not None:
            key_mask = jnp.concatenate([text_mask, jnp.ones((n_x,), bool)])
        q = jnp.concatenate([qy, qx])
        k = jnp.concatenate([ky, kx])
        v = jnp.concatenate([vy, vx])
        out = attend(q, k, v, key_mask).reshape(n_y + n_x, dim)
        return keep(linear(self.proj_x, out[n_y:])), keep(linear(self.proj_y, out[:n_y]))

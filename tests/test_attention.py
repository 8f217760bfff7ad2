"""`RotaryAttention` against the reference fixture, and the CPU attention layout against
`jax.nn.dot_product_attention`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _attention

from .helpers import load_case, load_weights, rel_err


def test_rotary_attention(getkey):
    attn = px.load_state_dict(px.RotaryAttention(32, 4, key=getkey()), load_weights("rotary_attention"))
    data = load_case("rotary_attention")
    angles = np.arctan2(data["in_pos"][..., 1], data["in_pos"][..., 0])
    out = jax.vmap(attn, in_axes=(0, None))(jnp.asarray(data["in_0"]), jnp.asarray(angles))
    assert rel_err(out, data["out"]) <= 1e-5


def _attention_inputs(dtype, masked, batch=3, s=40, heads=4, hd=16):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (batch, s, heads, hd)).astype(dtype) for key in keys[:3])
    mask = jax.random.bernoulli(keys[3], 0.6, (batch, s)).at[:, 0].set(True) if masked else None
    return q, k, v, mask


def _batched(attention, mask):
    if mask is None:
        return lambda q, k, v: jax.vmap(lambda q, k, v: attention(q, k, v, None))(q, k, v)
    return lambda q, k, v: jax.vmap(attention)(q, k, v, mask)


def _fused(q, k, v, key_mask):
    return _attention._sdpa(q, k, v, None if key_mask is None else key_mask[None, None, :])


@pytest.mark.parametrize("masked", [False, True])
def test_heads_major_layout_computes_dot_product_attention(masked):
    """The CPU layout is `jax.nn.dot_product_attention`'s computation: float32 outputs
    and gradients to round-off, with and without masked keys."""
    q, k, v, mask = _attention_inputs(jnp.float32, masked)
    ours, fused = _batched(_attention._heads_major, mask), _batched(_fused, mask)
    assert rel_err(jax.jit(ours)(q, k, v), jax.jit(fused)(q, k, v)) <= 1e-6
    cotangent = jax.random.normal(jax.random.key(5), q.shape)
    grads = [jax.jit(jax.vjp(f, q, k, v)[1])(cotangent) for f in (ours, fused)]
    for ours_g, fused_g in zip(*grads):
        assert rel_err(ours_g, fused_g) <= 1e-6
    if masked:  # a masked key gets no weight: changing its value changes nothing
        v2 = jnp.where(mask[:, :, None, None], v, 1e3)
        assert rel_err(jax.jit(ours)(q, k, v2), jax.jit(ours)(q, k, v)) <= 1e-6


@pytest.mark.parametrize("masked", [False, True])
def test_heads_major_layout_in_bfloat16(masked):
    """bf16 operands: float32 logits and softmax, the output rounded to bf16 like
    `dot_product_attention`'s, and a backward pass that compiles under strict promotion."""
    q, k, v, mask = _attention_inputs(jnp.bfloat16, masked)
    ours = jax.jit(_batched(_attention._heads_major, mask))
    out = ours(q, k, v)
    exact = jax.jit(_batched(_fused, mask))(*(a.astype(jnp.float32) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, exact) <= 1e-2
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ours(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2)))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)


def test_attend_takes_the_heads_major_layout_on_the_cpu(monkeypatch):
    """The heads-major layout on the CPU, `jax.nn.dot_product_attention` elsewhere."""
    q, k, v, mask = _attention_inputs(jnp.float32, True, batch=1)
    args = (q[0], k[0], v[0], mask[0])
    assert _attention._fused_kernel_backend() == (jax.default_backend() != "cpu")
    monkeypatch.setattr(_attention, "_fused_kernel_backend", lambda: False)
    assert np.array_equal(_attention.attend(*args), _attention._heads_major(*args))
    monkeypatch.setattr(_attention, "_fused_kernel_backend", lambda: True)
    assert np.array_equal(_attention.attend(*args), _fused(*args))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_qkv_is_indexing_with_a_concatenating_backward(dtype):
    """`split_qkv` gives the three indexings' values, and its backward pass assembles the
    projection's cotangent with one concatenation, no zero-padded sum."""
    qkv = jax.random.normal(jax.random.key(0), (7, 3, 2, 4)).astype(dtype)
    for i, got in enumerate(_attention.split_qkv(qkv)):
        assert got.shape == (7, 2, 4) and got.dtype == dtype
        assert jnp.array_equal(got, qkv[:, i])

    def loss(split, qkv):
        q, k, v = split(qkv)
        return jnp.sum((q * k + v).astype(jnp.float32) ** 2)

    def by_index(qkv):
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    grad = jax.grad(lambda a: loss(_attention.split_qkv, a))(qkv)
    assert jnp.array_equal(grad, jax.grad(lambda a: loss(by_index, a))(qkv))
    backward = str(jax.make_jaxpr(jax.grad(lambda a: loss(_attention.split_qkv, a)))(qkv))
    assert "concatenate" in backward and "pad" not in backward
    assert "pad" in str(jax.make_jaxpr(jax.grad(lambda a: loss(by_index, a)))(qkv))  # what indexing does


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_normed_rope_rounds_once(dtype):
    """q/k RMSNorm then rope: float32 is `apply_rope(norm.apply(x))` bit for bit; bf16/f16
    take the norm's float32 product into rope unrounded and round once at the end (the
    reference's RMSNorm returns float32 there), where the two calls would round twice."""
    from pixeldit_eqx._rope import apply_rope

    k = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(k[0], (64, 4, 32), jnp.float32).astype(dtype)
    angles = jax.random.uniform(k[1], (64, 16), jnp.float32, 0.0, 6.0)
    norm = px.RMSNorm(32)
    norm = eqx.tree_at(lambda n: n.weight, norm, jax.random.normal(k[2], (32,), jnp.float32).astype(dtype))
    out = _attention.normed_rope(norm, x, angles)
    assert out.dtype == dtype
    twice = apply_rope(norm.apply(x), angles)
    if dtype == jnp.float32:
        assert jnp.array_equal(out, twice)
        return
    f32 = jnp.float32
    x32 = x.astype(f32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm.eps)).astype(dtype)
    once = apply_rope(normed.astype(f32) * norm.weight.astype(f32)[None, None], angles).astype(dtype)
    assert jnp.array_equal(out, once)
    assert not jnp.array_equal(out, twice)
    d_x, d_w = jax.grad(lambda x, n: jnp.sum(_attention.normed_rope(n, x, angles).astype(f32)), argnums=(0, 1))(x, norm)
    assert d_x.dtype == dtype and d_w.weight.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(d_x.astype(f32))))

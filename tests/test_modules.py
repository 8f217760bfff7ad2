"""The seed's building blocks: reference parity, Buffer semantics, state dicts, typing."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx._ops import gelu, get_1d_sincos_pos_embed_from_grid, silu_gate, sincos_2d

from .helpers import load_case, load_weights, MANIFEST, rel_err


def _seed_modules(key):
    k = jax.random.split(key, 5)
    return {
        "rmsnorm": (px.RMSNorm(32), 32),
        "timestep_conditioner": (px.TimestepConditioner(32, key=k[0]), None),
        "feedforward_swiglu": (px.SwiGLU(48, key=k[1]), 48),
        "mlp_gelu": (px.PixelMLP(16, key=k[2]), 16),
        "final_layer": (px.FinalLayer(32, 3, key=k[3]), 32),
    }


@pytest.mark.parametrize(
    "case",
    [
        "rmsnorm",
        "timestep_conditioner",
        "feedforward_swiglu",
        "mlp_gelu",
        "final_layer",
    ],
)
def test_seed_module_parity(case, getkey):
    module, _ = _seed_modules(getkey())[case]
    module = px.load_state_dict(module, load_weights(case))
    data = load_case(case)
    x = jnp.asarray(data["in_0"])
    if case == "timestep_conditioner":
        out = jax.vmap(module)(x)
    else:
        out = jax.vmap(jax.vmap(module))(x)
    assert rel_err(out, data["out"]) <= 1e-5


@pytest.mark.parametrize("case", ["timestep_embedding_d256", "timestep_embedding_d33"])
def test_timestep_embedding(case):
    data = load_case(case)
    dim = MANIFEST[case]["call"]["dim"]
    out = jax.vmap(lambda t: px.timestep_embedding(t, dim))(jnp.asarray(data["in_t"]))
    assert out.dtype == jnp.float32
    assert rel_err(out, data["out_emb"]) <= 1e-5
    if dim % 2:
        assert np.all(np.asarray(out[:, -1]) == 0)


def test_timestep_embedding_is_float32_from_python_and_bf16():
    assert px.timestep_embedding(0.5, 8).dtype == jnp.float32
    assert px.timestep_embedding(jnp.bfloat16(0.5), 8).dtype == jnp.float32


def test_sincos_square_and_nonsquare():
    square = load_case("sincos_2d_square")["out_table"]
    table = px.get_2d_sincos_pos_embed(16, 6)
    assert table.dtype == np.float32 and table.shape == (36, 16)
    assert rel_err(table, square) <= 1e-6
    assert rel_err(sincos_2d(16, 6, 6), square) <= 1e-5

    nonsquare = load_case("sincos_2d_nonsquare")["out_table"]
    assert rel_err(px.get_2d_sincos_pos_embed(16, 4, 6), nonsquare) <= 1e-6
    assert rel_err(sincos_2d(16, 4, 6), nonsquare) <= 1e-5


def test_one_d_sincos_helper():
    emb = get_1d_sincos_pos_embed_from_grid(8, np.arange(3.0))
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    np.testing.assert_allclose(emb[2], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))


def test_init_as_reference(getkey):
    final = px.FinalLayer(16, 3, key=getkey())
    assert not np.any(np.asarray(final.linear.weight)) and not np.any(np.asarray(final.linear.bias))
    out = final(jax.random.normal(getkey(), (16,)))
    assert np.all(np.asarray(out) == 0)
    cond = px.TimestepConditioner(512, key=getkey())
    std = float(jnp.std(cond.linear1.weight))
    assert 0.018 < std < 0.022
    swiglu = px.SwiGLU(48, key=getkey())
    assert swiglu.w1.weight.shape == (128, 48) and swiglu.w1.bias is None


def test_dtype_argument(getkey):
    norm = px.RMSNorm(8, dtype=jnp.bfloat16)
    assert norm.weight.dtype == jnp.bfloat16
    mlp = px.PixelMLP(8, dtype=jnp.bfloat16, key=getkey())
    assert mlp(jnp.ones(8, jnp.bfloat16)).dtype == jnp.bfloat16
    cond = px.TimestepConditioner(16, dtype=jnp.bfloat16, key=getkey())
    assert cond(0.3).dtype == jnp.bfloat16


def test_rmsnorm_statistics_in_float32():
    x = jnp.full((4,), 300.0, jnp.bfloat16)  # x^2 = 90000 overflows nothing in f32
    out = px.RMSNorm(4, dtype=jnp.bfloat16)(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-2)


# --- Buffer ---------------------------------------------------------------------------


class _WithBuffer(eqx.Module):
    linear: eqx.nn.Linear
    table: "object"

    def __call__(self, x):
        return self.linear(x) + self.table.value


def test_buffer_gradient_is_zero_and_outside_trainable(getkey):
    model = _WithBuffer(eqx.nn.Linear(3, 2, key=getkey()), px.Buffer(jnp.ones(2)))
    grads = jax.grad(lambda m: jnp.sum(m(jnp.ones(3)) ** 2))(model)
    assert np.all(np.asarray(grads.table.array) == 0)
    assert np.any(np.asarray(grads.linear.weight) != 0)

    spec = px.trainable(model)
    assert spec.table.array is False and spec.linear.weight is True
    params, _ = eqx.partition(model, spec)
    assert params.table.array is None


def test_cast_params_leaves_buffers_and_ints(getkey):
    tree = {"w": jnp.ones(2), "b": px.Buffer(jnp.ones(2)), "i": jnp.arange(3)}
    cast = px.cast_params(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16
    assert cast["b"].array.dtype == jnp.float32
    assert cast["i"].dtype == tree["i"].dtype


def test_buffer_survives_serialisation(tmp_path, getkey):
    model = _WithBuffer(eqx.nn.Linear(3, 2, key=getkey()), px.Buffer(jnp.arange(2.0)))
    eqx.tree_serialise_leaves(tmp_path / "m.eqx", model)
    like = _WithBuffer(eqx.nn.Linear(3, 2, key=getkey()), px.Buffer(jnp.zeros(2)))
    back = eqx.tree_deserialise_leaves(tmp_path / "m.eqx", like)
    np.testing.assert_array_equal(back.table.value, [0.0, 1.0])
    np.testing.assert_array_equal(back.linear.weight, model.linear.weight)


def test_buffer_is_never_exported():
    class WithTable(eqx.Module):
        norm: px.RMSNorm
        table: px.Buffer

    sd = px.state_dict(WithTable(px.RMSNorm(4), px.Buffer(jnp.ones(3))))
    assert list(sd) == ["norm.weight"]


# --- State dicts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "rmsnorm",
        "timestep_conditioner",
        "feedforward_swiglu",
        "mlp_gelu",
        "final_layer",
    ],
)
def test_state_dict_round_trip_is_exact(case, getkey):
    module, _ = _seed_modules(getkey())[case]
    sd = load_weights(case)
    out = px.state_dict(px.load_state_dict(module, sd))
    assert sorted(out) == sorted(sd)
    for key in sd:
        assert out[key].dtype == sd[key].dtype
        np.testing.assert_array_equal(out[key], sd[key])


def test_timestep_conditioner_keys(getkey):
    sd = px.state_dict(px.TimestepConditioner(8, key=getkey()))
    assert {k: v.shape for k, v in sd.items()} == {
        "mlp.0.weight": (8, 256),
        "mlp.0.bias": (8,),
        "mlp.2.weight": (8, 8),
        "mlp.2.bias": (8,),
    }


def test_bad_state_dict_lists_every_problem_and_loads_nothing(getkey):
    module = px.SwiGLU(48, key=getkey())
    sd = dict(load_weights("feedforward_swiglu"))
    del sd["w3.weight"]
    sd["w2.weight"] = sd["w2.weight"][:, :5]
    sd["extra.bias"] = np.zeros(3, np.float32)
    with pytest.raises(px.StateDictError) as info:
        px.load_state_dict(module, sd)
    message = str(info.value)
    assert "missing key 'w3.weight' (expected shape (128, 48))" in message
    assert "unexpected key 'extra.bias' (shape (3,))" in message
    assert "key 'w2.weight': expected shape (48, 128), got (48, 5)" in message
    assert "nothing was loaded" in message


def test_non_finite_tensor_is_refused(getkey):
    sd = dict(load_weights("rmsnorm"))
    sd["weight"] = sd["weight"].copy()
    sd["weight"][3] = np.nan
    with pytest.raises(px.StateDictError, match="non-finite"):
        px.load_state_dict(px.RMSNorm(32), sd)


def test_load_casts_to_module_dtype():
    import ml_dtypes

    sd = {"weight": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    norm = px.load_state_dict(px.RMSNorm(4), sd)
    assert norm.weight.dtype == jnp.float32
    np.testing.assert_array_equal(norm.weight, [0.0, 1.0, 2.0, 3.0])


# --- Typing, jit, vmap ----------------------------------------------------------------


def test_wrong_shape_raises_under_the_hook(getkey):
    norm = px.RMSNorm(8)
    with pytest.raises(Exception, match="Type-check error"):
        norm(jnp.ones((2, 8)))  # a batch, not one example
    with pytest.raises(Exception, match="Type-check error"):
        px.timestep_embedding(jnp.ones(3), 8)  # t must be a scalar
    with pytest.raises(Exception, match="Type-check error"):
        px.SwiGLU(8, key=getkey())(jnp.ones(8, jnp.int32))  # floats only


@pytest.mark.parametrize(
    "case",
    [
        "rmsnorm",
        "timestep_conditioner",
        "feedforward_swiglu",
        "mlp_gelu",
        "final_layer",
    ],
)
def test_jit_and_vmap_equal_eager(case, getkey):
    module, dim = _seed_modules(getkey())[case]
    x = jnp.linspace(0.0, 1.0, 4) if dim is None else jax.random.normal(getkey(), (4, dim))
    eager = jnp.stack([module(xi) for xi in x])
    batched = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(module, x)
    np.testing.assert_allclose(batched, eager, rtol=1e-6, atol=1e-6)


def test_constructor_errors_name_the_argument(getkey):
    with pytest.raises(ValueError, match="`dim` must be >= 1, got 0"):
        px.RMSNorm(0)
    with pytest.raises(ValueError, match="`embed_dim` must be divisible by 4, got 6"):
        px.get_2d_sincos_pos_embed(6, 3)
    with pytest.raises(ValueError, match="`dim` must be >= 1"):
        px.timestep_embedding(0.1, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_activations_round_once(dtype):
    """bf16/f16 GELU and SwiGLU gating are computed in float32 and rounded once: equal,
    bit for bit, to the float32 functions of the same inputs rounded to the dtype (a
    chain of bf16 operations rounds each step); so are their input cotangents."""
    x = jnp.linspace(-6.0, 6.0, 4001, dtype=jnp.float32).astype(dtype)
    v = jnp.cos(jnp.linspace(0.0, 40.0, 4001, dtype=jnp.float32)).astype(dtype)
    f32 = jnp.float32
    out = gelu(x)
    assert out.dtype == dtype
    assert jnp.array_equal(out, gelu(x.astype(f32)).astype(dtype))
    chained = jnp.asarray(0.5, dtype) * x * (1 + jax.lax.erf(x * jnp.asarray(0.5**0.5, dtype)))
    assert not jnp.array_equal(out, chained)  # what rounding every step would give
    gated = silu_gate(x, v)
    assert gated.dtype == dtype
    assert jnp.array_equal(gated, (jax.nn.silu(x.astype(f32)) * v.astype(f32)).astype(dtype))
    ct = jnp.ones_like(gated)
    d_x, d_v = jax.vjp(silu_gate, x, v)[1](ct)
    want = jax.vjp(silu_gate, x.astype(f32), v.astype(f32))[1](ct.astype(f32))
    assert d_x.dtype == d_v.dtype == dtype
    assert jnp.array_equal(d_x, want[0].astype(dtype)) and jnp.array_equal(d_v, want[1].astype(dtype))
    (d_gelu,) = jax.vjp(gelu, x)[1](jnp.ones_like(out))
    assert d_gelu.dtype == dtype
    assert jnp.array_equal(d_gelu, jax.grad(lambda y: jnp.sum(gelu(y)))(x.astype(f32)).astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_norm_scale_and_pixel_embedding_round_once(dtype):
    """bf16/f16 RMSNorm multiplies by its weight in float32 and rounds once: the values
    of the low-precision product (bit for bit), while the weight's gradient sums
    float32 products. The few-channel pixel embedding sums in float32 and rounds once
    after the bias, as `dense` does, where a chain of bf16 multiply-adds rounds each."""
    k = jax.random.split(jax.random.key(3), 5)
    f32 = jnp.float32
    x = jax.random.normal(k[0], (4001, 16), f32).astype(dtype)
    norm = eqx.tree_at(lambda n: n.weight, px.RMSNorm(16), jax.random.normal(k[1], (16,), f32).astype(dtype))
    out = norm.apply(x)
    x32 = x.astype(f32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm.eps)).astype(dtype)
    assert out.dtype == dtype
    assert jnp.array_equal(out, norm.weight[None] * normed)  # the low-precision product's values
    ct = jax.random.normal(k[2], out.shape, f32).astype(dtype)
    d_weight = jax.vjp(lambda n: n.apply(x), norm)[1](ct)[0].weight
    assert d_weight.dtype == dtype
    want = jnp.sum(ct.astype(f32) * normed.astype(f32), axis=0)
    rounded_products = jnp.sum((ct * normed).astype(f32), axis=0)  # what bf16 autodiff sums
    assert jnp.array_equal(d_weight, want.astype(dtype))
    assert not jnp.array_equal(want.astype(dtype), rounded_products.astype(dtype))

    from pixeldit_eqx._tokens import _few_channel_linear

    layer = eqx.nn.Linear(3, 16, key=k[3])
    pixels = jax.random.normal(k[4], (4001, 3), f32)
    low_layer = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layer)
    got = _few_channel_linear(low_layer, pixels.astype(dtype))
    assert got.dtype == dtype
    layer32 = jax.tree.map(lambda a: a.astype(f32) if eqx.is_inexact_array(a) else a, low_layer)
    assert jnp.array_equal(got, _few_channel_linear(layer32, pixels.astype(dtype).astype(f32)).astype(dtype))
    w, b, p = low_layer.weight, low_layer.bias, pixels.astype(dtype)
    chained = p[:, 0:1] * w[None, :, 0] + p[:, 1:2] * w[None, :, 1] + p[:, 2:3] * w[None, :, 2] + b[None]
    assert not jnp.array_equal(got, chained)  # what rounding every step would give


def test_silu_gate_equals_autodiff_of_silu_product():
    """`silu_gate` only rewrites the derivative: values are bit-identical to
    `jax.nn.silu(g) * v`; first and second derivatives agree to float rounding; the
    extremes stay finite."""
    g = jnp.array([-1e4, -100.0, -50.0, -10.0, -1.278, -1.0, 0.0, 1e-3, 1.0, 10.0, 100.0, 1e4], jnp.float32)
    v = jnp.linspace(-3.0, 3.0, g.size, dtype=jnp.float32)

    def ref(g, v):
        return jax.nn.silu(g) * v

    assert jnp.array_equal(silu_gate(g, v), ref(g, v))
    grads = jax.grad(lambda g, v: jnp.sum(silu_gate(g, v)), argnums=(0, 1))(g, v)
    expected = jax.grad(lambda g, v: jnp.sum(ref(g, v)), argnums=(0, 1))(g, v)
    for got, want in zip(grads, expected):
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    tangent = jax.jvp(silu_gate, (g, v), (jnp.ones_like(g), -jnp.ones_like(v)))[1]
    np.testing.assert_allclose(
        tangent, jax.jvp(ref, (g, v), (jnp.ones_like(g), -jnp.ones_like(v)))[1], rtol=1e-5, atol=1e-6
    )
    small_g, small_v = g[2:-2], v[2:-2]
    hess = jax.hessian(lambda g: jnp.sum(silu_gate(g, small_v)))(small_g)
    np.testing.assert_allclose(hess, jax.hessian(lambda g: jnp.sum(ref(g, small_v)))(small_g), rtol=1e-4, atol=1e-6)
    # bf16 in, bf16 out, finite cotangents
    gb, vb = g.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    out, vjp = jax.vjp(silu_gate, gb, vb)
    assert out.dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(c.astype(jnp.float32)))) for c in vjp(jnp.ones_like(out)))

"""Mixed precision and rematerialisation.

float32 parameters with bfloat16 compute (`compute_dtype=jnp.bfloat16`) against float32
on the reference fixture models; the float32 islands (norm statistics, timestep
sinusoid, rope, softmax, output head) inside a bfloat16 program; `cast_params`; and
`checkpoint="lean"` and `True`, which must change memory and time only, never the
gradients.
"""

import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_eqx import _dots as _dots_module
from pixeldit_eqx._compat import compile_lowered

from .helpers import FIXTURES, jaxpr_eqns, load_case, MANIFEST, rel_err


CASES = {"model_c2i": "c2i", "model_t2i": "t2i"}


def _load(case, **kwargs):
    import pixeldit_eqx as px

    return px.load_reference(FIXTURES / f"{case}.safetensors", MANIFEST[case]["init"], CASES[case], **kwargs)


def _inputs(case):
    data = load_case(case)
    return jnp.asarray(data["in_x"]), jnp.asarray(data["in_t"]), jnp.asarray(data["in_y"]), data["out"]


def _forward(model, x, t, y):
    return jax.vmap(model)(x, t, y)


def _loss(params, static, x, t, y):
    out = jax.vmap(eqx.combine(params, static))(x, t, y)
    return jnp.mean((out - x) ** 2)


# These tests check values, not speed: compiling without XLA's backend optimisations
# (and its new CPU fusion emitters) takes a quarter of the time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _grad(params, static, x, t, y):
    lowered = jax.jit(jax.grad(_loss), static_argnums=1).lower(params, static, x, t, y)
    return compile_lowered(lowered, _FAST_COMPILE)(params, x, t, y)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def outputs(case):
    """Reference output, float32 output and bfloat16-compute output of one case."""
    x, t, y, ref = _inputs(case)
    out32 = eqx.filter_jit(_forward)(_load(case), x, t, y)
    out16 = eqx.filter_jit(_forward)(_load(case, compute_dtype=jnp.bfloat16), x, t, y)
    return ref, out32, out16


def test_float32_matches_the_reference(outputs):
    ref, out32, _ = outputs
    assert out32.dtype == jnp.float32
    assert rel_err(out32, ref) <= 1e-5


def test_bfloat16_compute_stays_close_to_float32(outputs):
    ref, out32, out16 = outputs
    assert out16.dtype == jnp.float32  # the output head is a float32 island
    assert np.isfinite(np.asarray(out16)).all()
    assert rel_err(out16, out32) <= 2e-2
    assert rel_err(out16, ref) <= 2e-2


def test_bfloat16_compute_gradients_are_finite_float32(case):
    x, t, y, _ = _inputs(case)
    model = _load(case, compute_dtype=jnp.bfloat16)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grads = _grad(params, static, x, t, y)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(g.dtype == jnp.float32 for g in leaves)  # parameters' dtype
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def _program(case, compute_dtype):
    x, t, y, _ = _inputs(case)
    model = _load(case, compute_dtype=compute_dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return jax.make_jaxpr(jax.value_and_grad(_loss), static_argnums=1)(params, static, x, t, y).jaxpr


def _dots(jaxpr):
    return [e for e in jaxpr_eqns(jaxpr) if e.primitive.name == "dot_general"]


_MATMULS = ("dot_general", *_dots_module.NAMES)  # `dense` binds the `_dots` primitives


def _matmuls(jaxpr):
    return [e for e in jaxpr_eqns(jaxpr) if e.primitive.name in _MATMULS]


def _has_batch_dims(eqn) -> bool:
    return eqn.primitive.name == "dot_general" and bool(eqn.params["dimension_numbers"][1][0])


def _dtypes(eqn):
    return {v.aval.dtype for v in eqn.invars}


def _is_head(eqn, channels):
    """The output head's matmuls (D_pix -> C): the only ones with an axis of size C."""
    return channels in {d for v in [*eqn.invars, *eqn.outvars] for d in v.aval.shape}


BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def test_bfloat16_compute_runs_the_matmuls_in_bfloat16(case):
    """Forward: every matmul multiplies bf16 operands, except the output head (a
    float32 island). Backward: every Linear has a bf16 operand (the adaLN Linears
    return float32 modulations, so their cotangents are float32)."""
    channels = MANIFEST[case]["init"]["in_channels"]
    x, t, y, _ = _inputs(case)
    model = _load(case, compute_dtype=jnp.bfloat16)
    forward = _matmuls(jax.make_jaxpr(_forward)(model, x, t, y).jaxpr)
    assert forward
    for e in forward:
        assert _dtypes(e) == ({F32} if _is_head(e, channels) else {BF16}), e
    linears = [e for e in _matmuls(_program(case, jnp.bfloat16)) if not _has_batch_dims(e)]
    for e in linears:
        assert _dtypes(e) == {F32} if _is_head(e, channels) else BF16 in _dtypes(e), e
    text = jax.jit(_forward).lower(model, x, t, y).as_text()
    assert any("dot_general" in line and "bf16" in line for line in text.splitlines())


def test_low_precision_dense_rounds_once():
    """Deliberate deviation, for speed on CPU: a bf16 Linear (`modules.dense`)
    accumulates in float32 (`preferred_element_type`), adds the bias in float32 and
    rounds once to bf16, where a plain bf16 matmul rounds the product and then the sum;
    XLA:CPU runs the float32-result form on the bf16 dot instructions
    (`tests/benchmarks/bf16_dots.py`)."""
    from pixeldit_eqx._ops import dense

    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 96), jnp.bfloat16)
    w = (jax.random.normal(kw, (48, 96)) * 0.1).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (48,), jnp.bfloat16)
    out = dense(x, w, b)
    assert out.dtype == jnp.bfloat16
    assert not _dots(jax.make_jaxpr(dense)(x, w, b).jaxpr)  # a `lowp_dot`, not a bf16-result dot_general
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
    once = jnp.asarray(exact.astype(np.float32)).astype(jnp.bfloat16)
    # float32 accumulation order aside (a rare last-bit tie), the one rounding of the exact result
    assert float(jnp.mean(out != once)) <= 0.01
    ulp = np.abs(np.asarray(once, np.float32)) * 2.0**-7
    assert (np.abs(np.asarray(out, np.float32) - np.asarray(once, np.float32)) <= ulp).all()


def test_low_precision_dense_backward_is_bf16_and_exact():
    """The backward matmuls of a bf16 `dense` (`_dots.lowp_dot`) multiply bf16
    operands, also under `vmap` (one matmul over all examples), and give the gradients
    of `dot_general(..., preferred_element_type=float32)` exactly: the cotangent they
    round to bf16 is that of a bf16 result."""
    from pixeldit_eqx._ops import dense

    kx, kw, kb, kc = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (3, 10, 32), jnp.bfloat16)
    w = jax.random.normal(kw, (24, 32), jnp.bfloat16)
    b = jax.random.normal(kb, (24,), jnp.bfloat16)
    ct = jax.random.normal(kc, (3, 10, 24), jnp.bfloat16)

    def plain(x, w, b):
        out = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return (out + b.astype(jnp.float32)[None, :]).astype(x.dtype)

    ours = jax.vmap(dense, in_axes=(0, None, None))
    (got, vjp), (want, vjp_want) = jax.vjp(ours, x, w, b), jax.vjp(jax.vmap(plain, in_axes=(0, None, None)), x, w, b)
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for g, h in zip(vjp(ct), vjp_want(ct), strict=True):
        assert g.dtype == h.dtype and np.array_equal(np.asarray(g, np.float32), np.asarray(h, np.float32))
    jaxpr = jax.make_jaxpr(lambda x, w, b: jax.vjp(ours, x, w, b)[1](ct))(x, w, b).jaxpr
    lowp = [e for e in jaxpr_eqns(jaxpr) if e.primitive.name == "pixeldit_lowp_dot"]
    assert len(lowp) == 3 and all(_dtypes(e) == {BF16} for e in lowp)  # forward, input and weight gradients
    assert any(e.outvars[0].aval.shape == w.shape for e in lowp)  # the weight gradient: one matmul, not per example


def test_float32_dense_merges_the_batch_into_the_rows():
    """A float32 `dense` (`_dots.rows_dot`) under `vmap` is one matmul over the merged
    batch and token axes, so its weight gradient contracts a single axis (XLA:CPU then
    writes that small result transposed instead of transposing the large cotangent).
    The forward pass is `dot_general`'s bit for bit, the gradients agree to float32
    round-off (the weight gradient sums in another order), forward-mode autodiff and
    per-example gradients (`vmap` of `grad`) work."""
    from pixeldit_eqx._ops import dense

    kx, kw, kb, kc = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(kx, (3, 10, 32))
    w = jax.random.normal(kw, (24, 32)) * 0.2
    b = jax.random.normal(kb, (24,))
    ct = jax.random.normal(kc, (3, 10, 24))

    def plain(x, w, b):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))) + b[None, :]

    ours, theirs = (jax.vmap(f, in_axes=(0, None, None)) for f in (dense, plain))
    (got, vjp), (want, vjp_want) = jax.vjp(ours, x, w, b), jax.vjp(theirs, x, w, b)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    for g, h in zip(vjp(ct), vjp_want(ct), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)

    jaxpr = jax.make_jaxpr(lambda x, w, b: jax.vjp(ours, x, w, b)[1](ct))(x, w, b).jaxpr
    rows = [e for e in jaxpr_eqns(jaxpr) if e.primitive.name == "pixeldit_rows_dot"]
    assert len(rows) == 3 and not _dots(jaxpr)  # forward, input and weight gradients
    assert all(v.aval.ndim == 2 for e in rows for v in e.invars)  # (3 * 10, d) rows
    (weight_grad,) = [e for e in rows if e.outvars[0].aval.shape in (w.shape, w.shape[::-1])]
    assert weight_grad.params["contract"] == ((0,), (0,))

    tangents = tuple(jax.random.normal(k, a.shape) for k, a in zip(jax.random.split(kc, 3), (x, w, b)))
    jvp_got = jax.jvp(ours, (x, w, b), tangents)[1]
    jvp_want = jax.jvp(theirs, (x, w, b), tangents)[1]
    np.testing.assert_allclose(np.asarray(jvp_got), np.asarray(jvp_want), rtol=1e-5, atol=1e-5)

    def per_example(f):
        return jax.vmap(jax.grad(lambda x, w: jnp.sum(f(x, w, b) ** 2), argnums=1), in_axes=(0, None))(x, w)

    np.testing.assert_allclose(np.asarray(per_example(dense)), np.asarray(per_example(plain)), rtol=1e-5, atol=1e-5)


def test_pixel_modulation_is_bf16_under_bf16_compute(getkey):
    """Deliberate deviation, for speed: under bf16 compute a PiT block's per-pixel adaLN
    modulation (its largest array) is rounded once to bf16 (a bf16 `dense` per chunk);
    the residual stream it modulates stays float32. In float32 it is float32."""
    import pixeldit_eqx as px

    cond = 40  # distinct from every other width, to find the modulation's matmuls by
    block = px.PiTBlock(8, cond, 2, 48, 4, key=getkey())
    chunk_wide = 4 * 8  # pixels per patch x pixel width
    x = jax.random.normal(getkey(), (5, 4, 8))
    s_cond = jax.random.normal(getkey(), (5, cond))
    angles = jnp.zeros((5, 6))
    for dtype in (jnp.bfloat16, jnp.float32):
        cast = px.cast_params(block, dtype)
        eqns = list(jaxpr_eqns(jax.make_jaxpr(cast)(x, s_cond.astype(dtype), angles).jaxpr))
        mods = [
            e.outvars[0]
            for e in eqns
            if e.primitive.name in _MATMULS
            and e.invars[0].aval.shape[-1] == cond
            and e.outvars[0].aval.shape[-1] == chunk_wide
        ]
        assert [v.aval.dtype for v in mods] == [F32] * 6  # six matmuls accumulate in float32 ...
        biased = set(mods) | {
            e.outvars[0] for e in eqns if e.primitive.name == "add" and any(v in mods for v in e.invars)
        }
        rounded = [
            e.outvars[0].aval.dtype
            for e in eqns
            if e.primitive.name == "convert_element_type" and e.invars[0] in biased
        ]
        assert rounded == ([BF16] * 6 if dtype == jnp.bfloat16 else []), rounded  # ... each rounded once
        assert cast(x, s_cond.astype(dtype), angles).dtype == jnp.float32


def test_float32_islands_in_a_bfloat16_program(case):
    """Norm statistics (rsqrt), the timestep sinusoid and the rope and sincos tables
    (sin, cos), the softmax (max, exp) and the nonlinearities of the token- and
    pixel-wise MLPs (erf, SwiGLU's logistic) are float32; the matmuls' operands are
    bf16 (`test_bfloat16_compute_runs_the_matmuls_in_bfloat16`)."""
    seen = set()
    for e in jaxpr_eqns(_program(case, jnp.bfloat16)):
        name = e.primitive.name
        dtypes = {v.aval.dtype for v in e.invars}
        if name in ("rsqrt", "sin", "cos", "reduce_max", "erf"):
            seen.add(name)
            assert dtypes == {jnp.dtype(jnp.float32)}, (name, e)
        if name == "exp" and dtypes == {jnp.dtype(jnp.float32)}:
            seen.add(name)  # the softmax, the sinusoid, erf's and SiLU's derivatives
        if name == "logistic" and e.invars[0].aval.ndim >= 3:  # SwiGLU: (batch, tokens, hidden)
            seen.add(name)  # (the conditioning vectors' SiLU acts in their own dtype)
            assert dtypes == {jnp.dtype(jnp.float32)}, (name, e)
    assert {"rsqrt", "sin", "cos", "reduce_max", "exp", "logistic", "erf"} <= seen


def test_float32_program_has_no_bfloat16(case):
    eqns = jaxpr_eqns(_program(case, None))
    dtypes = {v.aval.dtype for e in eqns for v in e.outvars if hasattr(v.aval, "dtype")}
    assert jnp.dtype(jnp.bfloat16) not in dtypes


def test_cast_params_leaves_buffers_ints_and_keys_alone(getkey):
    import pixeldit_eqx as px

    class Holder(eqx.Module):
        linear: eqx.nn.Linear
        table: px.Buffer
        count: jax.Array
        key: jax.Array

    holder = Holder(
        eqx.nn.Linear(3, 4, key=getkey()),
        px.Buffer(jnp.linspace(0.0, 1.0, 5)),
        jnp.arange(3, dtype=jnp.int32),
        getkey(),
    )
    cast = px.cast_params(holder, jnp.bfloat16)
    assert cast.linear.weight.dtype == jnp.bfloat16 and cast.linear.bias.dtype == jnp.bfloat16
    assert cast.table is holder.table and cast.table.array.dtype == jnp.float32
    assert cast.count is holder.count and cast.key is holder.key
    # A model under compute_dtype: the call casts, the stored parameters stay float32.
    model = _load("model_c2i", compute_dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("checkpoint", ["lean", True])
def test_checkpoint_gives_the_same_gradients(case, checkpoint):
    """`checkpoint="lean"` (the wide values recomputed too) and `True` (the whole scan
    body rematerialised) against the default (the values the blocks `keep`, the rest
    recomputed): the same gradients."""
    x, t, y, _ = _inputs(case)
    grads = {}
    for ckpt in (False, checkpoint):
        params, static = eqx.partition(_load(case, checkpoint=ckpt), eqx.is_inexact_array)
        grads[ckpt] = _grad(params, static, x, t, y)
    for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[checkpoint]), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(a).max()), 1e-30)


def _saved_residuals(model, *args):
    """The arrays the backward pass of `model(*args)` keeps: the leaves of `jax.vjp`'s
    pullback, by (shape, dtype)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _, pullback = jax.vjp(lambda p: jnp.sum(eqx.combine(p, static)(*args) ** 2), params)
    return collections.Counter((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(pullback) if eqx.is_array(leaf))


def test_lean_checkpoint_recomputes_the_wide_values():
    """`checkpoint="lean"` keeps neither the six per-pixel adaLN chunks (`(L, p2 * D_pix)`
    a layer) nor the two SwiGLU hidden layers (`(L, hidden)`), which the default keeps,
    and keeps less in all."""
    import pixeldit_eqx as px

    hw, patch, hidden, pix, depth = 16, 4, 32, 8, 2
    kept = {}
    for ckpt in (False, "lean"):
        model = px.PixelDiT(
            in_channels=3, patch_size=patch, num_groups=2, hidden_size=hidden, pixel_hidden_size=pix,
            patch_depth=depth, pixel_depth=depth, num_classes=3, checkpoint=ckpt, key=jax.random.key(0),
        )  # fmt: skip
        kept[ckpt] = _saved_residuals(model, jnp.ones((3, hw, hw)), 0.5, 1)
    tokens, p2, swiglu = (hw // patch) ** 2, patch * patch, int(2 * int(hidden * 4.0) / 3)
    f32 = jnp.dtype(jnp.float32)
    wide = collections.Counter({((depth, tokens, p2 * pix), f32): 6, ((depth, tokens, swiglu), f32): 2})
    assert kept[False] - kept["lean"] == wide
    size = {k: sum(np.prod(shape) * dtype.itemsize * n for (shape, dtype), n in v.items()) for k, v in kept.items()}
    assert size["lean"] < size[False]

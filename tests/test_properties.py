"""Invariants as properties (hypothesis): patchify and unpatchify are inverse, rope is a
rotation and relative, zero-modulated blocks are the identity, `vmap` of the model is a
loop over examples, and masked-out text is inert.

Every program is compiled once (shapes fixed, values drawn) or is a handful of small
ones; examples are derandomised so that the suite is repeatable.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, HealthCheck, settings, strategies as st

import pixeldit_eqx as px

from .helpers import arr, compiled, load_weights, normal, rel_err


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


seeds = st.integers(0, 2**31 - 1)


# --- Patches --------------------------------------------------------------------------


@functools.cache
def _patches_and_round_trip(c: int, p: int, hs: int, ws: int):
    """One program per shape: the patches of `x`, and `x` back from them."""

    def run(x):
        patches = px.patchify(x, p)
        pixels = patches.reshape(hs * ws, c, p * p).transpose(0, 2, 1)  # (L, p*p, C), pixels row-major
        return patches, px.unpatchify(pixels, p, hs * p, ws * p)

    return jax.jit(run)


@_settings(12)
@given(c=st.integers(1, 4), p=st.integers(1, 4), hs=st.integers(1, 4), ws=st.integers(1, 4), seed=seeds)
def test_patchify_and_unpatchify_are_inverse(c, p, hs, ws, seed):
    x = normal(seed, (c, hs * p, ws * p))
    patches, back = map(np.asarray, _patches_and_round_trip(c, p, hs, ws)(arr(x)))
    assert patches.shape == (hs * ws, c * p * p)
    # the reference's `unfold` order: patches row-major, each flattened as (C, p_row, p_col)
    for index in {0, hs * ws - 1, seed % (hs * ws)}:
        r, q = divmod(index, ws)
        np.testing.assert_array_equal(patches[index], x[:, r * p : (r + 1) * p, q * p : (q + 1) * p].reshape(-1))
    np.testing.assert_array_equal(back, x)


# --- Rope -----------------------------------------------------------------------------

HD = 16  # head dim of the rope properties


@functools.cache
def _apply():
    return jax.jit(px.apply_rope)


@functools.cache
def _rotated_dot():
    """`q . k` after rotating `q` by angles `a` and `k` by angles `b` (one head)."""

    def dot(q, k, a, b):
        rq = px.apply_rope(q[None, None], a[None])
        rk = px.apply_rope(k[None, None], b[None])
        return jnp.sum(rq * rk)

    return jax.jit(dot)


def _dot(q, k, a, b) -> float:
    return float(_rotated_dot()(arr(q), arr(k), arr(a, np.float32), arr(b, np.float32)))


@_settings(20)
@given(seed=seeds, scale=st.sampled_from([1e-3, 1.0, 1e3]), turns=st.sampled_from([1.0, 100.0]))
def test_rope_rotates_each_pair_by_its_angle(seed, scale, turns):
    q = scale * normal(seed, (6, 2, HD))
    angles = turns * normal(seed + 1, (6, HD // 2))
    out = np.asarray(_apply()(arr(q), arr(angles)), np.float64)
    as_complex = lambda v: v[..., 0::2] + 1j * v[..., 1::2]  # noqa: E731 (pairs (x[2j], x[2j+1]))
    expected = as_complex(q.astype(np.float64)) * np.exp(1j * angles.astype(np.float64))[:, None, :]
    np.testing.assert_allclose(as_complex(out), expected, rtol=1e-5, atol=2e-5 * scale)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)


N1 = 48  # text positions of the 1D property


@_settings(20)
@given(seed=seeds, i=st.integers(0, N1 - 1), j=st.integers(0, N1 - 1), data=st.data())
def test_rope_1d_is_relative(seed, i, j, data):
    """q . k after rope depends on the position difference only."""
    shift = data.draw(st.integers(-min(i, j), N1 - 1 - max(i, j)))
    table = np.asarray(px.rope_1d(HD, N1))
    q, k = normal(seed, (HD,)), normal(seed + 1, (HD,))
    scale = np.linalg.norm(q) * np.linalg.norm(k)
    assert abs(_dot(q, k, table[i], table[j]) - _dot(q, k, table[i + shift], table[j + shift])) <= 1e-5 * scale


@functools.cache
def _rope_2d(h: int, w: int) -> np.ndarray:
    return np.asarray(jax.jit(lambda: px.rope_2d(HD, h, w))(), np.float64)


@functools.cache
def _freqs_2d() -> np.ndarray:
    """The 2D rope frequencies, read off the library's table: on a 1x2 grid the second
    column sits at x = 16 (positions `linspace(0, 16, w)`), y = 0."""
    row = _rope_2d(1, 2)[1]
    assert not row[1::2].any()
    return row[0::2] / 16.0


def _angles_2d(x: float, y: float) -> np.ndarray:
    """Angles at position (x, y): pairs alternate x and y (`x f_0, y f_0, x f_1, ...`)."""
    f = _freqs_2d()
    return np.stack([x * f, y * f], axis=-1).reshape(HD // 2)


@_settings(20)
@given(
    seed=seeds,
    p1=st.tuples(st.integers(0, 15), st.integers(0, 15)),
    p2=st.tuples(st.integers(0, 15), st.integers(0, 15)),
    shift=st.tuples(st.integers(-20, 20), st.integers(-20, 20)),
)
def test_rope_2d_is_relative_on_each_axis(seed, p1, p2, shift):
    """On integer grids: shifting both positions by the same (dx, dy) keeps q . k."""
    q, k = normal(seed, (HD,)), normal(seed + 1, (HD,))
    scale = np.linalg.norm(q) * np.linalg.norm(k)
    before = _dot(q, k, _angles_2d(*p1), _angles_2d(*p2))
    moved = lambda p: _angles_2d(p[0] + shift[0], p[1] + shift[1])  # noqa: E731
    assert abs(before - _dot(q, k, moved(p1), moved(p2))) <= 2e-5 * scale


@_settings(15)
@given(h=st.integers(1, 6), w=st.integers(1, 6), seed=seeds, data=st.data())
def test_rope_2d_table_is_axial_and_relative_on_its_grid(h, w, seed, data):
    """The library's table is `_angles_2d` at `linspace(0, 16, n)` positions, row-major
    over (y, x); moving two cells by the same number of rows and columns keeps q . k."""
    table = _rope_2d(h, w)
    xs = np.linspace(0, 16, w) if w > 1 else np.zeros(1)
    ys = np.linspace(0, 16, h) if h > 1 else np.zeros(1)
    expected = np.stack([_angles_2d(x, y) for y in ys for x in xs])
    np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-5)
    r1, r2 = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, h - 1))
    c1, c2 = data.draw(st.integers(0, w - 1)), data.draw(st.integers(0, w - 1))
    dr = data.draw(st.integers(-min(r1, r2), h - 1 - max(r1, r2)))
    dc = data.draw(st.integers(-min(c1, c2), w - 1 - max(c1, c2)))
    q, k = normal(seed, (HD,)), normal(seed + 1, (HD,))
    cell = lambda r, c: table[r * w + c]  # noqa: E731
    before = _dot(q, k, cell(r1, c1), cell(r2, c2))
    after = _dot(q, k, cell(r1 + dr, c1 + dc), cell(r2 + dr, c2 + dc))
    assert abs(before - after) <= 2e-5 * np.linalg.norm(q) * np.linalg.norm(k)


def test_rope_dot_depends_on_the_offset():
    """The relativity properties are not vacuous: another offset gives another q . k."""
    q, k = normal(0, (HD,)), normal(1, (HD,))
    assert abs(_dot(q, k, _angles_2d(3, 4), _angles_2d(5, 4)) - _dot(q, k, _angles_2d(3, 4), _angles_2d(6, 4))) > 1e-3
    assert abs(_dot(q, k, _angles_2d(3, 4), _angles_2d(3, 6)) - _dot(q, k, _angles_2d(3, 4), _angles_2d(3, 7))) > 1e-3


# --- Zero-modulated blocks ------------------------------------------------------------


def _zero_adaln(block):
    zero = lambda a: arr(np.zeros(a.shape, a.dtype))  # noqa: E731
    names = [n for n in ("adaln", "adaln_img", "adaln_txt") if hasattr(block, n)]
    linears = [getattr(block, n) for n in names]
    where = lambda b: [x for n in names for x in (getattr(b, n).weight, getattr(b, n).bias)]  # noqa: E731
    return eqx.tree_at(where, block, [zero(x) for linear in linears for x in (linear.weight, linear.bias)])


@pytest.fixture(scope="module")
def blocks():
    """The reference fixtures' blocks (every weight random and non-zero), each with a
    compiled call; angles of a 3x5 grid and 6 text tokens."""

    def load(make, case):
        return px.load_state_dict(eqx.filter_eval_shape(make, key=jr.key(0)), load_weights(case))

    image_angles, text_angles = px.rope_2d(8, 3, 5), px.rope_1d(8, 6)
    dit = load(lambda key: px.DiTBlock(32, 4, key=key), "dit_block")
    pit = load(lambda key: px.PiTBlock(8, 32, 2, 32, 4, post_modulation=False, key=key), "pit_block_pre")
    mmdit = load(lambda key: px.MMDiTBlock(32, 4, key=key), "mmdit_block")
    x, c, y, pix, mask = (
        normal(0, (15, 32)),
        normal(1, (32,)),
        normal(2, (6, 32)),
        normal(3, (15, 4, 8)),
        np.ones(6, bool),
    )
    return {
        "dit": (dit, compiled(lambda b, x, c: b(x, c, image_angles), dit, arr(x), arr(c))),
        "pit": (pit, compiled(lambda b, x, s: b(x, s, image_angles), pit, arr(pix), arr(x))),
        "mmdit": (
            mmdit,
            compiled(
                lambda b, x, y, c, m: b((x, y), c, image_angles, text_angles, m), mmdit, *map(arr, (x, y, c, mask))
            ),
        ),
    }


@_settings(10)
@given(seed=seeds, scale=st.sampled_from([1.0, 100.0]), mask_bits=st.integers(0, 2**6 - 1))
def test_zero_modulated_blocks_are_the_identity(blocks, seed, scale, mask_bits):
    """With a zero adaLN Linear every gate is zero: a block returns its input exactly
    (DiT, MMDiT on both streams, pre-modulated PiT)."""
    x, y, c = scale * normal(seed, (15, 32)), scale * normal(seed + 1, (6, 32)), normal(seed + 2, (32,))
    pix = scale * normal(seed + 3, (15, 4, 8))
    mask = (mask_bits >> np.arange(6)) & 1 == 1

    dit, run = blocks["dit"]
    np.testing.assert_array_equal(run(_zero_adaln(dit), arr(x), arr(c)), x)
    pit, run = blocks["pit"]
    np.testing.assert_array_equal(run(_zero_adaln(pit), arr(pix), arr(x)), pix)
    mmdit, run = blocks["mmdit"]
    out_x, out_y = run(_zero_adaln(mmdit), arr(x), arr(y), arr(c), arr(mask))
    np.testing.assert_array_equal(out_x, x)
    np.testing.assert_array_equal(out_y, y)


def test_modulated_blocks_are_not_the_identity(blocks):
    """...and with the fixtures' non-zero adaLN they are not: the property has teeth."""
    x, c, y, pix = normal(0, (15, 32)), normal(1, (32,)), normal(2, (6, 32)), normal(3, (15, 4, 8))
    dit, run = blocks["dit"]
    assert not np.allclose(run(dit, arr(x), arr(c)), x)
    pit, run = blocks["pit"]
    assert not np.allclose(run(pit, arr(pix), arr(x)), pix)
    mmdit, run = blocks["mmdit"]
    out_x, out_y = run(mmdit, arr(x), arr(y), arr(c), arr(np.ones(6, bool)))
    assert not np.allclose(out_x, x) and not np.allclose(out_y, y)


# --- Whole models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def c2i_runs(c2i_reference):
    """The c2i fixture model with a batched (`vmap`) and a one-example compiled call."""
    model = c2i_reference
    xs, ts, ys = arr(normal(0, (3, 3, 16, 16))), arr(np.zeros(3, np.float32)), arr(np.zeros(3, np.int32))
    batched = compiled(lambda m, x, t, y: jax.vmap(m)(x, t, y), model, xs, ts, ys)
    single = compiled(lambda m, x, t, y: m(x, t, y), model, xs[0], ts[0], ys[0])
    return model, batched, single


@_settings(6)
@given(
    seed=seeds,
    ts=st.lists(st.floats(0.0, 1.0, width=32), min_size=3, max_size=3),
    ys=st.lists(st.integers(0, 10), min_size=3, max_size=3),
)
def test_vmap_of_the_model_equals_a_loop(c2i_runs, seed, ts, ys):
    model, batched, single = c2i_runs
    xs, ts, ys = normal(seed, (3, 3, 16, 16)), np.asarray(ts, np.float32), np.asarray(ys, np.int32)
    out = np.asarray(batched(model, arr(xs), arr(ts), arr(ys)))
    loop = np.stack([np.asarray(single(model, arr(xs[i]), arr(ts[i]), arr(ys[i]))) for i in range(3)])
    assert rel_err(out, loop) <= 1e-5


T_REAL, T_PAD = 5, 4


@pytest.fixture(scope="module")
def t2i_run(t2i_reference):
    """The t2i fixture model, compiled once for 5 real and 4 padding text tokens, and
    its output with all-zero padding."""
    model = t2i_reference
    x, t, real = arr(normal(0, (3, 16, 16))), arr(0.3, np.float32), normal(1, (T_REAL, 24))
    mask = arr(np.arange(T_REAL + T_PAD) < T_REAL)
    text = np.concatenate([real, np.zeros((T_PAD, 24), np.float32)])
    run = compiled(lambda m, x, t, text, mask: m(x, t, text, mask), model, x, t, arr(text), mask)

    def call(text, mask=mask):
        return np.asarray(run(model, x, t, arr(text), mask))

    return call, real, call(text)


@_settings(8)
@given(perm=st.permutations(range(T_PAD)), seed=seeds, scale=st.sampled_from([1.0, 100.0]))
def test_masked_out_text_is_inert(t2i_run, perm, seed, scale):
    """Whatever the masked-out padding holds, in whatever order, the output is the same."""
    call, real, base = t2i_run
    junk = scale * normal(seed, (T_PAD, 24))
    out = call(np.concatenate([real, junk]))
    np.testing.assert_allclose(call(np.concatenate([real, junk[list(perm)]])), out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out, base, rtol=0, atol=1e-6)


def test_unmasked_text_does_matter(t2i_run):
    """The model is not blind to what it should see: the order of the real tokens and
    unmasked junk both change the output."""
    call, real, base = t2i_run
    swapped = np.concatenate([real[[1, 0, 2, 3, 4]], np.zeros((T_PAD, 24), np.float32)])
    assert rel_err(call(swapped), base) > 1e-4
    junk = np.concatenate([real, normal(9, (T_PAD, 24))])
    assert rel_err(call(junk, arr(np.ones(T_REAL + T_PAD, bool))), base) > 1e-4

"""Tests of `pixeldit_eqx.checkpoint` in one process (one device).

Sharded saving by several processes and restoring onto other meshes are tested in
`tests/test_multi_process.py`; here: the round trip is bit-exact (typed PRNG keys
included) and resumes training bit-exactly, saving runs in the background, and
checkpoints that do not fit are refused.
"""

import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import checkpoint, sharding, train

from .helpers import SMALL_RGB_C2I


CONFIG = SMALL_RGB_C2I


def _model(seed: int = 0, **overrides):
    """A tiny PixelDiT filled from numpy: nothing is compiled to build it."""
    skeleton = eqx.filter_eval_shape(lambda k: px.PixelDiT(**(CONFIG | overrides), key=k), jr.key(0))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(fill, skeleton)


@pytest.fixture(scope="module")
def setup():
    """A PixelDiT training state (nothing compiled: its step and Adam's moments set by
    hand), and its optimizer."""
    optimizer = train.default_optimizer(1e-3)
    state = train.init_train_state(_model(), optimizer, key=jr.key(1))
    rng = np.random.default_rng(2)

    def fill(x):
        return jnp.asarray(rng.standard_normal(x.shape), dtype=x.dtype) if eqx.is_inexact_array(x) else x

    state = eqx.tree_at(lambda s: (s.step, s.opt_state), state, (jnp.int32(1), jax.tree.map(fill, state.opt_state)))
    return optimizer, state


def _arrays(tree):
    out = []
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jr.key_data(x)
        out.append(np.asarray(x))
    return out


def _assert_bitwise_equal(a, b):
    got, want = _arrays(a), _arrays(b)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_round_trip_is_bit_exact(tmp_path, setup):
    optimizer, state = setup
    like = eqx.filter_eval_shape(lambda: train.init_train_state(_model(), optimizer, key=jr.key(0)))
    with checkpoint.Checkpointer(tmp_path / "run") as checkpoints:
        assert checkpoints.latest_step() is None
        checkpoints.save(state)  # filed under int(state.step) == 1
        checkpoints.wait()
        assert checkpoints.all_steps() == [1]
        restored = checkpoints.restore(like)
    assert isinstance(restored, train.TrainState)
    _assert_bitwise_equal(restored, state)
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert jr.key_impl(restored.key) == jr.key_impl(state.key)
    assert int(restored.step) == 1
    # Everything but the arrays comes from `like`.
    assert jax.tree.structure(restored) == jax.tree.structure(state)


def test_training_resumes_bit_exactly(tmp_path):
    """A step from the restored state equals the step from the saved one (any model:
    a linear map here, to compile in a moment)."""

    def loss_fn(model, batch, key):
        x, y = batch
        noise = jr.normal(key, y.shape)
        return jnp.mean(jnp.square(jax.vmap(model)(x) - y + 0.1 * noise))

    optimizer = train.default_optimizer(1e-2)
    step = eqx.filter_jit(train.make_train_step(loss_fn, optimizer))
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32))
    state = train.init_train_state(eqx.nn.Linear(16, 4, key=jr.key(0)), optimizer, key=jr.key(1))
    state, _ = step(state, batch)
    with checkpoint.Checkpointer(tmp_path / "run") as checkpoints:
        checkpoints.save(state)
        checkpoints.wait()
        restored = checkpoints.restore(state)  # onto the shardings of `state`'s arrays
    expected = step(state, batch)[0]
    resumed = step(restored, batch)[0]
    assert int(resumed.step) == 2
    _assert_bitwise_equal(resumed, expected)


def test_restore_places_arrays_on_the_given_shardings(tmp_path, setup):
    _, state = setup
    mesh = sharding.make_mesh()
    shardings = sharding.state_sharding(state, mesh, strategy="fsdp", min_size=0)
    with checkpoint.Checkpointer(tmp_path / "run", async_save=False) as checkpoints:
        checkpoints.save(state, step=7)
        restored = checkpoints.restore(eqx.filter_eval_shape(lambda: state), shardings=shardings)
    placed = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(restored, eqx.is_array)))
    assert placed == jax.tree.leaves(shardings)
    _assert_bitwise_equal(restored, state)


def test_save_returns_before_the_write_finishes(tmp_path, setup, monkeypatch):
    """The files are written in the background: held back here until released."""
    import orbax.checkpoint as ocp

    _, state = setup
    release = threading.Event()

    class HeldBack:
        def result(self, timeout=None):
            if not release.wait(timeout=60):
                raise TimeoutError("the test never released the write")

        def cancel(self):
            return False

    original = ocp.StandardCheckpointHandler.async_save

    async def held_back_save(self, *args, **kwargs):
        futures = await original(self, *args, **kwargs)
        return [*(futures or []), HeldBack()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", held_back_save)
    with checkpoint.Checkpointer(tmp_path / "run") as checkpoints:
        try:
            checkpoints.save(state, step=3)  # returns: the write waits for `release`
            assert checkpoints.saving()
            assert checkpoints.all_steps() == []
            assert not (tmp_path / "run" / "3").exists()
        finally:
            release.set()
        checkpoints.wait()
        assert not checkpoints.saving()
        assert checkpoints.all_steps() == [3]
        _assert_bitwise_equal(checkpoints.restore(eqx.filter_eval_shape(lambda: state)), state)


def test_refuses_what_does_not_fit(tmp_path, setup):
    optimizer, state = setup
    with checkpoint.Checkpointer(tmp_path / "run", async_save=False, max_to_keep=2) as checkpoints:
        with pytest.raises(ValueError, match="`directory`: expected a saved checkpoint in .*, found none"):
            checkpoints.restore(state)
        checkpoints.save(state, step=1)
        with pytest.raises(ValueError, match=r"`step`: expected a step not saved yet, got 1 \(saved: \[1\]\)"):
            checkpoints.save(state, step=1)
        with pytest.raises(ValueError, match=r"`step`: expected one of the saved steps \[1\], got 5"):
            checkpoints.restore(state, step=5)
        with pytest.raises(ValueError, match="`step` must be an integer >= 0, got step=-1"):
            checkpoints.save(state, step=-1)
        wider = eqx.filter_eval_shape(lambda: train.init_train_state(_model(hidden_size=64), optimizer, key=jr.key(0)))
        with pytest.raises(ValueError, match="`like_state`: the checkpoint of step 1 in .* does not fit it"):
            checkpoints.restore(wider)
        with pytest.raises(ValueError, match="`shardings`: expected the structure of `like_state`"):
            checkpoints.restore(state, shardings=[None])
        checkpoints.save(state, step=2)
        checkpoints.save(state, step=3)
        assert checkpoints.all_steps() == [2, 3]  # max_to_keep
    with pytest.raises(ValueError, match="`max_to_keep` must be an integer >= 1 or None, got max_to_keep=0"):
        checkpoint.Checkpointer(tmp_path / "other", max_to_keep=0)

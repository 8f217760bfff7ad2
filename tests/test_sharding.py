"""Tests of `pixeldit_eqx.sharding`: sharded training and sampling against one device.

The checks run on 8 devices. The main test process has however many it was started with
(one CPU device, usually) and JAX is initialised by then, so `test_on_8_simulated_devices`
reruns this file with pytest in a subprocess whose environment forces 8 host CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`). The subprocess reads the same
`conftest.py` and `pyproject.toml` (strict dtype and rank promotion, jaxtyping + beartype,
warnings as errors). In a process that already has 8 devices the checks run in place.

The sharded and the single-device programs are compiled in the same process with the
same flags; the subprocess compiles at XLA's lowest backend optimisation level, which only
makes compiling (most of this file's time) several times faster.
"""

import os
import pathlib
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pixeldit_eqx as px
from pixeldit_eqx import flow, sharding, train
from pixeldit_eqx.sharding import fsdp_spec

from .helpers import SMALL_RGB_C2I


NUM_DEVICES = 8
BATCH = 16
CHILD_ENV = "PIXELDIT_SHARDING_CHILD"
ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = SMALL_RGB_C2I
RTOL, ATOL = 1e-5, 1e-6


# --- The subprocess ---------------------------------------------------------------------


def test_on_8_simulated_devices():
    """Runs the rest of this file in a subprocess with 8 simulated CPU devices."""
    if jax.device_count() >= NUM_DEVICES:
        pytest.skip(f"this process has {jax.device_count()} devices: the checks run in it directly")
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={NUM_DEVICES} --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    # The promotion rules of this process (conftest.py sets them again in the child).
    env["JAX_NUMPY_DTYPE_PROMOTION"] = str(jax.config.jax_numpy_dtype_promotion)
    env["JAX_NUMPY_RANK_PROMOTION"] = str(jax.config.jax_numpy_rank_promotion)
    env[CHILD_ENV] = "1"
    command = [sys.executable, "-m", "pytest", str(pathlib.Path(__file__).resolve())]
    command += ["-q", "-k", "not test_on_8_simulated_devices", "-m", "not slow", "--durations=5"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"8-device run failed after {time.perf_counter() - start:.0f} s:\n{output}"
    assert " passed" in result.stdout and " skipped" not in result.stdout, output


@pytest.fixture(scope="module")
def mesh():
    """The 8-device mesh; skips (fails, in the subprocess) with fewer devices."""
    if jax.device_count() < NUM_DEVICES:
        message = f"needs {NUM_DEVICES} devices, has {jax.device_count()}; run by test_on_8_simulated_devices"
        if os.environ.get(CHILD_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return sharding.make_mesh(NUM_DEVICES)


# --- Fixtures ---------------------------------------------------------------------------


def _model(seed: int = 0):
    """A tiny PixelDiT with every parameter random (no zero-initialised layer, so every
    gradient is non-zero), filled from numpy: nothing is compiled to build it."""
    skeleton = eqx.filter_eval_shape(lambda k: px.PixelDiT(**CONFIG, key=k), jr.key(0))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(fill, skeleton)


@pytest.fixture(scope="module")
def setup():
    """A fresh state builder, the optimizer and a batch, as numpy-backed arrays."""
    # Adam's first update is lr * g / (|g| + eps): for a gradient entry near eps it turns
    # float32 rounding in g (which the order of the sharded sums changes) into differences
    # of up to lr / 4 in the parameter. eps = 1e-3 keeps the update a smooth function of
    # the gradient at float32 resolution (with eps = 1e-6 one entry of a gradient near
    # 1e-6 moved its parameter 1.2e-6 apart, over the tolerance); the gradients themselves
    # are compared through Adam's moments.
    optimizer = train.default_optimizer(1e-3, eps=1e-3)
    model = _model()

    def fresh_state():
        # New buffers every time: the sharded step donates (deletes) the state it gets.
        state = train.init_train_state(model, optimizer, key=jr.key(1))
        return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)

    rng = np.random.default_rng(1)
    images = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, CONFIG["num_classes"], size=(BATCH,)).astype(np.int32)
    return fresh_state, optimizer, (images, labels)


@pytest.fixture(scope="module")
def single_device(setup):
    """Two steps of the plain single-device step: the states after each, and metrics."""
    fresh_state, optimizer, batch = setup
    step = eqx.filter_jit(train.make_train_step(train.c2i_loss, optimizer))
    state = fresh_state()
    states, metrics = [], []
    for _ in range(2):
        state, m = step(state, batch)
        states.append(state)
        metrics.append(m)
    return states, metrics


def _arrays(tree):
    """The array leaves, PRNG keys as their key data."""
    out = []
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jr.key_data(x)
        out.append(np.asarray(x))
    return out


def _with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if eqx.is_array(x)]


# --- The FSDP rule (any device count) ---------------------------------------------------


def test_fsdp_spec_rule():
    assert fsdp_spec((128, 32), 8) == P("data")
    assert fsdp_spec((32, 128), 8) == P(None, "data")
    assert fsdp_spec((1, 128, 32), 8, "batch") == P(None, "batch")
    assert fsdp_spec((64, 64), 8) == P("data")  # a tie: the first
    assert fsdp_spec((4100, 12), 8) == P()  # no dimension divisible by 8
    assert fsdp_spec((4096,), 8) == P("data")
    assert fsdp_spec((32,), 8) == P()  # smaller than min_size
    assert fsdp_spec((32,), 8, min_size=0) == P("data")
    assert fsdp_spec((), 8, min_size=0) == P()
    assert fsdp_spec((6, 4096), 8) == P(None, "data")
    assert fsdp_spec((4, 4096), 8, min_size=0) == P(None, "data")
    with pytest.raises(ValueError, match="`axis_size` must be an integer >= 1, got axis_size=0"):
        fsdp_spec((8,), 0)
    with pytest.raises(ValueError, match="`min_size` must be an integer >= 0, got min_size=-1"):
        fsdp_spec((8,), 8, min_size=-1)


def test_make_mesh_validates():
    with pytest.raises(ValueError, match=r"`num_devices` must be an integer in \[1, \d+\]"):
        sharding.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="`num_devices`"):
        sharding.make_mesh(0)
    mesh = sharding.make_mesh(1, axis="batch")
    assert mesh.axis_names == ("batch",) and mesh.shape["batch"] == 1
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


# --- Layouts (8 devices) ----------------------------------------------------------------


def test_shard_batch_splits_over_the_data_axis(mesh, setup):
    images, labels = sharding.shard_batch(setup[2], mesh)
    for x, shape in ((images, (2, 3, 8, 8)), (labels, (2,))):
        assert x.sharding.spec == P("data")
        assert not x.sharding.is_fully_replicated
        shards = x.addressable_shards
        assert len(shards) == NUM_DEVICES and len({s.device for s in shards}) == NUM_DEVICES
        assert all(s.data.shape == shape for s in shards)
    np.testing.assert_array_equal(np.asarray(images), setup[2][0])
    assert sharding.batch_sharding(mesh) == images.sharding


def test_replicated_state_layout(mesh, setup):
    state = sharding.shard_state(setup[0](), mesh, strategy="replicated")
    leaves = jax.tree.leaves(eqx.filter(state, eqx.is_array))
    assert leaves
    for x in leaves:
        assert x.sharding.spec == P() and x.sharding.is_fully_replicated
        assert len(x.addressable_shards) == NUM_DEVICES
        assert all(s.data.shape == x.shape for s in x.addressable_shards)


def test_fsdp_state_layout(mesh, setup):
    state = sharding.shard_state(setup[0](), mesh, strategy="fsdp")
    split = 0
    for path, x in _with_paths(state):
        expected = P() if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else sharding.fsdp_spec(x.shape, NUM_DEVICES)
        assert x.sharding.spec == expected, path
        if expected == P():
            assert x.sharding.is_fully_replicated, path
            continue
        split += 1
        dim = len(expected) - 1
        shard_shape = x.shape[:dim] + (x.shape[dim] // NUM_DEVICES,) + x.shape[dim + 1 :]
        assert not x.sharding.is_fully_replicated, path
        assert {s.data.shape for s in x.addressable_shards} == {shard_shape}, path
        assert len({s.device for s in x.addressable_shards}) == NUM_DEVICES, path
    # Model, EMA, Adam's two moments: the large weights of each are split.
    assert split >= 4 * 4
    model_specs = [x.sharding.spec for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array))]
    assert any(s != P() for s in model_specs) and any(s == P() for s in model_specs)
    assert state.key.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    planned = sharding.state_sharding(eqx.filter_eval_shape(setup[0]), mesh, strategy="fsdp")
    actual = jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array))
    assert jax.tree.leaves(planned) == jax.tree.leaves(actual)


# --- The step (8 devices) ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["replicated", "fsdp"])
def test_sharded_step_equals_single_device_step(mesh, setup, single_device, strategy):
    fresh_state, optimizer, batch = setup
    expected_states, expected_metrics = single_device
    step = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy=strategy)
    state = sharding.shard_state(fresh_state(), mesh, strategy=strategy)
    layout = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array)))
    sharded_batch = sharding.shard_batch(batch, mesh)
    for i in range(2):
        previous = state
        state, metrics = step(state, sharded_batch)
        if i == 0:
            # Donated. (Checked before anything reads the state on the host: on CPU, a
            # numpy view of a buffer keeps it alive and the donation is skipped.)
            kept = [p for p, x in _with_paths(previous) if not x.is_deleted()]
            assert not kept, kept
        # The state comes back in the layout it went in.
        assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array))) == layout
        for name in ("loss", "grad_norm"):
            assert metrics[name].sharding.is_fully_replicated
            np.testing.assert_allclose(metrics[name], expected_metrics[i][name], rtol=RTOL, atol=ATOL, err_msg=name)
        got, want = _arrays(state), _arrays(expected_states[i])
        assert len(got) == len(want)
        paths = [p for p, _ in _with_paths(state)]
        for path, g, w in zip(paths, got, want):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"step {i + 1}: {path}")
    assert int(state.step) == 2
    # The parameters moved: the comparison is not of two untouched copies.
    moved = [np.max(np.abs(a - b)) for a, b in zip(_arrays(state.model), _arrays(_model()))]
    assert max(moved) > 1e-4


@pytest.mark.parametrize("strategy", ["replicated", "fsdp"])
def test_sharded_steps_per_call_equal_single_device_steps(mesh, setup, single_device, strategy):
    """`steps_per_call`: several steps in one call (a shorter list runs with its padding
    skipped), the same numbers as the single-device steps, and `fit` drives it."""
    fresh_state, optimizer, batch = setup
    expected_states, expected_metrics = single_device
    steps = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy=strategy, steps_per_call=3)
    state = sharding.shard_state(fresh_state(), mesh, strategy=strategy)
    layout = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array)))
    previous = state
    state, metrics = steps(state, [sharding.shard_batch(batch, mesh), batch])  # sharded and numpy
    kept = [p for p, x in _with_paths(previous) if not x.is_deleted()]
    assert not kept, kept
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array))) == layout
    for name in ("loss", "grad_norm"):
        assert metrics[name].shape == (2,)
        want = [m[name] for m in expected_metrics]
        np.testing.assert_allclose(metrics[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
    for path, g, w in zip([p for p, _ in _with_paths(state)], _arrays(state), _arrays(expected_states[1])):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=path)
    state, losses = train.fit(steps, state, lambda i: batch, num_steps=4, progress=False)
    assert int(state.step) == 6 and losses.shape == (4,) and np.isfinite(losses).all()
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, eqx.filter(state, eqx.is_array))) == layout


def test_sharded_step_takes_any_model_and_numpy_batches(mesh):
    """The step is model-agnostic; a numpy batch is split inside the call."""

    def loss_fn(model, batch, key):
        x, y = batch
        return jnp.mean(jnp.square(jax.vmap(model)(x) - y))

    optimizer = train.default_optimizer(1e-2, eps=1e-6)
    model = eqx.nn.Linear(64, 8, key=jr.key(0))
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((BATCH, 64)).astype(np.float32), rng.standard_normal((BATCH, 8)).astype(np.float32))
    expected, expected_metrics = eqx.filter_jit(train.make_train_step(loss_fn, optimizer))(
        train.init_train_state(model, optimizer, key=jr.key(1)), batch
    )
    step = sharding.make_sharded_train_step(loss_fn, optimizer, mesh, strategy="fsdp", min_size=0)
    # Created split, inside jit: no device holds the whole state.
    init = eqx.filter_jit(
        lambda key: sharding.shard_state(
            train.init_train_state(model, optimizer, key=key), mesh, strategy="fsdp", min_size=0
        )
    )
    state = init(jr.key(1))
    weights = [x for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)) if x.shape == (8, 64)]
    assert len(weights) == 4  # model, EMA, Adam's mu and nu
    assert all(x.sharding.spec == P(None, "data") for x in weights)
    state, metrics = step(state, batch)
    assert state.model.weight.sharding.spec == P(None, "data")  # (8, 64): 64 is the largest
    assert state.model.bias.sharding.spec == P("data")
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=RTOL, atol=ATOL)
    for g, w in zip(_arrays(state), _arrays(expected)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


class _Scaled(eqx.Module):
    """A Linear times a frozen `Buffer`: the model and the EMA share the Buffer's array."""

    linear: eqx.nn.Linear
    scale: px.Buffer

    def __call__(self, x):
        return self.linear(x) * self.scale.value


@pytest.mark.parametrize("steps_per_call", [None, 2])
def test_arrays_held_twice_stay_shared(mesh, steps_per_call):
    """`shard_state` places an array the state holds twice once, and the sharded step,
    one step or several per call, passes it through: never copied, never donated."""

    def loss_fn(model, batch, key):
        x, y = batch
        return jnp.mean(jnp.square(jax.vmap(model)(x) - y))

    optimizer = train.default_optimizer(1e-2, eps=1e-6)
    model = _Scaled(eqx.nn.Linear(64, 8, key=jr.key(0)), px.Buffer(jnp.arange(1.0, 9.0)))
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((BATCH, 64)).astype(np.float32), rng.standard_normal((BATCH, 8)).astype(np.float32))
    state = train.init_train_state(model, optimizer, key=jr.key(1))
    expected, expected_metrics = eqx.filter_jit(train.make_train_step(loss_fn, optimizer))(state, batch)
    placed = sharding.shard_state(state, mesh, strategy="fsdp", min_size=0)
    scale = placed.model.scale.value
    assert placed.ema.scale.value is scale
    step = sharding.make_sharded_train_step(
        loss_fn, optimizer, mesh, strategy="fsdp", min_size=0, steps_per_call=steps_per_call
    )
    new, metrics = step(placed, batch if steps_per_call is None else [batch])
    assert new.model.scale.value is scale and new.ema.scale.value is scale and not scale.is_deleted()
    assert placed.model.linear.weight.is_deleted()
    np.testing.assert_allclose(np.ravel(metrics["loss"]), [expected_metrics["loss"]], rtol=RTOL, atol=ATOL)
    for g, w in zip(_arrays(new), _arrays(expected)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_sharded_step_validates(mesh, setup):
    fresh_state, optimizer, (images, labels) = setup
    step = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, donate=False)
    with pytest.raises(
        ValueError,
        match=r"`batch`: expected a batch size divisible by the size of the mesh axis \(8\), got batch size 12",
    ):
        step(fresh_state(), (images[:12], labels[:12]))
    with pytest.raises(
        ValueError, match=r"`batch`: expected one leading batch size for all arrays, got sizes \[8, 16\]"
    ):
        step(fresh_state(), (images, labels[:8]))
    with pytest.raises(ValueError, match="`batch`: expected a batch size divisible"):
        sharding.shard_batch((images[:4], labels[:4]), mesh)
    steps = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, donate=False, steps_per_call=2)
    with pytest.raises(ValueError, match=r"`batches\[1\]`: expected a batch size divisible .* got batch size 12"):
        steps(fresh_state(), [(images, labels), (images[:12], labels[:12])])
    with pytest.raises(ValueError, match=r"`batches` must be a list of 1 to steps_per_call=2 batches, got 3"):
        steps(fresh_state(), [(images, labels)] * 3)
    with pytest.raises(ValueError, match="steps_per_call"):
        sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, steps_per_call=0)
    with pytest.raises(ValueError, match=r"`strategy` must be one of \('replicated', 'fsdp'\), got strategy='zero'"):
        sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy="zero")
    with pytest.raises(ValueError, match=r"`axis`: expected one of the mesh's axis names \('data',\), got 'model'"):
        sharding.state_sharding(fresh_state(), mesh, axis="model")


# --- Sampling (8 devices) ---------------------------------------------------------------


def test_sharded_sample_equals_unsharded(mesh):
    model = _model(seed=2)
    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.standard_normal((BATCH, 3, 8, 8)), dtype=jnp.float32)
    labels = jnp.asarray(rng.integers(0, CONFIG["num_classes"], size=(BATCH,)), dtype=jnp.int32)
    options = dict(
        num_steps=3, method="heun", guidance=2.0, null_cond=CONFIG["num_classes"], guidance_interval=(0.1, 0.9)
    )

    @eqx.filter_jit
    def unsharded(model, noise, labels):
        return jax.vmap(lambda n, y: flow.sample(model, n, y, **options))(noise, labels)

    expected = unsharded(model, noise, labels)
    # The model FSDP-sharded (min_size=0: every divisible array split): XLA gathers it.
    sharded_model = sharding.shard_state(model, mesh, strategy="fsdp", min_size=0)
    out = sharding.sharded_sample(eqx.Partial(flow.sample, sharded_model, **options), noise, labels, mesh)
    assert out.shape == expected.shape and out.sharding.spec == P("data")
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3, 8, 8)}
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    assert float(jnp.max(jnp.abs(out - noise))) > 1e-2
    # Any per-example sampler: here the family's own, with its trajectory.
    sampler = eqx.Partial(px.sample, model, num_steps=2, method="euler", return_trajectory=True)
    x, trajectory = sharding.sharded_sample(sampler, noise, labels, mesh)
    assert trajectory.shape == (BATCH, 3, 3, 8, 8) and trajectory.sharding.spec == P("data")
    np.testing.assert_allclose(x, jax.vmap(sampler)(noise, labels)[0], rtol=RTOL, atol=ATOL)
    # The keyword form of flow.sample's options still works, and warns.
    with pytest.warns(DeprecationWarning, match="per-example sampler"):
        old = sharding.sharded_sample(model, noise, labels, mesh, **options)
    np.testing.assert_allclose(old, expected, rtol=RTOL, atol=ATOL)
    sampler = eqx.Partial(flow.sample, model, **options)
    with pytest.raises(ValueError, match=r"`cond`: expected arrays with leading dimension 16 .* got \[8\]"):
        sharding.sharded_sample(sampler, noise, labels[:8], mesh)
    with pytest.raises(ValueError, match="`noise`: expected a batch size divisible .* got batch size 4"):
        sharding.sharded_sample(sampler, noise[:4], labels[:4], mesh)
    with pytest.raises(ValueError, match="sampler"):
        sharding.sharded_sample("flow.sample", noise, labels, mesh)


# --- The example ------------------------------------------------------------------------


@pytest.mark.slow
def test_data_parallel_example():
    """`examples/data_parallel.py` on 8 simulated devices: both strategies, same losses."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, str(ROOT / "examples" / "data_parallel.py"), "--steps", "2"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "8 cpu devices; mesh {'data': 8}" in lines[0]
    # jax 0.10 prints a spec as `P(...)`, jax 0.6 as `PartitionSpec(...)`.
    split = ("spec=P(None, 'data')", "spec=PartitionSpec(None, 'data')")
    assert any(any(s in line for s in split) and "(2, 24, 64)" in line for line in lines)
    gap = float(lines[-1].rsplit(" ", 1)[-1])
    assert gap < 1e-5

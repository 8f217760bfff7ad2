"""Tests of `pixeldit_eqx.train`: the step, EMA, clipping, the loop, checkpoints, model files."""

import functools
import io
import json
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jaxtyping import Array, TypeCheckError

import pixeldit_eqx
from pixeldit_eqx import train

from .helpers import SMALL_C2I, SMALL_T2I


def _tiny_c2i(key, **kwargs):
    return pixeldit_eqx.PixelDiT(**SMALL_C2I, key=key, **kwargs)


def _tiny_t2i(key, **kwargs):
    return pixeldit_eqx.PixelDiTT2I(**SMALL_T2I, key=key, **kwargs)


def _digit_batch(batch: int = 8) -> tuple[Array, Array]:
    """Two fixed 4x4 patterns in [-1, 1], one per class (numpy: no eager compiles)."""
    rng = np.random.default_rng(0)
    patterns = np.sign(rng.standard_normal((2, 1, 4, 4))).astype(np.float32)
    labels = np.arange(batch, dtype=np.int32) % 2
    return jnp.asarray(patterns[labels]), jnp.asarray(labels)


def _leaves_equal(a, b) -> bool:
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    if len(la) != len(lb):
        return False

    def data(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jr.key_data(x)
        return np.asarray(x)

    return all(x.dtype == y.dtype and np.array_equal(data(x), data(y)) for x, y in zip(la, lb))


def _leaves_close(a, b, rtol: float = 1e-5) -> bool:
    la = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.allclose(x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(x))))
        for x, y in zip(la, lb)
    )


class _Toy(eqx.Module):
    linear: eqx.nn.Linear
    scale: "object"  # a pixeldit_eqx.Buffer
    count: Array

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.scale = pixeldit_eqx.Buffer(jnp.array([2.0, 3.0]))
        self.count = jnp.array(7, dtype=jnp.int32)

    def __call__(self, x):
        return self.linear(x) * self.scale.value


def _toy_loss(model, batch, key):
    del key
    x, y = batch
    pred = jax.vmap(model)(x)
    return jnp.mean(jnp.square(pred - y))


def _toy_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal((16, 2)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


# ----------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def c2i_step():
    """One optimizer and one jitted c2i step, shared so that they compile once."""
    optimizer = train.default_optimizer(1e-2, warmup_steps=2)
    step = eqx.filter_jit(train.make_train_step(train.c2i_loss, optimizer, ema_decay=0.9))
    return optimizer, step


def test_steps_lower_the_loss(getkey, c2i_step):
    optimizer, step = c2i_step
    start = train.init_train_state(_tiny_c2i(getkey()), optimizer, key=getkey())
    batch = _digit_batch()
    state, losses = train.fit(step, start, iter(lambda: batch, None), num_steps=40, progress=False)
    assert losses.shape == (40,) and losses.dtype == np.float32
    assert np.all(np.isfinite(losses))
    assert int(state.step) == 40
    # The step's loss is taken before its update: with the first step's key, it is the
    # trained model's loss on the same noise and times as the first loss.
    _, metrics = step(eqx.tree_at(lambda s: s.key, state, start.key), batch)
    before, after = float(losses[0]), float(metrics["loss"])
    assert after < 0.8 * before, (before, after)


def test_only_trainable_leaves_change(getkey):
    model = _Toy(getkey())
    optimizer = train.default_optimizer(1e-1, weight_decay=0.5)
    state = train.init_train_state(model, optimizer, key=getkey())
    step = eqx.filter_jit(train.make_train_step(_toy_loss, optimizer, ema_decay=0.5))
    new, metrics = step(state, _toy_batch())
    new, metrics = step(new, _toy_batch())
    for m in (new.model, new.ema):
        assert np.array_equal(np.asarray(m.scale.array), np.array([2.0, 3.0]))
        assert m.count.dtype == jnp.int32 and int(m.count) == 7
        assert not np.array_equal(np.asarray(m.linear.weight), np.asarray(model.linear.weight))
    assert set(metrics) >= {"loss", "grad_norm"}
    # The optimizer never saw the buffer: Adam's moments cover weight and bias only.
    moments = [x for x in jax.tree.leaves(state.opt_state) if eqx.is_inexact_array(x)]
    assert sorted(x.shape for x in moments) == [(2,), (2,), (2, 3), (2, 3)]
    assert not jnp.array_equal(jr.key_data(new.key), jr.key_data(state.key))


def test_ema_math(getkey):
    model = _Toy(getkey())
    optimizer = optax.sgd(0.1)
    state = train.init_train_state(model, optimizer, key=getkey())
    batch = _toy_batch()
    step = eqx.filter_jit(train.make_train_step(_toy_loss, optimizer, ema_decay=0.9))
    s1, _ = step(state, batch)
    s2, _ = step(s1, batch)
    w0, w1, w2 = (np.asarray(s.model.linear.weight) for s in (state, s1, s2))
    ema1 = 0.9 * w0 + 0.1 * w1
    ema2 = 0.9 * ema1 + 0.1 * w2
    np.testing.assert_allclose(np.asarray(s1.ema.linear.weight), ema1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s2.ema.linear.weight), ema2, rtol=1e-6)
    # SGD: w1 = w0 - 0.1 grad.
    grads = eqx.filter_grad(lambda m: _toy_loss(m, batch, None))(model)
    np.testing.assert_allclose(w1, w0 - 0.1 * np.asarray(grads.linear.weight), rtol=1e-5, atol=1e-7)

    # A schedule receives the number of steps taken before the update: 0, then 1.
    sched = train.make_train_step(_toy_loss, optimizer, ema_decay=lambda s: 0.5 * s.astype(jnp.float32))
    t1, _ = sched(state, batch)  # d = 0: the EMA is the new model
    t2, _ = sched(t1, batch)  # d = 0.5
    np.testing.assert_array_equal(np.asarray(t1.ema.linear.weight), np.asarray(t1.model.linear.weight))
    np.testing.assert_allclose(
        np.asarray(t2.ema.linear.weight),
        0.5 * np.asarray(t1.model.linear.weight) + 0.5 * np.asarray(t2.model.linear.weight),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="ema_decay"):
        train.make_train_step(_toy_loss, optimizer, ema_decay=1.5)


def test_gradient_clipping_is_applied():
    params = {"w": jnp.zeros((4,), dtype=jnp.float32)}
    g1 = {"w": jnp.array([60.0, 80.0, 0.0, 0.0])}  # norm 100
    g2 = {"w": jnp.array([0.1, -0.2, 0.3, 0.0])}  # norm < 1: not clipped

    def run(optimizer, grads):
        state = optimizer.init(params)
        p, out = params, []
        for g in grads:
            updates, state = optimizer.update(g, state, p)
            p = optax.apply_updates(p, updates)
            out.append(np.asarray(p["w"]))
        return out

    clipped = run(train.default_optimizer(1e-2, clip=1.0), [g1, g2])
    by_hand = run(train.default_optimizer(1e-2, clip=None), [{"w": g1["w"] / 100.0}, g2])
    unclipped = run(train.default_optimizer(1e-2, clip=None), [g1, g2])
    np.testing.assert_allclose(clipped[1], by_hand[1], rtol=1e-5)
    assert not np.allclose(clipped[1], unclipped[1], rtol=1e-3)

    # The step reports the norm before clipping.
    model = _Toy(jr.key(0))
    optimizer = train.default_optimizer(1e-3, clip=1e-6)
    state = train.init_train_state(model, optimizer, key=jr.key(1))
    step = train.make_train_step(_toy_loss, optimizer)
    _, metrics = step(state, _toy_batch())
    assert float(metrics["grad_norm"]) > 1e-3


def test_default_optimizer_errors():
    with pytest.raises(ValueError, match="lr"):
        train.default_optimizer(0.0)
    with pytest.raises(ValueError, match="clip"):
        train.default_optimizer(1e-3, clip=-1.0)
    with pytest.raises(ValueError, match="decay_steps"):
        train.default_optimizer(1e-3, warmup_steps=10, decay_steps=5)
    schedule_opt = train.default_optimizer(1e-3, warmup_steps=2, decay_steps=10)
    assert isinstance(schedule_opt, optax.GradientTransformation)


def test_jit_step_donates_the_state_and_passes_shared_leaves_through():
    """`jit_step` computes what `eqx.filter_jit(step)` does (to float32 round-off: it
    compiles the in-place form of the update) and deletes the state it is given, except the
    arrays the model and the EMA share (the Buffer, the int), which come back as those same
    arrays, step after step, from one compile."""
    optimizer = optax.adam(1e-2)
    traces = []

    def raw(state, batch):
        traces.append(None)
        return train.make_train_step(_toy_loss, optimizer, ema_decay=0.5)(state, batch)

    batch = _toy_batch()
    model = _Toy(jr.key(0))
    expected = train.init_train_state(model, optimizer, key=jr.key(1))
    plain = eqx.filter_jit(raw)
    for _ in range(3):
        expected, expected_metrics = plain(expected, batch)
    traces.clear()

    state = first = train.init_train_state(model, optimizer, key=jr.key(1))
    scale, count = model.scale.value, model.count
    assert first.ema.scale.value is scale and first.ema.count is count
    step = train.jit_step(raw)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert len(traces) == 1
    assert _leaves_close(state, expected)
    assert all(np.isclose(float(metrics[k]), float(expected_metrics[k]), rtol=1e-6) for k in expected_metrics)
    assert model.linear.weight.is_deleted() and first.ema.linear.weight.is_deleted()
    assert all(x.is_deleted() for x in jax.tree.leaves(first.opt_state))
    for shared in (scale, count):
        assert not shared.is_deleted()
    assert state.model.scale.value is scale and state.ema.scale.value is scale
    assert state.model.count is count and state.ema.count is count

    # Without donation the state passed in stays valid; the values are the same.
    kept = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
    out, _ = train.jit_step(raw, donate=False)(kept, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(eqx.filter(kept, eqx.is_array)))
    assert out.model.scale.value is kept.model.scale.value
    once, _ = plain(kept, batch)
    assert _leaves_equal(out, once)  # the same program: bitwise
    with pytest.raises((ValueError, TypeCheckError), match="donate"):
        train.jit_step(raw, donate="yes")  # type: ignore[arg-type]


def test_init_train_state_is_one_program_with_the_eager_values():
    """`init_train_state` compiles one program (eagerly, each leaf's copy and zeros would
    compile one per shape and keep it cached), and gives what it gives eagerly: the EMA a
    copy of the model in buffers of its own, the optimizer state as optax's."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    # Widths no other test uses, so that no eager program of theirs is cached already.
    model = eqx.nn.MLP(13, 7, width_size=37, depth=3, key=jr.key(0))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    jnp.zeros((), dtype=jnp.int32).block_until_ready()
    before = len(compiles)
    state = train.init_train_state(model, optimizer, key=jr.key(1))
    jax.block_until_ready(state)
    assert len(compiles) - before == 1
    with jax.disable_jit():
        eager = train.init_train_state(model, optimizer, key=jr.key(1))
    assert _leaves_equal(state, eager)
    assert jax.tree.structure(state) == jax.tree.structure(eager)
    arrays = functools.partial(eqx.filter, filter_spec=eqx.is_array)
    for m, e in zip(jax.tree.leaves(arrays(model)), jax.tree.leaves(arrays(state.ema)), strict=True):
        assert m.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()
    # Under a transformation it is traced inline, as before.
    traced = eqx.filter_jit(lambda m: train.init_train_state(m, optimizer, key=jr.key(1)))(model)
    assert _leaves_equal(traced, eager)


def test_compiler_options_reach_the_step_program():
    """`compiler_options` go to XLA as given (an option it does not know is refused, by
    name); the package's defaults and XLA's (`{}`) give the same steps to float32
    round-off; the package's CPU options this XLA does not know are left out."""
    optimizer = optax.adam(1e-2)
    raw = train.make_train_step(_toy_loss, optimizer, ema_decay=0.5)
    batches = _toy_batches(2)

    def run(**kwargs):
        state = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
        return train.jit_steps(raw, 2, **kwargs)(state, batches)

    default, xla_default = run(), run(compiler_options={})
    assert _leaves_close(default, xla_default, rtol=1e-6)
    with pytest.raises(Exception, match="xla_no_such_option"):
        run(compiler_options={"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):
        state = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
        train.jit_step(raw, compiler_options={"xla_no_such_option": True})(state, batches[0])
    for bad in ([("xla_cpu_enable_fast_math", False)], {1: True}):
        with pytest.raises((ValueError, TypeCheckError), match="compiler_options"):
            train.jit_steps(raw, 2, compiler_options=bad)  # type: ignore[arg-type]
    if jax.default_backend() == "cpu":
        known = train._step_compiler_options(None)
        assert known is not None and known.items() <= train._STEP_CPU_OPTIONS.items()
        # An option this XLA refuses is dropped from the package's, not sent.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "_STEP_CPU_OPTIONS", {**train._STEP_CPU_OPTIONS, "xla_no_such_option": True})
            assert train._step_compiler_options(None) == known
            assert _leaves_close(run(), default, rtol=0)


def test_making_a_step_starts_no_backend():
    """`jit_step`, `jit_steps` and a step's options leave jax's backend unstarted until
    the first call, so that `jax.distributed.initialize` can still come after them."""
    code = (
        "import optax, jax._src.xla_bridge as xb\n"
        "from pixeldit_eqx import train\n"
        "raw = train.make_train_step(train.c2i_loss, optax.adam(1e-3))\n"
        "train.jit_step(raw); train.jit_steps(raw, 2); train.jit_steps(raw, 2, compiler_options={})\n"
        "print(xb.backends_are_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"


def _toy_batches(n: int) -> list[tuple[Array, Array]]:
    x, y = _toy_batch()
    return [(x + 0.1 * i, y - 0.1 * i) for i in range(n)]


def test_jit_steps_runs_jit_steps_steps_in_one_program():
    """`jit_steps` gives bitwise what `jit_step` gives step by step, from one compile for
    every count of batches up to `steps_per_call` (a shorter call's padding leaves the
    state as it is), with per-step metrics; it donates the state but the arrays the model
    and the EMA share, which come back as those same arrays."""
    optimizer = optax.adam(1e-2)
    raw = train.make_train_step(_toy_loss, optimizer, ema_decay=0.5)
    batches = _toy_batches(5)

    expected = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
    one = train.jit_step(raw)
    losses = []
    for batch in batches:
        expected, metrics = one(expected, batch)
        losses.append(float(metrics["loss"]))

    model = _Toy(jr.key(0))
    scale, count = model.scale.value, model.count
    state = first = train.init_train_state(model, optimizer, key=jr.key(1))
    traces = []

    def counted(state, batch):
        traces.append(None)
        return raw(state, batch)

    steps = train.jit_steps(counted, 3)
    state, head = steps(state, batches[:3])
    traced = len(traces)
    state, tail = steps(state, batches[3:])
    assert len(traces) == traced  # no new trace: the same program
    # The same values to float32 round-off: XLA fuses the update inside the loop differently.
    assert _leaves_close(state, expected, rtol=1e-6) and int(state.step) == 5
    assert _leaves_equal(state.key, expected.key)
    assert head["loss"].shape == (3,) and tail["loss"].shape == (2,) and tail["skipped"].shape == (2,)
    assert np.allclose(np.concatenate([head["loss"], tail["loss"]]), losses, rtol=1e-6)
    assert model.linear.weight.is_deleted() and all(x.is_deleted() for x in jax.tree.leaves(first.opt_state))
    assert not scale.is_deleted() and not count.is_deleted()
    assert state.model.scale.value is scale and state.ema.scale.value is scale and state.ema.count is count

    kept = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
    out, _ = train.jit_steps(raw, 2, donate=False)(kept, batches[:2])
    assert not any(x.is_deleted() for x in jax.tree.leaves(eqx.filter(kept, eqx.is_array)))
    for _ in range(2):
        kept, _ = eqx.filter_jit(raw)(kept, batches[_])
    assert _leaves_close(out, kept)


def test_jit_steps_errors():
    optimizer = optax.sgd(1e-2)
    raw = train.make_train_step(_toy_loss, optimizer)
    state = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
    steps = train.jit_steps(raw, 2, donate=False)
    for bad, got in (
        ([], "0"),
        (_toy_batches(3), "3"),
        (_toy_batch(), "a tuple"),
        (iter(_toy_batches(1)), "a list_iterator"),
    ):
        with pytest.raises(ValueError, match=f"`batches` must be a list of 1 to steps_per_call=2 batches, got {got}"):
            steps(state, bad)
    x, y = _toy_batch()
    with pytest.raises(ValueError, match=r"`batches`: every batch must have .* batch 1 has"):
        steps(state, [(x, y), (x[:8], y[:8])])
    with pytest.raises((ValueError, TypeCheckError), match="steps_per_call"):
        train.jit_steps(raw, 0)
    with pytest.raises((ValueError, TypeCheckError), match="donate"):
        train.jit_steps(raw, 2, donate=1)  # type: ignore[arg-type]

    def rescales(state, batch):  # changes the Buffer the model and the EMA share
        state, metrics = raw(state, batch)
        scale = pixeldit_eqx.Buffer(state.model.scale.value * 2)
        return eqx.tree_at(lambda s: (s.model.scale, s.ema.scale), state, (scale, scale)), metrics

    with pytest.raises(ValueError, match="holds more than once"):
        train.jit_steps(rescales, 2, donate=False)(state, _toy_batches(2))


def test_fit_with_jit_steps_matches_jit_step():
    """`fit` calls a `jit_steps` step once per `steps_per_call` batches (the last call
    with the remainder): the same losses and state as one step per call, and a streak of
    skipped steps across calls still raises."""
    optimizer = optax.adam(1e-2)
    raw = train.make_train_step(_toy_loss, optimizer)
    batches = _toy_batches(7)

    def run(step):
        state = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
        return train.fit(step, state, batches, num_steps=7, progress=False, log_every=2)

    (state, losses), (expected, expected_losses) = run(train.jit_steps(raw, 3)), run(train.jit_step(raw))
    assert losses.shape == (7,) and losses.dtype == np.float32
    assert np.allclose(losses, expected_losses, rtol=1e-6) and _leaves_close(state, expected, rtol=1e-6)

    state = train.init_train_state(_Toy(jr.key(0)), optimizer, key=jr.key(1))
    nan = [(x * np.nan, y) for x, y in _toy_batches(9)]
    with pytest.raises(train.NonFiniteTrainingError, match="4 consecutive training steps") as info:
        train.fit(
            train.jit_steps(raw, 3), state, nan, num_steps=9, progress=False, max_consecutive_skips=4, log_every=1
        )
    assert int(info.value.state.step) == 6  # checked after each call of three steps


def test_fit_errors_and_history():
    model = _Toy(jr.key(0))
    optimizer = optax.sgd(1e-2)
    state = train.init_train_state(model, optimizer, key=jr.PRNGKey(1))  # a raw key
    assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    step = eqx.filter_jit(train.make_train_step(_toy_loss, optimizer))
    with pytest.raises(ValueError, match="ran out after 2"):
        train.fit(step, state, [_toy_batch()] * 2, num_steps=3, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        train.fit(step, state, [], num_steps=-1)
    out, history = train.fit(step, state, [_toy_batch()] * 5, num_steps=5)
    assert history.shape == (5,) and int(out.step) == 5
    assert history[-1] < history[0]


# ----------------------------------------------------------------- losses


@pytest.mark.default_only
def test_label_and_caption_dropout_use_the_null_condition(getkey):
    key = getkey()
    model = _tiny_c2i(getkey())
    # Make the class embedding matter: the zero-initialised model ignores its labels.
    model = jax.tree.map(lambda x: x + 0.05 if eqx.is_inexact_array(x) else x, model)
    x, y = _digit_batch(4)

    @eqx.filter_jit
    def c2i_losses(model):
        dropped = train.c2i_loss(model, (x, y), key, drop_prob=1.0)
        null = train.c2i_loss(model, (x, jnp.full_like(y, 2)), key, drop_prob=0.0)
        kept = train.c2i_loss(model, (x, y), key, drop_prob=0.0)
        return dropped, null, kept

    dropped, null, kept = c2i_losses(model)
    np.testing.assert_allclose(float(dropped), float(null), rtol=1e-6)
    assert float(dropped) != float(kept)
    # Without runtime type checking the library's own ValueError names the labels.
    with pytest.raises((ValueError, TypeCheckError)):
        train.c2i_loss(model, (x, y[:2]), key)

    model = _tiny_t2i(getkey())
    model = jax.tree.map(lambda x: x + 0.05 if eqx.is_inexact_array(x) else x, model)
    text = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 8)), jnp.float32)
    mask = jnp.asarray(np.array([[True, True, False]] * 4))
    loss = functools.partial(train.t2i_loss, key=key)

    @eqx.filter_jit
    def t2i_losses(model):
        dropped = loss(model, (x, text, mask), drop_prob=1.0)
        null = loss(model, (x, jnp.zeros_like(text), jnp.ones_like(mask)), drop_prob=0.0)
        kept = loss(model, (x, text, mask), drop_prob=0.0)
        return dropped, null, kept

    dropped, null, kept = t2i_losses(model)
    np.testing.assert_allclose(float(dropped), float(null), rtol=1e-6)
    assert float(dropped) != float(kept)


# ----------------------------------------------------------------- checkpoints


def test_checkpoint_resume_is_bit_exact(tmp_path, getkey, c2i_step):
    model = _tiny_c2i(getkey())
    optimizer, step = c2i_step
    batches = [_digit_batch()] * 6
    state = train.init_train_state(model, optimizer, key=getkey())
    state, _ = train.fit(step, state, batches[:3], num_steps=3, progress=False)
    path = tmp_path / "state.eqx"
    train.save_checkpoint(path, state)
    ran_on, losses_on = train.fit(step, state, batches[3:], num_steps=3)

    # A fresh state of a different initialisation (and its abstract shape) as skeletons.
    like = train.init_train_state(_tiny_c2i(getkey()), optimizer, key=getkey())
    abstract = eqx.filter_eval_shape(train.init_train_state, _tiny_c2i(getkey()), optimizer, key=getkey())
    for skeleton in (like, abstract):
        loaded = train.load_checkpoint(path, skeleton)
        assert _leaves_equal(loaded, state)
        resumed, losses = train.fit(step, loaded, batches[3:], num_steps=3)
        np.testing.assert_array_equal(losses, losses_on)
        assert _leaves_equal(resumed, ran_on)
        assert int(resumed.step) == 6

    wrong = train.init_train_state(_Toy(getkey()), optimizer, key=getkey())
    with pytest.raises(ValueError, match="does not fit"):
        train.load_checkpoint(path, wrong)


# ----------------------------------------------------------------- model files


def test_model_file_round_trip(tmp_path, getkey):
    model = _tiny_c2i(getkey())
    model = jax.tree.map(lambda x: x + 0.01 if eqx.is_inexact_array(x) else x, model)
    path = tmp_path / "model.eqx"
    train.save_model(path, model)
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert header["variant"] == "c2i" and header["config"] == model.config.to_dict()
    assert header["dtype"] == "float32"
    loaded = train.load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert _leaves_equal(loaded, model)
    x, y = _digit_batch(2)
    t = jnp.array([0.3, 0.7], dtype=jnp.float32)
    run = eqx.filter_jit(lambda m: jax.vmap(m)(x, t, y))
    np.testing.assert_array_equal(np.asarray(run(loaded)), np.asarray(run(model)))

    # bfloat16 parameters and a text model, through a file object.
    t2i = pixeldit_eqx.cast_params(_tiny_t2i(getkey()), jnp.bfloat16)
    buffer = io.BytesIO()
    train.save_model(buffer, t2i)
    buffer.seek(0)
    loaded = train.load_model(buffer)
    assert type(loaded).variant == "t2i"
    assert loaded.y_pos_embedding.dtype == jnp.bfloat16
    assert _leaves_equal(loaded, t2i)


def test_model_file_errors(tmp_path, getkey):
    model = _tiny_c2i(getkey())
    path = tmp_path / "model.eqx"
    train.save_model(path, model)
    header, leaves = path.read_bytes().split(b"\n", 1)

    bad = tmp_path / "no_header.eqx"
    bad.write_bytes(leaves)
    with pytest.raises(ValueError, match="not a pixeldit_eqx model file"):
        train.load_model(bad)
    bad.write_bytes(b'{"format": "pixeldit_eqx.model", "variant": "c2i"\n' + leaves)
    with pytest.raises(ValueError, match="not a pixeldit_eqx model file"):
        train.load_model(bad)

    # An edited header fails the checksum, which covers it.
    info = json.loads(header)
    info["config"]["hidden_size"] = 32
    bad.write_bytes(json.dumps(info).encode() + b"\n" + leaves)
    with pytest.raises(ValueError, match="fails its sha256 checksum"):
        train.load_model(bad)
    bad.write_bytes(header + b"\n" + leaves[: len(leaves) // 2])
    with pytest.raises(ValueError, match="the file is truncated"):
        train.load_model(bad)
    bad.write_bytes(header + b"\n" + leaves + leaves[:64])
    with pytest.raises(ValueError, match="trailing garbage"):
        train.load_model(bad)

    # A version-1 file (no checksum) loads unverified; its leaves are still checked.
    legacy = {k: v for k, v in json.loads(header).items() if k not in ("sha256", "size")} | {"version": 1}
    bad.write_bytes(json.dumps(legacy).encode() + b"\n" + leaves)
    assert _leaves_equal(train.load_model(bad), model)
    info = legacy | {"config": legacy["config"] | {"hidden_size": 32}}
    bad.write_bytes(json.dumps(info).encode() + b"\n" + leaves)
    with pytest.raises(ValueError, match="do not fit"):
        train.load_model(bad)
    bad.write_bytes(json.dumps(legacy).encode() + b"\n" + leaves[: len(leaves) // 2])
    with pytest.raises(ValueError, match="do not fit"):
        train.load_model(bad)
    bad.write_bytes(json.dumps(legacy).encode() + b"\n" + leaves + leaves[:64])
    with pytest.raises(ValueError, match="end of the file"):
        train.load_model(bad)
    info = legacy | {"config": legacy["config"] | {"nonsense": 1}}
    bad.write_bytes(json.dumps(info).encode() + b"\n" + leaves)
    with pytest.raises(ValueError, match="describes no valid model"):
        train.load_model(bad)
    with pytest.raises(ValueError, match="PixelDiT"):
        train.save_model(tmp_path / "toy.eqx", _Toy(getkey()))

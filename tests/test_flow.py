"""Tests of `pixeldit_eqx.flow`: loss, time grid, samplers, guidance, golden parity."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_eqx import flow

from .helpers import FIXTURES, MANIFEST, rel_err


SAMPLER_CASES = {"euler": "euler", "flowdpm": "flowdpm", "heun": "heun"}


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Test data from numpy (an eager `jax.random.normal` compiles for every new shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _sampler_settings(name: str) -> dict:
    return json.loads((FIXTURES / "samplers.json").read_text())[f"sampler_{name}"]["init"]


# ----------------------------------------------------------------- times


def test_time_shift():
    t = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
    assert jnp.array_equal(flow.time_shift(t, 1.0), t)
    shifted = np.asarray(flow.time_shift(t, 3.0))
    expected = np.asarray(t) / (np.asarray(t) + (1 - np.asarray(t)) * 3.0)
    np.testing.assert_allclose(shifted, expected, rtol=1e-6)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert np.all(shifted[1:-1] < np.asarray(t)[1:-1])


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sampling_times_match_reference_bitwise(name):
    settings = _sampler_settings(name)
    ref = np.load(FIXTURES / f"sampler_{name}.npz")["out_timesteps"]
    times = flow.sampling_times(settings["num_steps"], settings["timeshift"])
    assert times.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(times), ref)
    jitted = jax.jit(flow.sampling_times, static_argnums=0)(settings["num_steps"], settings["timeshift"])
    np.testing.assert_array_equal(np.asarray(jitted), ref)


def test_sampling_times_grid():
    np.testing.assert_array_equal(np.asarray(flow.sampling_times(1)), [0.0, 1.0])
    times = np.asarray(flow.sampling_times(10))
    np.testing.assert_allclose(times, np.append(np.arange(10) / 10, 1.0), atol=1e-7)
    times = np.asarray(flow.sampling_times(100, 2.0))
    assert times.shape == (101,) and times[0] == 0.0 and times[-1] == 1.0
    assert np.all(np.diff(times) > 0)


def test_sample_training_time():
    keys = jax.random.split(jax.random.key(0), 4096)
    t = jax.vmap(flow.sample_training_time)(keys)
    assert t.dtype == jnp.float32 and t.shape == (4096,)
    assert bool(jnp.all((t > 0) & (t < 1)))
    logit = np.log(np.asarray(t) / (1 - np.asarray(t)))
    assert abs(logit.mean()) < 0.06 and abs(logit.std() - 1.0) < 0.05
    shifted = jax.vmap(lambda k: flow.sample_training_time(k, 3.0))(keys)
    np.testing.assert_allclose(shifted, flow.time_shift(t, 3.0), rtol=1e-6)


# ------------------------------------------------------------------ loss


def test_interpolate_and_loss_by_hand():
    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7
    eps = jnp.cos(jnp.arange(12, dtype=jnp.float32)).reshape(3, 4)
    t = 0.3
    x_t, target = flow.interpolate(x, eps, t)
    np.testing.assert_allclose(x_t, 0.3 * np.asarray(x) + 0.7 * np.asarray(eps), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(target, np.asarray(x) - np.asarray(eps), rtol=1e-6)

    seen = {}

    def velocity_fn(x_in, t_in, cond):
        seen.update(x=x_in, t=t_in, cond=cond)
        return 2.0 * x_in + cond

    loss = flow.flow_matching_loss_at(velocity_fn, x, 0.5, eps, t)
    v = 2.0 * (0.3 * np.asarray(x) + 0.7 * np.asarray(eps)) + 0.5
    expected = np.mean((v - (np.asarray(x) - np.asarray(eps))) ** 2)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert seen["t"].dtype == jnp.float32 and seen["t"].shape == () and seen["cond"] == 0.5


def test_loss_of_the_true_velocity_and_noise():
    x = _normal(1, (48,))

    def velocity_fn(x_t, t, exact):
        # exact: the velocity of the straight path through x, loss 0;
        # else v = x against the target x - eps, loss mean(eps**2).
        return jnp.where(exact, (x - x_t) / (1 - t), x)

    def loss(k, exact):
        return flow.flow_matching_loss(velocity_fn, x, exact, key=k)

    keys = jax.random.split(jax.random.key(2), 64)
    losses = jax.jit(jax.vmap(jax.vmap(loss, (0, None)), (None, 0)))(keys, jnp.array([True, False]))
    assert float(jnp.max(losses[0])) < 1e-6
    assert abs(float(jnp.mean(losses[1])) - 1.0) < 0.05
    assert len(set(np.asarray(losses[1]).tolist())) == 64


def test_loss_drops_conditions():
    x = _normal(4, (16,))
    null = (jnp.zeros((5, 3)), jnp.zeros((5,), dtype=bool))
    cond = (jnp.ones((5, 3)), jnp.ones((5,), dtype=bool))

    def velocity_fn(x_t, t, c):  # exact when conditioned, off by one when not
        text, mask = c
        off = jnp.where(mask[0] & (text[0, 0] == 1.0), 0.0, 1.0)
        return (x - x_t) / (1 - t) + off

    def loss(k, drop_prob):  # drop_prob may be traced
        return flow.flow_matching_loss(velocity_fn, x, cond, key=k, null_cond=null, drop_prob=drop_prob)

    keys = jax.random.split(jax.random.key(5), 2000)
    drop_probs = jnp.array([0.0, 0.3, 1.0])
    losses = np.asarray(jax.jit(jax.vmap(jax.vmap(loss, (0, None)), (None, 0)))(keys, drop_probs))
    for drop_prob, row in zip([0.0, 0.3, 1.0], losses):
        dropped = row > 0.5
        np.testing.assert_allclose(row[dropped], 1.0, atol=1e-3)
        np.testing.assert_allclose(row[~dropped], 0.0, atol=1e-3)
        assert abs(dropped.mean() - drop_prob) < 0.04


def test_loss_errors():
    x = jnp.zeros((4,))

    def fn(x_t, t, c):
        return x_t

    key = jax.random.key(0)
    with pytest.raises(ValueError, match="null_cond"):
        flow.flow_matching_loss(fn, x, 1, key=key, drop_prob=0.1)
    with pytest.raises(ValueError, match="drop_prob"):
        flow.flow_matching_loss(fn, x, 1, key=key, null_cond=0, drop_prob=1.5)
    with pytest.raises(ValueError, match="structure"):
        flow.flow_matching_loss(fn, x, (1, 2), key=key, null_cond=0, drop_prob=0.1)
    with pytest.raises(ValueError, match="shape and dtype"):
        flow.flow_matching_loss(fn, x, jnp.zeros(3), key=key, null_cond=jnp.zeros(2), drop_prob=0.1)
    with pytest.raises(ValueError, match="shift"):
        flow.flow_matching_loss(fn, x, 1, key=key, shift=0.0)
    with pytest.raises(ValueError, match="shaped like"):
        flow.flow_matching_loss_at(lambda x_t, t, c: x_t[:2], x, 1, x, 0.5)


# -------------------------------------------------------------- samplers

ALL_SAMPLERS = [("euler", False), ("flowdpm", False), ("heun", False), ("heun", True)]


def _reference_loop(velocity, noise, cond, null, *, method, num_steps, guidance, interval, shift, exact):
    """The reference samplers as plain loops over a batch-free numpy state."""
    times = np.asarray(flow.sampling_times(num_steps, shift))
    t_min, t_max = np.float32(interval[0]), np.float32(interval[1])

    def guided(x, t):
        v_u, v_c = velocity(x, t, null), velocity(x, t, cond)
        w = np.float32(guidance if t_min < t < t_max else 1.0)
        return v_u + w * (v_c - v_u)

    x, traj, v_prev, v_hat = noise, [noise], None, None
    for i in range(num_steps):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t
        if method == "euler":
            x = x + guided(x, t) * dt
        elif method == "flowdpm":
            v = guided(x, t)
            x = x + v * dt if v_prev is None else x + dt * (1.5 * v - 0.5 * v_prev)
            v_prev = v
        else:
            v = guided(x, t) if (i == 0 or exact) else v_hat
            x_hat = x + v * dt
            if i < num_steps - 1:
                v_hat = guided(x_hat, t_next)
                x = x + (v + v_hat) / 2 * dt
            else:
                x = x_hat
        traj.append(x)
    return np.stack(traj)


@pytest.mark.parametrize("method,exact", ALL_SAMPLERS)
def test_sample_matches_reference_loop_under_jit_vmap(method, exact):
    def velocity_fn(x, t, label):  # nonlinear in x and t, and label-dependent
        y = label.astype(jnp.float32)
        return jnp.tanh(x) * y - t * x + 0.1 * y

    def velocity_np(x, t, y):
        return np.tanh(x) * np.float32(y) - t * x + np.float32(0.1) * np.float32(y)

    noise = _normal(6, (3, 2, 5, 5))
    labels = jnp.array([1, 2, 3], dtype=jnp.int32)
    kwargs = dict(method=method, num_steps=7, guidance=2.5, shift=2.5, exact=exact)
    interval = (0.15, 0.8)

    def run(n, y):
        return flow.sample(
            velocity_fn,
            n,
            y,
            null_cond=0,
            guidance_interval=interval,
            return_trajectory=True,
            **kwargs,
        )

    x, traj = jax.jit(jax.vmap(run))(noise, labels)
    assert x.shape == (3, 2, 5, 5) and traj.shape == (3, 8, 2, 5, 5)
    np.testing.assert_array_equal(traj[:, 0], noise)
    np.testing.assert_array_equal(x, traj[:, -1])
    for i in range(3):  # each example as the reference's plain loop computes it
        ref = _reference_loop(
            velocity_np,
            np.asarray(noise[i]),
            int(labels[i]),
            0,
            interval=interval,
            **kwargs,
        )
        np.testing.assert_allclose(traj[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,exact", ALL_SAMPLERS)
def test_sample_constant_and_straight_fields_are_exact(method, exact):
    noise = _normal(7, (3, 4, 4))
    data = _normal(8, (3, 4, 4))
    const = jnp.linspace(-1.0, 1.0, 48, dtype=jnp.float32).reshape(3, 4, 4)

    # A constant field, and the straight path from noise to data, of velocity
    # (data - x_t) / (1 - t) (never evaluated at t = 1): every method is exact on both.
    def velocity_fn(x, t, cond):
        straight, target = cond
        return jnp.where(straight, (target - x) / (1 - t), target)

    conds = (jnp.array([False, True]), jnp.stack([const, data]))
    for num_steps in (1, 6):
        run = jax.vmap(
            lambda c: flow.sample(
                velocity_fn,
                noise,
                c,
                num_steps=num_steps,
                method=method,
                exact=exact,
                shift=2.0,
            )
        )
        out = jax.jit(run)(conds)
        np.testing.assert_allclose(out[0], noise + const, atol=1e-5)
        np.testing.assert_allclose(out[1], data, atol=2e-5)


@pytest.mark.parametrize(
    "method,exact,order",
    [("euler", False, 1), ("flowdpm", False, 2), ("heun", False, 2), ("heun", True, 2)],
)
def test_sample_convergence_order(method, exact, order):
    # dx/dt = x from x(0) = 1: x(1) = e. Halving dt divides the error by 2**order.
    noise = jnp.ones((2,), dtype=jnp.float32)

    def error(num_steps):
        out = jax.jit(
            lambda n: flow.sample(
                lambda x, t, c: x,
                n,
                None,
                num_steps=num_steps,
                method=method,
                exact=exact,
            )
        )(noise)
        return float(jnp.abs(out[0] - math.e))

    ratio = error(10) / error(20)
    assert 2**order * 0.85 < ratio < 2**order * 1.15, ratio


# --------------------------------------------------------------- guidance


def test_guidance_one_is_the_conditional_model():
    noise = _normal(9, (4, 4))
    seen = []

    def velocity_fn(x, t, c):
        seen.append(c)
        scale = {"double": 2.0, "none": 0.0}[c] if isinstance(c, str) else c
        return jnp.sin(x) * scale - x

    for method, exact in ALL_SAMPLERS:
        # Without a null condition `cond` reaches velocity_fn untouched (here not even
        # an array), and no unconditional velocity is computed.
        seen.clear()
        plain = flow.sample(velocity_fn, noise, "double", num_steps=4, method=method, exact=exact)
        assert seen and all(c == "double" for c in seen)
        ref = _reference_loop(
            lambda x, t, c: np.sin(x) * c - x,
            np.asarray(noise),
            2.0,
            2.0,
            method=method,
            num_steps=4,
            guidance=1.0,
            interval=(0.0, 1.0),
            shift=1.0,
            exact=exact,
        )
        np.testing.assert_allclose(plain, ref[-1], rtol=1e-6, atol=1e-6)
        # With a null condition and guidance 1: v_u + 1 * (v_c - v_u), the same up to rounding.
        mixed = flow.sample(
            velocity_fn,
            noise,
            2.0,
            num_steps=4,
            method=method,
            exact=exact,
            null_cond=0.0,
        )
        np.testing.assert_allclose(mixed, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,exact", ALL_SAMPLERS)
def test_guidance_interval_is_strict(method, exact):
    num_steps, guidance = 5, 3.0
    times = np.asarray(flow.sampling_times(num_steps, 2.0))
    # The interval ends exactly on grid points 1 and 4: those are not guided (strict).
    interval = (float(times[1]), float(times[4]))
    w = np.where((times > times[1]) & (times < times[4]), guidance, 1.0)
    assert w.tolist() == [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]

    def velocity_fn(x, t, c):  # v_c = 1, v_u = 0: the guided velocity is w(t)
        return jnp.zeros_like(x) + c

    noise = jnp.zeros((2,))
    _, traj = flow.sample(
        velocity_fn,
        noise,
        1.0,
        num_steps=num_steps,
        method=method,
        exact=exact,
        guidance=guidance,
        null_cond=0.0,
        guidance_interval=interval,
        shift=2.0,
        return_trajectory=True,
    )
    increments = np.diff(np.asarray(traj)[:, 0]) / np.diff(times)
    if method == "euler":
        expected = w[:-1]
    elif method == "flowdpm":
        expected = np.concatenate([w[:1], 1.5 * w[1:-1] - 0.5 * w[:-2]])
    else:  # the corrector is evaluated at the step's end time; the last step is Euler
        expected = np.concatenate([(w[:-2] + w[1:-1]) / 2, w[-2:-1]])
    np.testing.assert_allclose(increments, expected, rtol=1e-5)


# ---------------------------------------------------------- jit and vmap


def test_sample_traced_guidance():
    noise = jnp.ones((3,))

    def run(w):
        return flow.sample(
            lambda x, t, c: x * c,
            noise,
            2.0,
            num_steps=2,
            method="euler",
            guidance=w,
            null_cond=1.0,
        )

    out = jax.jit(jax.vmap(run))(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(out[0], run(1.0), rtol=1e-6)
    np.testing.assert_allclose(out[1], run(2.0), rtol=1e-6)


def test_sample_errors():
    noise = jnp.zeros((4,))

    def fn(x, t, c):
        return x

    with pytest.raises(ValueError, match="method"):
        flow.sample(fn, noise, 0, num_steps=2, method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample(fn, noise, 0, num_steps=0)
    with pytest.raises(ValueError, match="null_cond"):
        flow.sample(fn, noise, 0, num_steps=2, guidance=2.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        flow.sample(
            fn,
            noise,
            0,
            num_steps=2,
            guidance=2.0,
            null_cond=1,
            guidance_interval=(0.5, 0.5),
        )
    with pytest.raises(ValueError, match="exact"):
        flow.sample(fn, noise, 0, num_steps=2, method="euler", exact=True)
    with pytest.raises(ValueError, match="shift"):
        flow.sample(fn, noise, 0, num_steps=2, shift=-1.0)
    with pytest.raises(ValueError, match="structure"):
        flow.sample(fn, noise, (0, 1), num_steps=2, guidance=2.0, null_cond=0)
    with pytest.raises(ValueError, match="shaped like"):
        flow.sample(lambda x, t, c: x[:1], noise, 0, num_steps=2)
    with pytest.raises(ValueError, match="num_steps"):
        flow.sampling_times(0)


# ------------------------------------------------------- golden parity


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sampler_golden(name, c2i_reference):
    settings = _sampler_settings(name)
    ref = np.load(FIXTURES / f"sampler_{name}.npz")
    null_label = MANIFEST["model_c2i"]["init"]["num_classes"]

    def velocity_fn(x, t, y):
        return c2i_reference(x, t, y)

    def run(noise, y):
        return flow.sample(
            velocity_fn,
            noise,
            y,
            num_steps=settings["num_steps"],
            method=SAMPLER_CASES[name],
            guidance=settings["guidance"],
            null_cond=null_label,
            guidance_interval=(
                settings["guidance_interval_min"],
                settings["guidance_interval_max"],
            ),
            shift=settings["timeshift"],
            exact=settings.get("exact_henu", False),
            return_trajectory=True,
        )

    x, traj = jax.jit(jax.vmap(run))(jnp.asarray(ref["in_noise"]), jnp.asarray(ref["in_y"]))
    traj = jnp.moveaxis(traj, 0, 1)  # (steps + 1, batch, C, H, W), as the fixture
    assert traj.shape == ref["out_trajectory"].shape
    assert rel_err(traj, ref["out_trajectory"]) <= 1e-5
    assert rel_err(x, ref["out_x"]) <= 1e-5


# ------------------------------------------------------- solver objects


SOLVERS = {
    ("euler", False): flow.Euler(),
    ("flowdpm", False): flow.FlowDPM(),
    ("heun", False): flow.Heun(),
    ("heun", True): flow.Heun(exact=True),
}


def _toy_velocity(x, t, label):
    return jnp.tanh(x) * label.astype(x.dtype) - t * x


@pytest.mark.parametrize("method,exact", ALL_SAMPLERS)
def test_solver_steps_are_the_method(method, exact):
    """`init` then `step` over the grid, by hand and jitted, equals `sample(method=...)` bit for
    bit; `solver=` takes the object; `settled` gives the trajectory."""
    solver = SOLVERS[(method, exact)]
    noise, label = _normal(11, (2, 3, 3)), jnp.int32(2)
    kwargs = dict(num_steps=5, shift=1.5, guidance=2.0, null_cond=0, guidance_interval=(0.1, 0.9))
    want, want_traj = flow.sample(
        _toy_velocity, noise, label, method=method, exact=exact, return_trajectory=True, **kwargs
    )
    ode = flow.ProbabilityFlow(_toy_velocity, label, guidance=2.0, null_cond=0, guidance_interval=(0.1, 0.9))
    times = flow.sampling_times(5, 1.5)
    step = eqx.filter_jit(solver.step)
    y, state, settled = noise, solver.init(ode, times[0], times[1], noise), []
    for k in range(5):
        y_next, state = step(ode, times[k], times[k + 1], y, state)
        settled.append(solver.settled(y, state))
        y = y_next
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(jnp.stack([*settled, y]), want_traj)
    got = flow.sample(_toy_velocity, noise, label, solver=solver, **kwargs)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=str)
def test_solver_under_vmap_equals_per_example(solver):
    noise, labels = _normal(12, (3, 4)), jnp.array([1, 2, 3], dtype=jnp.int32)
    times = flow.sampling_times(4)

    def run(n, y):
        return flow.integrate(flow.ProbabilityFlow(_toy_velocity, y), n, times, solver)

    batched = jax.jit(jax.vmap(run))(noise, labels)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(noise[i], labels[i]), rtol=1e-6, atol=1e-7)


def test_heun_evaluation_counts():
    """Heun's lazy corrector costs N evaluations for N steps, exact Heun 2N - 1 (the last step is Euler)."""
    noise, times = _normal(13, (4,)), flow.sampling_times(6)
    for solver, expected in ((flow.Heun(), 6), (flow.Heun(exact=True), 11), (flow.Euler(), 6), (flow.FlowDPM(), 6)):
        calls = []

        def velocity(x, t):
            calls.append(float(t))
            return -x * t

        y, state = noise, solver.init(velocity, times[0], times[1], noise)
        for k in range(6):
            y, state = solver.step(velocity, times[k], times[k + 1], y, state)
        # Eager: exact Heun's `lax.cond` traces both branches, the first step's corrector included.
        traced_only = 1 if solver == flow.Heun(exact=True) else 0
        assert len(calls) == expected + traced_only, solver
        assert 1.0 not in calls  # never evaluated at the data end


def test_guided_wrapper_is_the_old_guidance():
    """`Guided(velocity_fn, null, w, interval)(x, t, cond)` is `v_u + w (v_c - v_u)` strictly inside the interval."""
    x = _normal(14, (2, 3))
    guided = flow.Guided(_toy_velocity, 0, 2.5, (0.2, 0.8))
    for t in (0.1, 0.2, 0.5, 0.8):
        t = jnp.float32(t)
        v_c, v_u = _toy_velocity(x, t, jnp.int32(3)), _toy_velocity(x, t, jnp.int32(0))
        w = 2.5 if np.float32(0.2) < t < np.float32(0.8) else 1.0  # strict, in float32
        np.testing.assert_allclose(guided(x, t, jnp.int32(3)), v_u + w * (v_c - v_u), rtol=1e-6, atol=1e-6)
    ode = flow.ProbabilityFlow(_toy_velocity, jnp.int32(3), guidance=2.5, null_cond=0, guidance_interval=(0.2, 0.8))
    np.testing.assert_array_equal(ode(x, 0.5), guided(x, jnp.float32(0.5), jnp.int32(3)))
    # A guided velocity is a velocity function: sample with it, unguided, as with guidance.
    noise = _normal(15, (2, 3))
    np.testing.assert_array_equal(
        flow.sample(guided, noise, jnp.int32(3), num_steps=4, method="euler"),
        flow.sample(
            _toy_velocity,
            noise,
            jnp.int32(3),
            num_steps=4,
            method="euler",
            guidance=2.5,
            null_cond=0,
            guidance_interval=(0.2, 0.8),
        ),
    )
    with pytest.raises(ValueError, match="guidance_interval"):
        flow.Guided(_toy_velocity, 0, 2.0, (0.5, 0.1))


def test_solver_argument_errors():
    noise = jnp.zeros((4,))
    with pytest.raises(ValueError, match="either as `solver` or as `method`"):
        flow.sample(_toy_velocity, noise, jnp.int32(1), num_steps=2, method="euler", solver=flow.Euler())
    with pytest.raises(ValueError, match="solver"):
        flow.sample(_toy_velocity, noise, jnp.int32(1), num_steps=2, solver="rk4")


def test_diffrax_solver_steps_on_the_same_grid():
    """`solver=diffrax.Euler()` is sample_ode on flow.sample's grid: `method="euler"` to round-off."""
    diffrax = pytest.importorskip("diffrax")
    noise = _normal(16, (2, 3))
    kwargs = dict(num_steps=6, shift=2.0, guidance=1.5, null_cond=0, guidance_interval=(0.1, 0.9))
    got = flow.sample(_toy_velocity, noise, jnp.int32(2), solver=diffrax.Euler(), **kwargs)
    want = flow.sample(_toy_velocity, noise, jnp.int32(2), method="euler", **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="return_trajectory"):
        flow.sample(_toy_velocity, noise, jnp.int32(2), solver=diffrax.Tsit5(), num_steps=2, return_trajectory=True)


def test_progress_reports_every_step_and_changes_nothing(capsys):
    """`progress=True`: a tqdm bar to 5/5 from inside jit + vmap, one per solve; the same samples."""
    pytest.importorskip("tqdm")
    noise, labels = _normal(17, (3, 2, 2)), jnp.array([1, 2, 3], dtype=jnp.int32)

    def run(progress):
        f = lambda n, y: flow.sample(_toy_velocity, n, y, num_steps=5, progress=progress)  # noqa: E731
        return jax.jit(jax.vmap(f))(noise, labels)

    quiet = run(False)
    jax.effects_barrier()
    assert capsys.readouterr().err == ""
    loud = run(True)
    jax.effects_barrier()
    err = capsys.readouterr().err
    np.testing.assert_array_equal(loud, quiet)
    assert "5/5" in err and err.count("sampling: 100%") == 1, err

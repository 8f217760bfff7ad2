"""`pixeldit_eqx.sample`: PixelDiT2's grounded samplers (schedule, guidance rule, golden
trajectories) and the delegation to `flow.sample` for PixelDiT."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _grounded, _sample, flow

from .helpers import FIXTURES2, rel_err, SMALL_C2I, SMALL_T2I


SAMPLERS = json.loads((FIXTURES2 / "samplers.json").read_text())
CASES = {
    "sampler_grounded_euler": "euler",
    "sampler_grounded_heun": "heun",
    "sampler_grounded_heun_clamp": "heun",
}


def _settings(case: str) -> dict:
    init = SAMPLERS[case]["init"]
    return dict(
        num_steps=init["num_steps"],
        method=CASES[case],
        guidance=init["guidance"],
        guidance_interval=(init["guidance_interval_min"], init["guidance_interval_max"]),
        noise_scale=init["noise_scale"],
        t_eps=init["t_eps"],
    )


# ----------------------------------------------------------------- schedule and guidance rule


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_matches_the_reference(case):
    """Grid, the time of every velocity evaluation and its guidance weight, in order."""
    ref = np.load(FIXTURES2 / f"{case}.npz")
    s = _settings(case)
    times = _grounded.sampling_times(s["num_steps"])
    assert np.array_equal(np.asarray(times), ref["out_timesteps"])
    eval_t = _grounded.evaluation_times(s["num_steps"], s["method"])
    assert np.array_equal(np.asarray(eval_t), ref["mid_velocity_t"])
    w = _grounded.guidance_weight(eval_t, s["guidance"], s["guidance_interval"])
    assert np.array_equal(np.asarray(w), ref["mid_velocity_guidance"])


def test_guidance_interval_rule():
    t = jnp.asarray([0.0, 0.1, 0.125, 0.5, 0.9, 0.95, 1.0], dtype=jnp.float32)
    w = np.asarray(_grounded.guidance_weight(t, 3.0, (0.125, 0.9)))
    assert w.tolist() == [1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0]  # strict at both ends
    w0 = np.asarray(_grounded.guidance_weight(t, 3.0, (0.0, 0.9)))
    assert w0.tolist() == [3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0]  # t = 0 guided when t_min == 0
    # The bound is compared in float32, as the reference compares float32 times.
    assert float(_grounded.guidance_weight(jnp.float32(0.9), 2.0, (0.0, 0.9))) == 1.0


def test_shift_extends_the_grid():
    assert np.array_equal(np.asarray(_grounded.sampling_times(4, 1.0)), np.float32([0, 0.25, 0.5, 0.75, 1]))
    shifted = np.asarray(_grounded.sampling_times(4, 3.0))
    assert np.allclose(shifted, np.asarray(flow.time_shift(jnp.linspace(0, 1, 5), 3.0)))
    assert shifted[0] == 0.0 and shifted[-1] == 1.0 and shifted[1] < 0.25


# ----------------------------------------------------------------- the loop, on a stand-in network


def _stand_in(x, t, y, skip_grounding):
    """An x-prediction that depends on every input the sampler controls."""
    label = jnp.asarray(y, dtype=jnp.float32)
    skip = jnp.asarray(skip_grounding, dtype=jnp.float32)
    return jnp.tanh(x * (0.5 + t) + 0.1 * label - 0.3 * skip)


def _reference_loop(noise, y, null, *, num_steps, method, guidance, guidance_interval, noise_scale, t_eps):
    """The reference's sampler, transcribed as a plain float64 loop (`GroundedSampler`)."""
    t_min, t_max = guidance_interval

    def pred(x, t, label, skip):
        return np.tanh(x * (0.5 + t) + 0.1 * label - 0.3 * skip)

    def velocity(x, t):
        scale = max(1 - t, t_eps)
        v_c = (pred(x, t, y, 0.0) - x) / scale
        v_u = (pred(x, t, null, 1.0) - x) / scale
        above = t > t_min if t_min > 0 else True
        w = guidance if (t < t_max and above) else 1.0
        return v_u + w * (v_c - v_u)

    steps = np.linspace(0.0, 1.0, num_steps + 1)
    x = np.asarray(noise, np.float64) * noise_scale
    trajectory = [x]
    for i in range(num_steps - 1):
        t, t_next = steps[i], steps[i + 1]
        if method == "euler":
            x = x + (t_next - t) * velocity(x, t)
        else:
            v = velocity(x, t)
            v_next = velocity(x + (t_next - t) * v, t_next)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        trajectory.append(x)
    x = x + (steps[-1] - steps[-2]) * velocity(x, steps[-2])
    trajectory.append(x)
    return np.stack(trajectory)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_steps=6, method="euler", guidance=2.4, guidance_interval=(0.125, 0.9), noise_scale=1.0, t_eps=0.05),
        dict(num_steps=5, method="heun", guidance=3.0, guidance_interval=(0.0, 1.0), noise_scale=1.5, t_eps=0.3),
        dict(num_steps=7, method="heun", guidance=2.1, guidance_interval=(0.1, 0.925), noise_scale=2.0, t_eps=0.05),
        dict(num_steps=1, method="heun", guidance=1.5, guidance_interval=(0.0, 0.5), noise_scale=1.0, t_eps=0.05),
        dict(num_steps=3, method="euler", guidance=1.0, guidance_interval=(0.0, 1.0), noise_scale=1.0, t_eps=0.05),
    ],
)
def test_loop_matches_a_transcription_of_the_reference(settings):
    noise = np.random.default_rng(0).standard_normal((2, 3, 5), dtype=np.float32)
    x, trajectory = _sample.grounded_sample(
        _stand_in, jnp.asarray(noise), jnp.int32(3), jnp.int32(10), return_trajectory=True, **settings
    )
    expected = _reference_loop(noise, 3.0, 10.0, **settings)
    assert trajectory.shape == (settings["num_steps"] + 1, *noise.shape)
    assert np.array_equal(np.asarray(trajectory[0]), noise * np.float32(settings["noise_scale"]))
    assert np.array_equal(np.asarray(trajectory[-1]), np.asarray(x))
    assert rel_err(trajectory, expected) < 1e-5


def test_guidance_one_skips_the_unconditional_branch():
    calls = []

    def spy(x, t, y, skip_grounding):
        calls.append(skip_grounding)
        return _stand_in(x, t, y, skip_grounding)

    noise = jnp.ones((1, 2, 2), dtype=jnp.float32)
    _sample.grounded_sample(spy, noise, 1, 10, num_steps=2, method="euler", guidance=1.0)
    assert calls and not any(calls)
    calls.clear()
    _sample.grounded_sample(spy, noise, 1, 10, num_steps=2, method="euler", guidance=2.0)
    assert sorted(calls) == [False, True]  # the scan body is traced once: both branches


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="flowdpm"), "method"),
        (dict(guidance_interval=(0.9, 0.1)), "guidance_interval"),
        (dict(t_eps=0.0), "t_eps"),
        (dict(num_steps=0), "num_steps"),
        (dict(shift=-1.0), "shift"),
    ],
)
def test_invalid_arguments(kwargs, match):
    options = dict(num_steps=2, method="heun", guidance=2.0)
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _sample.grounded_sample(_stand_in, jnp.zeros((1, 2, 2)), 1, 10, **options)


# ----------------------------------------------------------------- golden trajectories


@pytest.fixture(scope="module")
def pixeldit2():
    from safetensors.numpy import load_file

    init = json.loads((FIXTURES2 / "manifest.json").read_text())["model_pixeldit2"]["init"]
    skeleton = eqx.filter_eval_shape(px.PixelDiT2, **init, key=jax.random.key(0))
    return px.load_state_dict(skeleton, load_file(FIXTURES2 / "model_pixeldit2.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_matches_the_reference_sampler(pixeldit2, case):
    """Every state of the reference's trajectory (batch 2, 16x24), to 1e-4."""
    ref = np.load(FIXTURES2 / f"{case}.npz")

    def run(noise, y):
        return px.sample(pixeldit2, noise, y, return_trajectory=True, **_settings(case))

    x, trajectory = jax.jit(jax.vmap(run))(jnp.asarray(ref["in_noise"]), jnp.asarray(ref["in_y"]))
    trajectory = np.moveaxis(np.asarray(trajectory), 1, 0)
    assert trajectory.shape == ref["out_trajectory"].shape
    assert np.array_equal(trajectory[0], ref["in_noise"] * np.float32(_settings(case)["noise_scale"]))
    assert rel_err(trajectory, ref["out_trajectory"]) < 1e-4
    assert rel_err(x, ref["out_x"]) < 1e-4


# ----------------------------------------------------------------- px.sample on PixelDiT


@pytest.fixture(scope="module")
def tiny_pixeldit():
    return px.PixelDiT(**SMALL_C2I | dict(patch_size=4, num_classes=10), key=jax.random.key(0))


def test_pixeldit_delegates_to_flow_sample(tiny_pixeldit):
    model = tiny_pixeldit
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8), dtype=np.float32))
    options = dict(num_steps=3, method="heun", guidance=2.0, guidance_interval=(0.1, 0.9), return_trajectory=True)
    x, trajectory = px.sample(model, noise, 4, noise_scale=2.0, **options)
    ref_x, ref_trajectory = flow.sample(model, noise * 2.0, 4, null_cond=10, **options)
    assert trajectory.shape == (4, 1, 8, 8)
    assert np.array_equal(np.asarray(trajectory[0]), np.asarray(noise * 2.0))
    assert np.array_equal(np.asarray(x), np.asarray(ref_x))
    assert np.array_equal(np.asarray(trajectory), np.asarray(ref_trajectory))


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="model"):
        px.sample(lambda x, t, y: x, jnp.zeros((1, 4, 4)), 0, num_steps=2)


def test_pixeldit_t2i_samples_with_the_empty_text_as_null():
    model = px.PixelDiTT2I(**SMALL_T2I | dict(patch_size=4, txt_max_length=6), key=jax.random.key(3))
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((1, 8, 8), dtype=np.float32))
    text = jnp.asarray(rng.standard_normal((6, 8), dtype=np.float32))
    mask = jnp.asarray([True, True, True, False, False, False])
    options = dict(num_steps=2, method="euler", guidance=3.0, guidance_interval=(0.0, 1.0))
    x = px.sample(model, noise, (text, mask), noise_scale=0.5, **options)

    def velocity(x, t, cond):
        return model(x, t, cond[0], cond[1])

    null = (jnp.zeros_like(text), jnp.ones((6,), dtype=bool))
    expected = flow.sample(velocity, noise * 0.5, (text, mask), null_cond=null, **options)
    assert np.array_equal(np.asarray(x), np.asarray(expected))
    with pytest.raises(ValueError, match="text_mask"):
        px.sample(model, noise, text, num_steps=2)


def test_grounded_samplers_are_flow_solvers_over_the_grounded_velocity():
    """`method="heun"` is `flow.Heun(exact=True)` and `"euler"` is `flow.Euler()`, scanned by
    `flow.integrate` over `GroundedVelocity` on the grounded grid, bit for bit; `solver=` takes them."""
    noise = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 5), dtype=np.float32))
    settings = dict(guidance=2.4, guidance_interval=(0.0, 0.9), t_eps=0.3)
    velocity = _grounded.GroundedVelocity(_grounded.XPrediction(_stand_in, jnp.int32(10)), jnp.int32(3), **settings)
    times = _grounded.sampling_times(5)
    results = {}
    for method, solver in (("heun", flow.Heun(exact=True)), ("euler", flow.Euler())):
        want = _sample.grounded_sample(
            _stand_in, noise, jnp.int32(3), jnp.int32(10), num_steps=5, method=method, **settings
        )
        np.testing.assert_array_equal(flow.integrate(velocity, noise, times, solver), want)
        got = _sample.grounded_sample(
            _stand_in, noise, jnp.int32(3), jnp.int32(10), num_steps=5, solver=solver, **settings
        )
        np.testing.assert_array_equal(got, want)
        results[method] = want
    # Another solver object is an extension the reference does not have: the lazy Heun.
    lazy = _sample.grounded_sample(
        _stand_in, noise, jnp.int32(3), jnp.int32(10), num_steps=5, solver=flow.Heun(), **settings
    )
    assert lazy.shape == noise.shape and not np.array_equal(lazy, results["heun"])
    with pytest.raises(ValueError, match="solver"):
        _sample.grounded_sample(_stand_in, noise, 3, 10, num_steps=2, solver="heun")

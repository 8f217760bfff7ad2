"""`flow.log_likelihood` and `flow.sample_ode` against closed forms.

The exact case: data `x ~ N(mu, Sigma)` and noise `eps ~ N(0, I)` on the package's path
`x_t = t x + (1 - t) eps` have Gaussian marginals `N(t mu, C_t)`, `C_t = t^2 Sigma + (1 - t)^2 I`,
and the marginal velocity `E[x - eps | x_t = y]` is linear:
`v(y, t) = mu + (t Sigma - (1 - t) I) C_t^{-1} (y - t mu)`. Its flow carries `N(0, I)` at
`t = 0` to `N(mu, Sigma)` at `t = 1`, so `log_likelihood` must equal the Gaussian log-density.
"""

import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from pixeldit_eqx import flow


SHAPE = (1, 2, 3)  # one small "image": 6 elements
D = 6


def _gaussian_problem():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(D, 2)), dtype=jnp.float32)
    root = rng.normal(size=(D, D)) / np.sqrt(D)
    sigma = jnp.asarray(root @ root.T + 0.3 * np.eye(D), dtype=jnp.float32)
    return w, sigma


W, SIGMA = _gaussian_problem()


def mean(theta):
    return W @ theta


def gaussian_velocity(x, t, theta):
    """The exact marginal velocity of the linear path from N(0, I) to N(W theta, SIGMA)."""
    mu = mean(theta)
    eye = jnp.eye(D, dtype=jnp.float32)
    c_t = t**2 * SIGMA + (1 - t) ** 2 * eye
    a_t = (t * SIGMA - (1 - t) * eye) @ jnp.linalg.inv(c_t)
    return (mu + a_t @ (x.reshape(-1) - t * mu)).reshape(x.shape)


def exact_log_density(x, theta):
    diff = x.reshape(-1) - mean(theta)
    _, logdet = jnp.linalg.slogdet(SIGMA)
    return -0.5 * (diff @ jnp.linalg.solve(SIGMA, diff) + logdet + D * jnp.log(2 * jnp.pi))


THETA = jnp.array([0.7, -1.2], dtype=jnp.float32)
TIGHT = dict(rtol=1e-6, atol=1e-6)


def _points(n, seed=1):
    """n draws from N(mu(THETA), SIGMA), shaped (n, *SHAPE)."""
    chol = jnp.linalg.cholesky(SIGMA)
    z = jr.normal(jr.key(seed), (n, D))
    return (mean(THETA)[None] + z @ chol.T).reshape(n, *SHAPE)


@jax.jit
def _value_and_grads(x, theta):
    """log_likelihood (exact divergence, tight tolerances) and its gradients in x and theta, one compile."""
    return jax.value_and_grad(lambda y, th: flow.log_likelihood(gaussian_velocity, y, th, **TIGHT), argnums=(0, 1))(
        x, theta
    )


def test_exact_divergence_equals_gaussian_log_density_and_its_gradients():
    for x in _points(3):
        value, (grad_x, grad_theta) = _value_and_grads(x, THETA)
        assert value.dtype == jnp.float32 and value.shape == ()
        np.testing.assert_allclose(value, exact_log_density(x, THETA), atol=1e-4, rtol=0)
        precision_diff = jnp.linalg.solve(SIGMA, x.reshape(-1) - mean(THETA))
        np.testing.assert_allclose(grad_theta, W.T @ precision_diff, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(grad_x, -precision_diff.reshape(SHAPE), atol=1e-3, rtol=1e-3)
    # Not jitted, and at another theta: the same answer.
    x, theta = _points(1, seed=4)[0], -THETA
    np.testing.assert_allclose(
        flow.log_likelihood(gaussian_velocity, x, theta, **TIGHT), exact_log_density(x, theta), atol=1e-4, rtol=0
    )


def test_fixed_step_heun_is_close_and_converges():
    x = _points(1)[0]
    want = exact_log_density(x, THETA)
    coarse = flow.log_likelihood(gaussian_velocity, x, THETA, solver=diffrax.Heun(), num_steps=8)
    fine = flow.log_likelihood(gaussian_velocity, x, THETA, solver=diffrax.Heun(), num_steps=64)
    assert abs(fine - want) < abs(coarse - want)
    np.testing.assert_allclose(fine, want, atol=2e-3)


def test_hutchinson_is_unbiased():
    x = _points(1, seed=2)[0]
    want = exact_log_density(x, THETA)
    keys = jr.split(jr.key(3), 64)
    for probe in ("rademacher", "gaussian"):
        run = jax.jit(
            jax.vmap(
                lambda k: flow.log_likelihood(
                    gaussian_velocity,
                    x,
                    THETA,
                    divergence="hutchinson",
                    probe=probe,
                    num_probes=4,
                    key=k,
                    solver=diffrax.Heun(),
                    num_steps=32,
                )
            )
        )
        estimates = np.asarray(run(keys))
        exact_fixed = flow.log_likelihood(gaussian_velocity, x, THETA, solver=diffrax.Heun(), num_steps=32)
        assert estimates.std() > 1e-3  # the estimates do vary from key to key
        stderr = estimates.std(ddof=1) / np.sqrt(len(estimates))
        assert abs(estimates.mean() - exact_fixed) < 3 * stderr
        assert abs(estimates.mean() - want) < 3 * stderr + 2e-3


def test_vmap_and_jit_equal_per_example_calls():
    xs = _points(4, seed=6)
    thetas = jnp.stack([THETA, -THETA, 2 * THETA, THETA + 1])
    one = lambda x, th: flow.log_likelihood(gaussian_velocity, x, th)  # noqa: E731
    batched = jax.jit(jax.vmap(one))(xs, thetas)
    singles = jnp.stack([one(x, th) for x, th in zip(xs, thetas)])
    np.testing.assert_allclose(batched, singles, atol=1e-5, rtol=1e-6)


class TinyVelocity(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(D + 3, D, width_size=8, depth=1, activation=jnp.tanh, key=key)

    def __call__(self, x, t, theta):
        return self.mlp(jnp.concatenate([x.reshape(-1), t[None], theta])).reshape(x.shape)


def test_grad_wrt_model_parameters_matches_finite_differences():
    model = TinyVelocity(jr.key(7))
    x = _points(1, seed=8)[0]
    kwargs = dict(solver=diffrax.Heun(), num_steps=8)

    def loss(m):
        return flow.log_likelihood(m, x, THETA, **kwargs)

    grads = eqx.filter_grad(loss)(model)
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in g_leaves)
    directions = [jr.normal(k, leaf.shape) for k, leaf in zip(jr.split(jr.key(9), len(leaves)), leaves)]
    h = 1e-2

    def shifted(sign):
        moved = jax.tree.unflatten(treedef, [p + sign * h * d for p, d in zip(leaves, directions)])
        return loss(eqx.combine(moved, static))

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    analytic = sum(jnp.sum(g * d) for g, d in zip(g_leaves, directions))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-3)


def test_grad_through_backsolve_adjoint():
    x = _points(1, seed=10)[0]
    got = jax.grad(
        lambda th: flow.log_likelihood(gaussian_velocity, x, th, adjoint=diffrax.BacksolveAdjoint(), **TIGHT)
    )(THETA)
    want = W.T @ jnp.linalg.solve(SIGMA, x.reshape(-1) - mean(THETA))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_sample_ode_euler_matches_flow_sample():
    model = TinyVelocity(jr.key(11))
    noise = jr.normal(jr.key(12), SHAPE)
    for shift in (1.0, 2.0):
        got = flow.sample_ode(model, noise, THETA, solver=diffrax.Euler(), num_steps=10, shift=shift)
        want = flow.sample(model, noise, THETA, num_steps=10, method="euler", shift=shift)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_sample_ode_heun_matches_exact_flow_sample():
    """flow.sample's Heun (the reference's) ends with a plain Euler step: diffrax's Heun on all
    but the last interval of the grid, then one Euler step, is `flow.sample(exact=True)`."""
    model = TinyVelocity(jr.key(13))
    noise = jr.normal(jr.key(14), SHAPE)
    n = 6
    grid = flow.sampling_times(n, 1.5)
    head = flow.sample_ode(model, noise, THETA, solver=diffrax.Heun(), times=grid[:-1])
    got = head + (grid[-1] - grid[-2]) * model(head, grid[-2], THETA)
    want = flow.sample(model, noise, THETA, num_steps=n, method="heun", exact=True, shift=1.5)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_sample_ode_with_guidance_matches_flow_sample():
    model = TinyVelocity(jr.key(15))
    noise = jr.normal(jr.key(16), SHAPE)
    null = jnp.zeros(2, dtype=jnp.float32)
    kwargs = dict(num_steps=8, guidance=2.0, null_cond=null, guidance_interval=(0.1, 0.9))
    got = flow.sample_ode(model, noise, THETA, solver=diffrax.Euler(), **kwargs)
    want = flow.sample(model, noise, THETA, method="euler", **kwargs)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_sample_ode_adaptive_pushes_noise_to_the_gaussian_and_back():
    """Sampling then evaluating: the adaptive solve maps noise z to x, and the likelihood of x
    is the change of variables `log N(z) - log|det dx/dz|` = the Gaussian density."""
    noise = jr.normal(jr.key(17), SHAPE)
    x = flow.sample_ode(gaussian_velocity, noise, THETA, **TIGHT)
    np.testing.assert_allclose(
        flow.log_likelihood(gaussian_velocity, x, THETA, **TIGHT), exact_log_density(x, THETA), atol=1e-4
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergence="trace"), "divergence"),
        (dict(divergence="hutchinson"), "key"),
        (dict(divergence="hutchinson", key=jr.key(0), num_probes=0), "num_probes"),
        (dict(divergence="hutchinson", key=jr.key(0), probe="sphere"), "probe"),
        (dict(solver=diffrax.Euler()), "num_steps"),
        (dict(solver="tsit5"), "solver"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=4, times=jnp.linspace(0, 1, 5)), "at most one"),
        (dict(times=jnp.array([0.0, 0.7, 0.5, 1.0])), "times"),
        (dict(rtol=0.0), "rtol"),
        (dict(max_steps=0), "max_steps"),
        (dict(guidance=2.0), "null_cond"),
        (dict(guidance=2.0, null_cond=jnp.zeros(3)), "null_cond"),
        (dict(guidance_interval=(0.9, 0.1)), "guidance_interval"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    x = _points(1)[0]
    with pytest.raises(ValueError, match=match):
        flow.log_likelihood(gaussian_velocity, x, THETA, **kwargs)


def test_velocity_of_the_wrong_shape_raises_value_error():
    with pytest.raises(ValueError, match="shaped like"):
        flow.log_likelihood(lambda x, t, c: x[0], _points(1)[0], THETA)
    with pytest.raises(ValueError, match="shaped like"):
        flow.sample_ode(lambda x, t, c: x[0], _points(1)[0], THETA, num_steps=2)


def test_missing_diffrax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffrax", None)  # `import diffrax` now raises ImportError
    with pytest.raises(ImportError, match=r"pixeldit-eqx\[likelihood\]"):
        flow.log_likelihood(gaussian_velocity, _points(1)[0], THETA)
    with pytest.raises(ImportError, match=r"pixeldit-eqx\[likelihood\]"):
        flow.sample_ode(gaussian_velocity, _points(1)[0], THETA)

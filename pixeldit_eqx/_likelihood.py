"""The probability-flow ODE of a velocity field, solved with diffrax: sampling and log-likelihoods.

The flow of [`pixeldit_eqx.flow`][] runs from noise (`t = 0`, `N(0, I)`) to data (`t = 1`):
`dx/dt = v(x, t, cond)`. Its density obeys the instantaneous change of variables
`d log p_t(x_t) / dt = -div v(x_t, t)`, so integrating the ODE back from a data point to the
noise end gives

`log p_1(x) = log N(x_0; 0, I) - ∫_0^1 div v(x_t, t) dt`.

[`ProbabilityFlow`][] defines the (optionally guided) velocity once, for `flow.sample` too;
[`sample_ode`][] solves it forwards and [`log_likelihood`][] solves it backwards, both with any
diffrax solver.
diffrax is an optional dependency: `pip install 'pixeldit-eqx[likelihood]'`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ._checks import check_int
from ._custom_types import Array, ArrayLike, Float, Real
from ._solvers import _check_floating, ProbabilityFlow, sampling_times


_DIVERGENCES = ("exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")


def _diffrax() -> Any:
    """The diffrax module, or an ImportError that names the extra to install."""
    try:
        import diffrax
    except ImportError as err:
        raise ImportError(
            "pixeldit_eqx.flow.log_likelihood and sample_ode need diffrax: "
            "`pip install 'pixeldit-eqx[likelihood]'` (or `pip install diffrax`)."
        ) from err
    return diffrax


def _sample_field(t: Array, y: Array, flow: ProbabilityFlow) -> Array:
    return flow(y, t)


def _likelihood_field(t: Array, state: tuple[Array, Array], args: tuple[ProbabilityFlow, Array | None]) -> Any:
    """The augmented ODE `(dx/dt, d l/dt) = (v, div v)`; with probes, Hutchinson's estimate of `div v`."""
    flow, probes = args
    y, _ = state
    shape = y.shape

    def flat_velocity(y_flat: Array) -> Array:
        return flow(y_flat.reshape(shape), t).reshape(-1)

    y_flat = y.reshape(-1)
    if probes is None:
        v, jvp_fn = jax.linearize(flat_velocity, y_flat)
        basis = jnp.eye(y_flat.size, dtype=y_flat.dtype)
        columns = jax.vmap(jvp_fn)(basis)  # row i is J e_i
        div = jnp.trace(columns)
    else:
        v, vjp_fn = jax.vjp(flat_velocity, y_flat)
        z_jacobian = jax.vmap(lambda z: vjp_fn(z)[0])(probes)  # row k is z_k^T J
        div = jnp.mean(jnp.sum(z_jacobian * probes, axis=-1))
    return v.reshape(shape), div.astype(jnp.float32)


def _step_control(
    dfx: Any, solver: Any, times: Array | None, rtol: float, atol: float, dt0: float | None
) -> tuple[Any, Any, float | None]:
    """The solver, stepsize controller and first step: `StepTo(times)` if given, else a PID controller."""
    if solver is None:
        solver = dfx.Tsit5()
    if not isinstance(solver, dfx.AbstractSolver):
        raise ValueError(f"`solver` must be a diffrax solver (e.g. diffrax.Tsit5()), got {type(solver).__name__}.")
    if times is not None:
        return solver, dfx.StepTo(ts=times), None
    if not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(
            f"`solver`={type(solver).__name__} has no error estimate for adaptive steps: expected "
            "`num_steps` (or `times`) to be given for a fixed-step solve, got neither."
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"`{name}` must be a float > 0, got {name}={value!r}.")
    return solver, dfx.PIDController(rtol=rtol, atol=atol), dt0


def _grid(num_steps: int | None, times: Any, shift: Any, *, whole: bool) -> Array | None:
    """The fixed time grid: `times` as given (from 0 to 1 if `whole`, else increasing in [0, 1]),
    or `flow.sampling_times(num_steps, shift)`."""
    if num_steps is not None and times is not None:
        raise ValueError("give at most one of `num_steps` and `times`, got both.")
    if num_steps is not None:
        check_int("num_steps", num_steps, 1)
        return sampling_times(int(num_steps), shift)
    if times is None:
        return None
    times = jnp.asarray(times, dtype=jnp.float32)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"`times` must be a 1-D array of at least 2 times, got shape {times.shape}.")
    concrete = _concrete_array(times)
    if concrete is not None:
        increasing = bool(np.all(np.diff(concrete) > 0))
        if whole and not (increasing and concrete[0] == 0.0 and concrete[-1] == 1.0):
            raise ValueError(f"`times` must increase strictly from 0.0 to 1.0, got {concrete.tolist()}.")
        if not (increasing and concrete[0] >= 0.0 and concrete[-1] <= 1.0):
            raise ValueError(f"`times` must increase strictly within [0, 1], got {concrete.tolist()}.")
    return times


def _concrete_array(x: Array) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
        return None


def sample_ode(
    velocity_fn: Any,
    noise: Float[Array, "*shape"],
    cond: PyTree,
    *,
    solver: Any = None,
    num_steps: int | None = None,
    times: Float[ArrayLike, " n"] | None = None,
    shift: Real[ArrayLike, ""] = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dt0: float | None = None,
    max_steps: int = 4096,
    adjoint: Any = None,
    guidance: Real[ArrayLike, ""] = 1.0,
    null_cond: PyTree | None = None,
    guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
) -> Float[Array, "*shape"]:
    """Integrates the flow ODE from noise (`t = 0`) to a sample (`t = 1`) with a diffrax solver.

    The ODE is [`ProbabilityFlow`][], the one [`log_likelihood`][] solves backwards. With
    `num_steps` (or an explicit grid `times`) the steps are those of `flow.sample`'s grid
    (`flow.sampling_times(num_steps, shift)`): `diffrax.Euler()` then reproduces
    `flow.sample(method="euler")`. Otherwise the steps are adaptive (a PID controller with
    `rtol`, `atol`).

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, `v` shaped like `x` (a `PixelDiT`, say).
    - `noise`: the starting point, one example of any shape.
    - `cond`: its condition, any pytree.
    - `solver`: a diffrax solver; default `diffrax.Tsit5()`.
    - `num_steps`: fixed steps on `flow.sampling_times(num_steps, shift)`; `times`: any
        increasing grid in [0, 1] instead, integrated from `times[0]` to `times[-1]` (a
        partial solve). Without either, adaptive steps from 0 to 1.
    - `shift`: the time shift of the `num_steps` grid.
    - `rtol`, `atol`, `dt0`: the adaptive step control (`dt0=None`: diffrax picks the first step).
    - `max_steps`: the most steps diffrax may take.
    - `adjoint`: the diffrax adjoint for gradients; default `RecursiveCheckpointAdjoint()`.
    - `guidance`, `null_cond`, `guidance_interval`: classifier-free guidance, as in `flow.sample`.

    **Returns:**

    The sample, shaped and typed like `noise`.
    """
    dfx = _diffrax()
    _check_floating("noise", noise)
    check_int("max_steps", max_steps, 1)
    ode = ProbabilityFlow(
        velocity_fn, cond, guidance=guidance, null_cond=null_cond, guidance_interval=guidance_interval
    )
    grid = _grid(num_steps, times, shift, whole=False)
    solver, controller, dt0 = _step_control(dfx, solver, grid, rtol, atol, dt0)
    solution = dfx.diffeqsolve(
        dfx.ODETerm(_sample_field),
        solver,
        t0=0.0 if grid is None else grid[0],
        t1=1.0 if grid is None else grid[-1],
        dt0=dt0,
        y0=noise,
        args=ode,
        stepsize_controller=controller,
        adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        max_steps=int(max_steps),
    )
    return solution.ys[-1]


def log_likelihood(
    velocity_fn: Any,
    x: Float[Array, "*shape"],
    cond: PyTree,
    *,
    solver: Any = None,
    num_steps: int | None = None,
    times: Float[ArrayLike, " n"] | None = None,
    shift: Real[ArrayLike, ""] = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dt0: float | None = None,
    max_steps: int = 4096,
    adjoint: Any = None,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    key: PRNGKeyArray | None = None,
    guidance: Real[ArrayLike, ""] = 1.0,
    null_cond: PyTree | None = None,
    guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
) -> Float[Array, ""]:
    """The log-density `log p(x | cond)` of one example under the flow of `velocity_fn`.

    Solves the probability-flow ODE ([`ProbabilityFlow`][]) from the data end (`t = 1`) back
    to the noise end (`t = 0`) together with `l(t) = ∫_1^t div v dt'`, and returns
    `log N(x_0; 0, I) + l(0)`: the instantaneous change of variables with a standard normal
    base density. Differentiable (with respect to `x`, `cond` and the parameters of an
    `eqx.Module` velocity) through the diffrax `adjoint`; works under `jax.jit` and `jax.vmap`.

    The divergence is `"exact"`, the trace of the Jacobian from one `jax.jvp` per element of
    the flattened example (fine for a few hundred elements), or `"hutchinson"`, the unbiased
    estimate `mean_k z_k^T J z_k` from one `jax.vjp` per probe, `num_probes` probes `z_k`
    (`"rademacher"` ±1 or `"gaussian"`) drawn from `key` and held fixed along the solve.

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, as `flow.sample` takes it.
    - `x`: one data example, any shape.
    - `cond`: its condition, any pytree (label, text tokens, parameters θ...).
    - `solver`: a diffrax solver; default `diffrax.Tsit5()`.
    - `num_steps`: fixed steps on the grid `flow.sampling_times(num_steps, shift)` (walked
        backwards); `times`: any increasing grid from 0 to 1 instead. Without either,
        adaptive steps with a PID controller (`rtol`, `atol`, first step `dt0`).
    - `max_steps`: the most steps diffrax may take.
    - `adjoint`: the diffrax adjoint for gradients; default `RecursiveCheckpointAdjoint()`.
    - `divergence`: `"exact"` or `"hutchinson"`.
    - `num_probes`, `probe`, `key`: Hutchinson's probes (`key` required for it, unused by `"exact"`).
    - `guidance`, `null_cond`, `guidance_interval`: classifier-free guidance, as in
        `flow.sample` (the density is then that of the guided flow).

    **Returns:**

    A float32 scalar.

    **Example:**

    ```python
    logp = jax.vmap(lambda x, y: log_likelihood(model, x, y))(images, labels)
    grad_theta = jax.grad(lambda th: log_likelihood(emulator, x_obs, th))(theta)
    ```
    """
    dfx = _diffrax()
    _check_floating("x", x)
    check_int("max_steps", max_steps, 1)
    if divergence not in _DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {_DIVERGENCES}, got divergence={divergence!r}.")
    ode = ProbabilityFlow(
        velocity_fn, cond, guidance=guidance, null_cond=null_cond, guidance_interval=guidance_interval
    )
    grid = _grid(num_steps, times, shift, whole=True)
    solver, controller, dt0 = _step_control(dfx, solver, None if grid is None else grid[::-1], rtol, atol, dt0)
    if dt0 is not None:
        dt0 = -abs(float(dt0))
    probes = None
    if divergence == "hutchinson":
        check_int("num_probes", num_probes, 1)
        if probe not in _PROBES:
            raise ValueError(f"`probe` must be one of {_PROBES}, got probe={probe!r}.")
        if key is None:
            raise ValueError("`divergence`='hutchinson' draws random probes: expected a PRNG `key`, got key=None.")
        shape = (int(num_probes), x.size)
        if probe == "rademacher":
            probes = jax.random.rademacher(key, shape, dtype=x.dtype)
        else:
            probes = jax.random.normal(key, shape, dtype=x.dtype)
    solution = dfx.diffeqsolve(
        dfx.ODETerm(_likelihood_field),
        solver,
        t0=1.0,
        t1=0.0,
        dt0=dt0,
        y0=(x, jnp.zeros((), dtype=jnp.float32)),
        args=(ode, probes),
        stepsize_controller=controller,
        adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        max_steps=int(max_steps),
    )
    x0, delta = solution.ys[0][-1], solution.ys[1][-1]
    x0 = x0.astype(jnp.float32)
    base = -0.5 * (jnp.sum(jnp.square(x0)) + x0.size * math.log(2 * math.pi))
    return base + delta

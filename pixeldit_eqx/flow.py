"""Rectified flow: the training objective and the ODE samplers of PixelDiT.

Time runs from noise (`t = 0`) to data (`t = 1`): `x_t = t x + (1 - t) eps`, and a
network learns the velocity `x - eps`. Everything here is model-agnostic: it takes any
per-example velocity function

```python
velocity_fn(x, t, cond) -> v
```

where `x` is one example of any shape (an image `(C, H, W)`, say), `t` a scalar float32
array and `cond` any pytree (an integer label, a text array, a tuple `(text, mask)`...),
and `v` has the shape of `x`. An `equinox.Module` whose `__call__` has that signature
(`PixelDiT`, for one) can be passed as is. As everywhere in this package, one call
handles one example; batch with `jax.vmap`.

`sample` solves the ODE `ProbabilityFlow` (the velocity, `Guided` for classifier-free
guidance) with a solver object (`Euler`, `Heun`, `FlowDPM`: `init` and `step`, the
shape of diffrax's solvers) in one `jax.lax.scan` (`integrate`); `sample_ode` and
`log_likelihood` solve the same ODE with diffrax.

Reference: `c2i/src/diffusion.py` of the PyTorch PixelDiT (the `REPATrainer` flow
loss, `EulerSampler`, `HeunSampler`, `FlowDPMSolverSampler`, `shift_respace_fn`).
"""

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._checks import check_int
from ._custom_types import Array, ArrayLike, Float, Real
from ._likelihood import log_likelihood as log_likelihood, sample_ode as sample_ode
from ._solvers import (
    _check_floating,
    _check_shift,
    _check_velocity,
    _concrete_float,
    _pair_conditions,
    AbstractSolver as AbstractSolver,
    Euler as Euler,
    FlowDPM as FlowDPM,
    Guided as Guided,
    Heun as Heun,
    integrate as integrate,
    ProbabilityFlow as ProbabilityFlow,
    sampling_times as sampling_times,
    time_shift as time_shift,
)


#: A per-example velocity `velocity_fn(x, t, cond) -> v`, `v` shaped like `x`.
VelocityFn: TypeAlias = Callable[[Array, Array, Any], Array]

_METHODS = ("heun", "euler", "flowdpm")


def sample_training_time(key: PRNGKeyArray, shift: Real[ArrayLike, ""] = 1.0) -> Float[Array, ""]:
    """Draws one training time: logit-normal `sigmoid(n)`, `n ~ N(0, 1)`, then shifted.

    Reference: `REPATrainer._impl_trainstep` with `lognorm_t=True` in
    `c2i/src/diffusion.py` (`randn(...).sigmoid()` then `time_shift_fn`).

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `shift`: the time shift (see [`time_shift`][pixeldit_eqx.flow.time_shift]).

    **Returns:**

    A float32 scalar in (0, 1).

    For a batch, `jax.vmap(sample_training_time)(jax.random.split(key, batch))`.
    """
    _check_shift(shift)
    n = jax.random.normal(key, (), dtype=jnp.float32)
    return time_shift(jax.nn.sigmoid(n), shift)


def interpolate(
    x: Float[Array, "*shape"], eps: Float[Array, "*shape"], t: Real[ArrayLike, ""]
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """The point on the straight path from noise to data, and the velocity along it.

    `x_t = t x + (1 - t) eps` and `target = x - eps` (the reference's linear scheduler:
    `alpha = t`, `sigma = 1 - t`, `v = dalpha x + dsigma eps`).

    Reference: `REPATrainer._impl_trainstep` and `LinearScheduler` in
    `c2i/src/diffusion.py`.

    **Arguments:**

    - `x`: one data example, any shape.
    - `eps`: noise shaped like `x`.
    - `t`: a scalar time in [0, 1]; 0 is pure noise, 1 is data. It is cast to the dtype
        of `x`, as the reference casts it.

    **Returns:**

    `(x_t, target)`, both shaped like `x`.
    """
    _check_floating("x", x)
    if eps.dtype != x.dtype:
        raise ValueError(f"`eps` must have the dtype of `x`: expected {x.dtype}, got {eps.dtype}.")
    t = jnp.asarray(t, dtype=x.dtype)
    x_t = t * x + (1 - t) * eps
    return x_t, x - eps


def flow_matching_loss_at(
    velocity_fn: VelocityFn,
    x: Float[Array, "*shape"],
    cond: PyTree,
    eps: Float[Array, "*shape"],
    t: Real[ArrayLike, ""],
) -> Float[Array, ""]:
    """The flow matching loss of one example at a given noise and time.

    The deterministic core of [`flow_matching_loss`][]: the mean over all elements of
    `(velocity_fn(x_t, t, cond) - (x - eps))**2`, with `x_t = t x + (1 - t) eps`. The
    error is squared and averaged in float32 whatever the dtype of `x`.

    Reference: the `fm_loss` of `REPATrainer._impl_trainstep` in `c2i/src/diffusion.py`
    (constant loss weight; the REPA feature-alignment term is not part of this).

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, `v` shaped like `x`.
    - `x`: one data example, any shape.
    - `cond`: its condition, any pytree; passed to `velocity_fn` unchanged.
    - `eps`: noise shaped like `x`.
    - `t`: a scalar time in [0, 1]; `velocity_fn` receives it as a float32 scalar.

    **Returns:**

    A float32 scalar.
    """
    t = jnp.asarray(t, dtype=jnp.float32)
    x_t, target = interpolate(x, eps, t)
    v = _check_velocity(velocity_fn(x_t, t, cond), x)
    err = v.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(err))


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x: Float[Array, "*shape"],
    cond: PyTree,
    *,
    key: PRNGKeyArray,
    null_cond: PyTree | None = None,
    drop_prob: Real[ArrayLike, ""] = 0.0,
    shift: Real[ArrayLike, ""] = 1.0,
) -> Float[Array, ""]:
    """The rectified-flow training loss of one example.

    Draws `eps ~ N(0, I)` shaped like `x` and a logit-normal time `t` (see
    [`sample_training_time`][]); with probability `drop_prob` replaces `cond` by
    `null_cond` (for classifier-free guidance); returns [`flow_matching_loss_at`][]
    at that noise and time.

    Reference: `BaseTrainer.preproprocess` (condition dropout) and
    `REPATrainer._impl_trainstep` (`lognorm_t=True`) in `c2i/src/diffusion.py`.
    Deviations: the time is drawn from the logit-normal law only (the reference can also
    draw it uniformly); the REPA feature-alignment loss is left to the caller; the
    velocity function receives `t` in float32 even when `x` is in a lower precision
    (the interpolation uses `t` in the dtype of `x`, as the reference does).

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, `v` shaped like `x`.
    - `x`: one data example, any shape.
    - `cond`: its condition, any pytree.
    - `key`: a JAX PRNG key, split here into noise, time and dropout keys.
    - `null_cond`: the unconditional condition (the null class `num_classes`, an empty
        text embedding...): a pytree of the structure of `cond`, leaves of the same shape
        and dtype (Python scalar leaves are cast). Required when `drop_prob > 0`.
    - `drop_prob`: the probability of training this example unconditionally (0.1 in
        the reference).
    - `shift`: the time shift of the training times.

    **Returns:**

    A float32 scalar.

    **Example:**

    ```python
    def batch_loss(model, xs, ys, key):
        keys = jax.random.split(key, xs.shape[0])
        loss = lambda x, y, k: flow_matching_loss(
            model, x, y, key=k, null_cond=10, drop_prob=0.1
        )
        return jnp.mean(jax.vmap(loss)(xs, ys, keys))
    ```
    """
    _check_floating("x", x)
    _check_shift(shift)
    drop = _concrete_float(drop_prob)
    if drop is not None and not 0.0 <= drop <= 1.0:
        raise ValueError(f"`drop_prob` must lie in [0, 1], got drop_prob={drop_prob!r}.")
    if null_cond is None and drop != 0.0:
        raise ValueError(f"`drop_prob`={drop_prob!r} drops conditions, so `null_cond` is required; got null_cond=None.")
    pair = _pair_conditions(cond, null_cond) if null_cond is not None and drop != 0.0 else None
    eps_key, t_key, drop_key = jax.random.split(key, 3)
    eps = jax.random.normal(eps_key, x.shape, dtype=x.dtype)
    t = sample_training_time(t_key, shift)
    if pair is not None:
        dropped = jax.random.bernoulli(drop_key, jnp.asarray(drop_prob, dtype=jnp.float32))
        cond = jtu.tree_map(lambda c, n: jnp.where(dropped, n, c), *pair)
    return flow_matching_loss_at(velocity_fn, x, cond, eps, t)


def _method_solver(method: str, exact: bool, solver: Any) -> Any:
    """The solver object of `flow.sample`'s `method`/`exact` strings, or `solver` as given."""
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got method={method!r}.")
    if exact and method != "heun":
        raise ValueError(f"`exact=True` applies to method='heun' only, got method={method!r}.")
    if solver is None:
        return {"euler": Euler(), "flowdpm": FlowDPM(), "heun": Heun(exact=bool(exact))}[method]
    if not (isinstance(solver, AbstractSolver) or _is_diffrax_solver(solver)):
        raise ValueError(
            f"`solver` must be a flow.Euler, flow.Heun, flow.FlowDPM or a diffrax solver, got {type(solver).__name__}."
        )
    if method != "heun" or exact:
        raise ValueError(
            f"give the solver either as `solver` or as `method`/`exact`: expected the defaults method='heun', "
            f"exact=False with solver={type(solver).__name__}, got method={method!r}, exact={exact!r}."
        )
    return solver


def _is_diffrax_solver(solver: Any) -> bool:
    return type(solver).__module__.split(".")[0] == "diffrax"


def sample(
    velocity_fn: VelocityFn,
    noise: Float[Array, "*shape"],
    cond: PyTree,
    *,
    num_steps: int,
    method: str = "heun",
    guidance: Real[ArrayLike, ""] = 1.0,
    null_cond: PyTree | None = None,
    guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
    shift: Real[ArrayLike, ""] = 1.0,
    exact: bool = False,
    return_trajectory: bool = False,
    solver: Any = None,
    progress: bool = False,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, " {num_steps+1} *shape"]]:
    """Integrates the flow ODE from noise (`t = 0`) to a sample (`t = 1`) for one example.

    The ODE is [`ProbabilityFlow`][] (the velocity, guided with `null_cond`); the steps are
    those of the grid [`sampling_times`][pixeldit_eqx.flow.sampling_times], `dt = t_{k+1} - t_k`, taken by a solver
    ([`integrate`][], one `jax.lax.scan`). `method` names the reference's three:

    - `"euler"` ([`Euler`][]): `x += dt v(x, t_k)`.
    - `"flowdpm"` ([`FlowDPM`][]): Euler for the first step, then the two-step
        Adams-Bashforth update `x += dt (1.5 v(x, t_k) - 0.5 v_prev)`.
    - `"heun"` ([`Heun`][]): predictor `x_hat = x + dt v`, corrector
        `x += dt (v + v(x_hat, t_{k+1})) / 2`; the last step is a plain Euler step. Unless
        `exact`, a step does not evaluate the velocity at its own start: it reuses the
        corrector velocity `v(x_hat, t_k)` of the previous step, so `N` steps cost `N`
        evaluations (`exact=True`: `2N - 1`).

    `solver` takes such an object instead (`flow.Heun(exact=True)`, say), or any diffrax
    solver (`diffrax.Tsit5()`, ...), which then steps on the same grid through
    [`sample_ode`][] (`diffrax.Euler()` gives `method="euler"` to round-off).

    Classifier-free guidance ([`Guided`][]): with `null_cond`, every evaluation computes
    `v = v_u + w (v_c - v_u)`, `v_c` under `cond`, `v_u` under `null_cond` (the two in one
    `jax.vmap`-batched call of `velocity_fn`), with `w = guidance` when
    `t_min < t < t_max` (strictly, for the time `t` of that evaluation, which for Heun's
    corrector is the step's end time) and `w = 1` otherwise. Without `null_cond`
    (`guidance` must then be 1) only the conditional velocity is computed.

    The function can be jitted and vmapped.

    Reference: `EulerSampler`, `FlowDPMSolverSampler`, `HeunSampler` (with
    `exact_henu`) and `simple_guidance_fn` in `c2i/src/diffusion.py`, ODE step
    functions, default `last_step`. Deviations: one example per call; the time passed to
    `velocity_fn` is float32 and the state stays in the dtype of `noise`.

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, `v` shaped like `x`.
    - `noise`: the starting point, one example of any shape, typically `N(0, I)`.
    - `cond`: its condition, any pytree.
    - `num_steps`: the number of integration steps, >= 1 (a Python int).
    - `method`: `"heun"` (the reference default), `"euler"` or `"flowdpm"`.
    - `guidance`: the guidance scale `w`; 1.0 is no guidance.
    - `null_cond`: the unconditional condition (the null class label `num_classes`, say),
        of the structure, leaf shapes and dtypes of `cond` (Python scalar leaves are
        cast). Required when `guidance != 1`.
    - `guidance_interval`: `(t_min, t_max)`, guidance applies where `t_min < t < t_max`.
        Released PixelDiT-XL: `(0.1, 0.9)` at 256px, `(0.1, 1.0)` at 512px.
    - `shift`: the time shift of the grid (see [`sampling_times`][pixeldit_eqx.flow.sampling_times]).
    - `exact`: Heun only: evaluate the velocity afresh at the start of every step.
    - `return_trajectory`: also return every state.
    - `solver`: a solver object instead of `method`/`exact`: an [`AbstractSolver`][] or a
        diffrax solver (diffrax: no `return_trajectory`, no `progress`).
    - `progress`: show a tqdm bar over the steps, from inside the compiled scan (under
        `jax.jit` and `jax.vmap` too: one bar per solve, not per example). Needs tqdm
        (the `train` extra).

    **Returns:**

    The sample, shaped like `noise`; with `return_trajectory=True`, `(sample,
    trajectory)` with `trajectory` of shape `(num_steps + 1, *noise.shape)`:
    `trajectory[0]` is `noise`, `trajectory[k]` the state after step `k`.

    **Example:**

    ```python
    noise = jax.random.normal(key, (8, 3, 256, 256))
    labels = jnp.arange(8)
    run = lambda n, y: sample(
        model, n, y, num_steps=100, guidance=2.75, null_cond=1000,
        guidance_interval=(0.1, 0.9),
    )
    images = eqx.filter_jit(jax.vmap(run))(noise, labels)
    ```
    """
    _check_floating("noise", noise)
    solver = _method_solver(method, exact, solver)
    num_steps = check_int("num_steps", num_steps, 1)
    _check_shift(shift)
    guide: dict[str, Any] = dict(guidance=guidance, null_cond=null_cond, guidance_interval=guidance_interval)
    if _is_diffrax_solver(solver):
        if return_trajectory or progress:
            raise ValueError(
                "`solver`: a diffrax solver returns the sample only: expected return_trajectory=False and "
                f"progress=False, got return_trajectory={return_trajectory!r}, progress={progress!r}."
            )
        return sample_ode(velocity_fn, noise, cond, solver=solver, num_steps=num_steps, shift=shift, **guide)
    ode = ProbabilityFlow(velocity_fn, cond, **guide)
    times = sampling_times(num_steps, shift)
    return integrate(ode, noise, times, solver, return_trajectory=return_trajectory, progress=progress)

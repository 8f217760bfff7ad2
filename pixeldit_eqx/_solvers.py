"""The flow ODE and its fixed-grid solvers: one velocity definition, small solver modules, one scan.

The ODE is `dx/dt = v(x, t)` with `t = 0` noise and `t = 1` data. [`ProbabilityFlow`][] builds
`v` from a per-example `velocity_fn(x, t, cond)` (with [`Guided`][] around it for
classifier-free guidance); [`integrate`][] walks a time grid with a solver, one `jax.lax.scan`
over `solver.step`. The solvers follow diffrax's shape (`diffrax/_solver/euler.py`): an
`eqx.Module` with `init` (the solver state) and `step` (one step from `t0` to `t1`), here on a
plain velocity `v(x, t)` and with the reference's step rules.

Reference: `EulerSampler`, `HeunSampler`, `FlowDPMSolverSampler` and `simple_guidance_fn` in
`c2i/src/diffusion.py`.
"""

import abc
import math
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._checks import check_int
from ._custom_types import Array, ArrayLike, Bool, Float, Real
from ._linspace import torch_linspace


_State = TypeVar("_State")


def _concrete_float(value: Any) -> float | None:
    """The value as a Python float if it is known at trace time, else `None`."""
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):  # tracers raise TypeError subclasses
        return None


def _check_floating(name: str, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = f"dtype {dtype}" if dtype is not None else type(x).__name__
        raise ValueError(f"`{name}` must be a floating-point array, got {got}.")


def _check_velocity(v: Any, x: Array) -> Array:
    if not hasattr(v, "shape") or v.shape != x.shape:
        raise ValueError(
            "`velocity_fn` must return an array shaped like `x`: expected "
            f"{x.shape}, got {getattr(v, 'shape', type(v))}."
        )
    return v


def _check_guidance(guidance: Any, guidance_interval: Any) -> tuple[float, float]:
    """Checks a guidance scale (a scalar) and interval (`t_min < t_max`); returns the interval as floats."""
    if jnp.ndim(guidance) != 0:
        raise ValueError(f"`guidance` must be a scalar, got shape {jnp.shape(guidance)}.")
    if len(guidance_interval) != 2:
        raise ValueError(f"`guidance_interval` must be a pair (t_min, t_max), got {guidance_interval!r}.")
    t_min, t_max = (float(v) for v in guidance_interval)
    if math.isnan(t_min) or math.isnan(t_max) or not t_min < t_max:
        raise ValueError(f"`guidance_interval` must be (t_min, t_max) with t_min < t_max, got {guidance_interval!r}.")
    return t_min, t_max


def _pair_conditions(cond: PyTree, null_cond: PyTree) -> tuple[PyTree, PyTree]:
    """Both conditions as arrays, leaf by leaf of the same shape and dtype.

    A Python scalar leaf of `null_cond` (the null label `10`, say) takes the dtype of the
    matching `cond` leaf; any other mismatch is an error.
    """
    cond_leaves, cond_def = jtu.tree_flatten(cond)
    null_leaves, null_def = jtu.tree_flatten(null_cond)
    if cond_def != null_def:
        raise ValueError(f"`null_cond` must have the pytree structure of `cond`: expected {cond_def}, got {null_def}.")
    conds, nulls = [], []
    for i, (c, n) in enumerate(zip(cond_leaves, null_leaves)):
        c_arr = jnp.asarray(c)
        n_arr = jnp.asarray(n)
        if n_arr.dtype != c_arr.dtype and isinstance(n, bool | int | float | complex):
            n_arr = n_arr.astype(c_arr.dtype)
        if n_arr.shape != c_arr.shape or n_arr.dtype != c_arr.dtype:
            raise ValueError(
                f"leaf {i} of `null_cond` must match `cond` in shape and dtype: "
                f"expected {c_arr.shape} {c_arr.dtype}, got {n_arr.shape} {n_arr.dtype}."
            )
        conds.append(c_arr)
        nulls.append(n_arr)
    return jtu.tree_unflatten(cond_def, conds), jtu.tree_unflatten(cond_def, nulls)


# ---------------------------------------------------------------------------------------
# The time grid
# ---------------------------------------------------------------------------------------


def _check_shift(shift: Any) -> None:
    value = _concrete_float(shift)
    if value is not None and not value > 0:
        raise ValueError(f"`shift` must be > 0, got shift={shift!r}.")


def time_shift(t: Float[ArrayLike, "*shape"], shift: Real[ArrayLike, ""]) -> Float[Array, "*shape"]:
    """The resolution-dependent time shift `t / (t + (1 - t) * shift)`.

    A shift above 1 moves times towards 0 (more steps near the noise end), as larger
    images need. It fixes 0 and 1.

    Reference: `shift_respace_fn` / `time_shift_fn` in `c2i/src/diffusion.py`.

    **Arguments:**

    - `t`: times in [0, 1], any shape.
    - `shift`: the shift, > 0; 1.0 is the identity.

    **Returns:**

    The shifted times, shaped and typed like `t`.
    """
    t = jnp.asarray(t)
    shift = jnp.asarray(shift, dtype=t.dtype)
    return t / (t + (1 - t) * shift)


def sampling_times(num_steps: int, shift: Real[ArrayLike, ""] = 1.0) -> Float[Array, " {num_steps+1}"]:
    """The time grid of the samplers: `num_steps + 1` float32 times from 0 to 1.

    `linspace(0, 1 - 1/N, N)`, then 1.0, then [`time_shift`][pixeldit_eqx.flow.time_shift] (which keeps 0 and 1),
    all in float32. The linspace is computed the way PyTorch's CPU kernel computes it
    (from the start for the first half, from the end for the second) so that the grid
    equals the reference's bit for bit (for grids of up to 15 points, where that
    kernel does not vectorise; beyond, within an ulp).

    Reference: `EulerSampler.__init__` (and `HeunSampler`, `FlowDPMSolverSampler`) in
    `c2i/src/diffusion.py`, with the default `last_step = 1 / num_steps`.

    **Arguments:**

    - `num_steps`: the number of integration steps `N >= 1`.
    - `shift`: the time shift, > 0; released PixelDiT-XL uses 1.0 at 256px and 2.0 at
        512px.

    **Returns:**

    A float32 array of shape `(num_steps + 1,)`, increasing from 0.0 to 1.0.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    _check_shift(shift)
    grid = torch_linspace(0.0, 1.0 - 1.0 / num_steps, num_steps)
    grid = jnp.concatenate([grid, jnp.ones((1,), dtype=jnp.float32)])
    return time_shift(grid, shift)


# ---------------------------------------------------------------------------------------
# The velocity
# ---------------------------------------------------------------------------------------


class Guided(eqx.Module):
    """Classifier-free guidance around a velocity function: `v_u + w (v_c - v_u)`.

    Called like the velocity function it wraps, `guided(x, t, cond)`: `v_c` under `cond`, `v_u`
    under `null_cond`, the two in one `jax.vmap`-batched call (the unconditional first, as the
    reference concatenates them), `w = scale` where `t_min < t < t_max` (strictly) and 1
    elsewhere. Both branches are evaluated even when `scale` is 1.

    Reference: `simple_guidance_fn` in `c2i/src/diffusion.py`.

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v` for one example (a `PixelDiT`, say).
    - `null_cond`: the unconditional condition (the null class `num_classes`, say), of the
        structure, leaf shapes and dtypes of the conditions it will be called with (Python
        scalar leaves are cast).
    - `scale`: the guidance scale `w`, a scalar.
    - `interval`: `(t_min, t_max)`, `t_min < t_max`.
    """

    velocity_fn: Any
    null_cond: PyTree
    scale: Float[Array, ""]
    interval: tuple[float, float] = eqx.field(static=True)

    def __init__(
        self,
        velocity_fn: Any,
        null_cond: PyTree,
        scale: Real[ArrayLike, ""],
        interval: tuple[float | int, float | int] = (0.0, 1.0),
    ):
        if not callable(velocity_fn):
            raise ValueError(f"`velocity_fn` must be callable, got {type(velocity_fn).__name__}.")
        self.interval = _check_guidance(scale, interval)
        self.velocity_fn = velocity_fn
        self.null_cond = null_cond
        self.scale = jnp.asarray(scale, dtype=jnp.float32)

    def __call__(self, x: Float[Array, "*shape"], t: Real[ArrayLike, ""], cond: PyTree) -> Float[Array, "*shape"]:
        """The guided velocity at `x`, time `t`, under `cond`, in the dtype `velocity_fn` returns."""
        cond, null = _pair_conditions(cond, self.null_cond)
        pair = jtu.tree_map(lambda n, c: jnp.stack([n, c]), null, cond)
        both = jax.vmap(self.velocity_fn, in_axes=(None, None, 0))(x, t, pair)
        v_u, v_c = both[0], both[1]
        _check_velocity(v_c, x)
        t_min, t_max = self.interval
        inside = (jnp.float32(t_min) < t) & (t < jnp.float32(t_max))
        w = jnp.where(inside, self.scale, jnp.float32(1.0)).astype(v_c.dtype)
        return v_u + w * (v_c - v_u)


class ProbabilityFlow(eqx.Module):
    """The velocity of the flow ODE `dx/dt = v(x, t)`, `t = 0` noise, `t = 1` data.

    `velocity_fn(x, t, cond)`, or with `null_cond` the [`Guided`][] velocity, at the time
    `t` as a float32 scalar and cast to the dtype of `x`. This is the one ODE that
    `flow.sample` (with the solvers of this module), `flow.sample_ode` and
    `flow.log_likelihood` (with diffrax) solve. `velocity_fn` (an `eqx.Module` such as
    `PixelDiT`) and the conditions are fields, so that gradients reach them through any
    diffrax adjoint.

    **Arguments:**

    - `velocity_fn`: `velocity_fn(x, t, cond) -> v`, `v` shaped like `x`.
    - `cond`: the condition, any pytree.
    - `guidance`, `null_cond`, `guidance_interval`: classifier-free guidance (see
        [`Guided`][]); without `null_cond`, `guidance` must be 1.
    """

    velocity: Any
    cond: PyTree

    def __init__(
        self,
        velocity_fn: Any,
        cond: PyTree,
        *,
        guidance: Real[ArrayLike, ""] = 1.0,
        null_cond: PyTree | None = None,
        guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
    ):
        if not callable(velocity_fn):
            raise ValueError(f"`velocity_fn` must be callable, got {type(velocity_fn).__name__}.")
        _check_guidance(guidance, guidance_interval)
        if null_cond is None:
            if _concrete_float(guidance) != 1.0:
                raise ValueError(
                    f"`guidance`={guidance!r} needs the unconditional condition: expected null_cond "
                    "to be given (or guidance=1.0), got null_cond=None."
                )
        else:
            cond, null_cond = _pair_conditions(cond, null_cond)
            velocity_fn = Guided(velocity_fn, null_cond, guidance, guidance_interval)
        self.velocity = velocity_fn
        self.cond = cond

    def __call__(self, x: Float[Array, "*shape"], t: Real[ArrayLike, ""]) -> Float[Array, "*shape"]:
        """The velocity at `x`, time `t`, in the dtype of `x`."""
        t = jnp.asarray(t, dtype=jnp.float32)
        v = _check_velocity(self.velocity(x, t, self.cond), x)
        return v.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------


class AbstractSolver(eqx.Module, Generic[_State]):
    """A fixed-step solver of `dx/dt = velocity(x, t)`: `init` makes its state, `step` takes one step.

    ```python
    state = solver.init(velocity, t[0], t[1], y)
    for k in range(len(t) - 1):
        y, state = solver.step(velocity, t[k], t[k + 1], y, state)
    ```

    `velocity(x, t)` takes one example and a float32 scalar time and returns an array shaped
    and typed like `x` (a [`ProbabilityFlow`][], say). The time step is cast to the dtype of `y`.
    """

    @abc.abstractmethod
    def init(self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array) -> _State:
        """The solver state before the first step, from `t0` to `t1` at `y0`."""

    @abc.abstractmethod
    def step(
        self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array, state: _State
    ) -> tuple[Array, _State]:
        """One step from `t0` to `t1`: `(y1, state)`."""

    def settled(self, y0: Array, state: _State) -> Array:
        """The solution at the start `t0` of the step that returned `state` from `y0`: `y0` itself,
        except for a solver that corrects its input on the next step ([`Heun`][])."""
        del state
        return y0


class Euler(AbstractSolver[None]):
    """Euler's method: `y1 = y0 + v(y0, t0) dt`. One evaluation a step.

    Reference: `EulerSampler` in `c2i/src/diffusion.py`.
    """

    def init(self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array) -> None:
        return None

    def step(
        self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array, state: None
    ) -> tuple[Array, None]:
        dt = (jnp.asarray(t1) - t0).astype(y0.dtype)
        return y0 + velocity(y0, t0) * dt, None


class FlowDPM(AbstractSolver[tuple[Array, Bool[Array, ""]]]):
    """The two-step Adams-Bashforth method of the reference's FlowDPM solver.

    Euler on the first step, then `y1 = y0 + dt (1.5 v(y0, t0) - 0.5 v_prev)`, `v_prev` the
    velocity of the previous step (the state). One evaluation a step.

    Reference: `FlowDPMSolverSampler` in `c2i/src/diffusion.py`.
    """

    def init(
        self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array
    ) -> tuple[Array, Bool[Array, ""]]:
        return jnp.zeros_like(y0), jnp.asarray(True)

    def step(
        self,
        velocity: Any,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""],
        y0: Array,
        state: tuple[Array, Bool[Array, ""]],
    ) -> tuple[Array, tuple[Array, Bool[Array, ""]]]:
        v_prev, first = state
        dt = (jnp.asarray(t1) - t0).astype(y0.dtype)
        v = velocity(y0, t0)
        y1 = jnp.where(first, y0 + v * dt, y0 + dt * (1.5 * v - 0.5 * v_prev))
        return y1, (v, jnp.asarray(False))


#: Heun's state: the corrected start of the last step, its velocity, its step and whether no
#: step was taken yet.
HeunState = tuple[Array, Array, Array, Bool[Array, ""]]


class Heun(AbstractSolver[HeunState]):
    """Heun's method as the reference runs it: predictor, then trapezoidal corrector; the last
    step of a solve is a plain Euler step.

    The corrector of a step is applied at the start of the next one: a step returns the Euler
    predictor `y1 = x + v(x, t0) dt` of its (corrected) start `x`, and the next step, at
    `t1`, first corrects `x + (v(x, t0) + v(y1, t1)) dt / 2`. So the last step's predictor is
    the solution, and between steps `y` is the predictor; [`settled`][pixeldit_eqx.flow.Heun.settled]
    gives the corrected start of the step just taken.

    Unless `exact`, the corrector's velocity `v(y1, t1)` also starts the next step (the
    reference's default, `N` evaluations for `N` steps); `exact=True` evaluates the velocity
    afresh at the corrected start (`exact_henu`, `2N - 1` evaluations).

    Reference: `HeunSampler` (with `exact_henu`) in `c2i/src/diffusion.py`.

    **Arguments:**

    - `exact`: evaluate the velocity afresh at the start of every step.
    """

    exact: bool = eqx.field(default=False, static=True)

    def init(self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array) -> HeunState:
        return jnp.zeros_like(y0), jnp.zeros_like(y0), jnp.zeros((), y0.dtype), jnp.asarray(True)

    def step(
        self, velocity: Any, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], y0: Array, state: HeunState
    ) -> tuple[Array, HeunState]:
        x_prev, v_prev, dt_prev, first = state
        if self.exact:

            def corrected() -> Array:
                return x_prev + ((v_prev + velocity(y0, t0)) / 2) * dt_prev

            x = jax.lax.cond(first, lambda: y0, corrected)
            v = velocity(x, t0)
        else:
            v = velocity(y0, t0)
            x = jnp.where(first, y0, x_prev + ((v_prev + v) / 2) * dt_prev)
        dt = (jnp.asarray(t1) - t0).astype(y0.dtype)
        return x + v * dt, (x, v, dt, jnp.asarray(False))

    def settled(self, y0: Array, state: HeunState) -> Array:
        """The corrected start of the step that returned `state`."""
        return state[0]


# ---------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar over the steps of a solve, advanced from `jax.debug.callback`: the step index
    sets its position, so repeated calls (one per device of a sharded solve) count once."""

    def __init__(self, total: int):
        self.total = total
        self.bar: Any = None

    def __call__(self, k: Any) -> None:
        done = int(k) + 1
        if self.bar is None:
            if done != 1:  # a repeated report of a finished solve
                return
            tqdm = _tqdm()
            self.bar = tqdm(total=self.total, desc="sampling", unit="step")
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if done == self.total:
            self.bar.close()
            self.bar = None


def _tqdm() -> Any:
    from ._optional import require

    return require("tqdm", "train", "pixeldit_eqx.flow.sample(progress=True)").tqdm


def integrate(
    velocity: Any,
    y0: Float[Array, "*shape"],
    times: Float[Array, " n"],
    solver: AbstractSolver,
    *,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, " n *shape"]]:
    """Solves `dx/dt = velocity(x, t)` from `times[0]` to `times[-1]` with `solver`, one step per
    interval of the grid, in one `jax.lax.scan` over `solver.step`.

    Works under `jax.jit` and `jax.vmap` (the grid and the step index are not batched).

    **Arguments:**

    - `velocity`: `velocity(x, t) -> v` for one example (a [`ProbabilityFlow`][], say).
    - `y0`: the state at `times[0]`.
    - `times`: the grid, float32, at least two times.
    - `solver`: an [`Euler`][], [`Heun`][] or [`FlowDPM`][] (any [`AbstractSolver`][]).
    - `return_trajectory`: also return the solution at every time of the grid.
    - `progress`: show a tqdm bar over the steps (`jax.debug.callback`; needs `tqdm`).

    **Returns:**

    The state at `times[-1]`; with `return_trajectory=True`, `(y1, trajectory)`,
    `trajectory[0] = y0`, `trajectory[-1] = y1`.
    """
    if not isinstance(solver, AbstractSolver):
        raise ValueError(f"`solver` must be a flow.Euler, flow.Heun or flow.FlowDPM, got {type(solver).__name__}.")
    num_steps = times.shape[0] - 1
    if progress:
        _tqdm()  # fail now, not inside the compiled program
    report = _ProgressBar(num_steps) if progress else None

    def body(carry: Any, inputs: Any) -> tuple[Any, Array | None]:
        y, state = carry
        k, t0, t1 = inputs
        y1, state = solver.step(velocity, t0, t1, y, state)
        if report is not None:
            jax.debug.callback(report, k)
        return (y1, state), (solver.settled(y, state) if return_trajectory else None)

    init = (y0, solver.init(velocity, times[0], times[1], y0))
    (y, _), settled = jax.lax.scan(body, init, (jnp.arange(num_steps), times[:-1], times[1:]))
    if settled is None:
        return y
    return y, jnp.concatenate([settled, y[None]])

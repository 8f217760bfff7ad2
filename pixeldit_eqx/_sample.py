"""`sample`: one call that samples any model of the family with its own conventions."""

from typing import Any

import jax.numpy as jnp

from ._custom_types import Array, ArrayLike, Float, Real
from ._grounded import grounded_solver, GroundedVelocity, PixelDiT2REPA, sampling_times, XPredFn, XPrediction
from ._model import PixelDiT, PixelDiTT2I
from ._pixeldit2 import PixelDiT2
from ._solvers import _check_floating, integrate
from .flow import sample as flow_sample


def sample(
    model: Any,
    noise: Float[Array, "C H W"],
    y: Any,
    *,
    num_steps: int,
    method: str = "heun",
    solver: Any = None,
    guidance: Real[ArrayLike, ""] = 1.0,
    guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
    shift: Real[ArrayLike, ""] = 1.0,
    noise_scale: Real[ArrayLike, ""] = 1.0,
    t_eps: Real[ArrayLike, ""] = 0.05,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Float[Array, "C H W"] | tuple[Float[Array, "C H W"], Float[Array, " {num_steps+1} C H W"]]:
    """Samples one image from noise with the model's own conventions.

    - `PixelDiT2` (or a `train.PixelDiT2REPA`, whose network is used): the reference's
        `GroundedEulerSampler` / `GroundedHeunSampler`: x-prediction turned into the velocity
        `(x_pred - x) / max(1 - t, t_eps)`; the unconditional branch is the null label
        `model.num_classes` *and* no grounding; guidance `w` where `t < t_max` and
        `t > t_min` (every `t` when `t_min == 0`); `"heun"` is exact Heun (two
        evaluations a step) with the last step Euler; `"euler"`. The grid is
        `linspace(0, 1, num_steps + 1)` (`shift != 1` time-shifts it, an extension).
    - `PixelDiT`: `pixeldit_eqx.flow.sample` with the null class `model.num_classes`
        (guidance strictly inside the interval; `"heun"` reuses the corrector velocity;
        `"flowdpm"` too); `t_eps` does not apply.
    - `PixelDiTT2I`: the same, `y = (text (T, txt), text_mask (T,) or None)`, the null
        condition the all-zeros text with an all-True mask (as `train.t2i_loss` drops
        captions).

    With every family the start is `noise * noise_scale`.

    **Arguments:**

    - `model`: a `PixelDiT2`, `PixelDiT` or `PixelDiTT2I`.
    - `noise`: `(C, H, W)`, typically `N(0, I)`.
    - `y`: the class label (or the text pair for `PixelDiTT2I`).
    - `num_steps`: integration steps, >= 1.
    - `method`: `"heun"` or `"euler"` (`"flowdpm"` for PixelDiT / PixelDiTT2I).
    - `solver`: a solver object instead of `method` (`pixeldit_eqx.flow.Heun()`, say; for
        PixelDiT / PixelDiTT2I also a diffrax solver, see `flow.sample`).
    - `guidance`: the classifier-free guidance scale; 1.0 is none.
    - `guidance_interval`: `(t_min, t_max)`.
    - `shift`: the time shift of the grid.
    - `noise_scale`: the start is `noise * noise_scale`.
    - `t_eps`: PixelDiT2's floor of `1 - t` in the velocity.
    - `return_trajectory`: also return every state.
    - `progress`: show a tqdm bar over the steps (see `flow.sample`).

    **Returns:**

    The image; with `return_trajectory=True`, `(image, trajectory)` with `trajectory` of
    shape `(num_steps + 1, C, H, W)`, `trajectory[0] = noise * noise_scale`.

    **Example:**

    ```python
    run = lambda n, y: pixeldit_eqx.sample(model, n, y, num_steps=50, guidance=2.4,
                                           guidance_interval=(0.125, 0.9))
    images = eqx.filter_jit(jax.vmap(run))(noise, labels)
    ```
    """
    if isinstance(model, PixelDiT2REPA):
        model = model.model
    _check_floating("noise", noise)
    if not isinstance(model, XPrediction) and noise.ndim != 3:
        raise ValueError(f"`noise`: expected one image (C, H, W), got shape {noise.shape}.")
    if isinstance(model, PixelDiT2 | XPrediction):
        solver = grounded_solver(method, solver)
        velocity = GroundedVelocity(model, y, guidance=guidance, guidance_interval=guidance_interval, t_eps=t_eps)
        start = noise * jnp.asarray(noise_scale, dtype=noise.dtype)
        times = sampling_times(num_steps, shift)
        return integrate(velocity, start, times, solver, return_trajectory=return_trajectory, progress=progress)
    options: dict[str, Any] = dict(
        num_steps=num_steps,
        method=method,
        solver=solver,
        guidance=guidance,
        guidance_interval=guidance_interval,
        shift=shift,
        return_trajectory=return_trajectory,
        progress=progress,
    )
    if isinstance(model, PixelDiT | PixelDiTT2I):
        start = noise * jnp.asarray(noise_scale, dtype=noise.dtype)
        if isinstance(model, PixelDiT):
            return flow_sample(model, start, y, null_cond=model.num_classes, **options)
        if not isinstance(y, tuple | list) or len(y) != 2:
            raise ValueError(f"`y`: expected (text, text_mask) for a PixelDiTT2I, got {type(y).__name__}.")
        text, mask = y
        mask = jnp.ones(text.shape[:1], dtype=bool) if mask is None else jnp.asarray(mask, dtype=bool)
        null = (jnp.zeros_like(text), jnp.ones(text.shape[:1], dtype=bool))

        def text_velocity(x: Array, t: Array, cond: Any) -> Array:
            return model(x, t, cond[0], cond[1])

        return flow_sample(text_velocity, start, (text, mask), null_cond=null, **options)
    raise ValueError(f"`model`: expected a PixelDiT2, PixelDiT or PixelDiTT2I, got {type(model).__name__}.")


def grounded_sample(
    x_pred_fn: XPredFn, noise: Float[Array, "*shape"], y: Any, null_label: Any, **options: Any
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, " N *shape"]]:
    """Samples one example of any shape with PixelDiT2's guided ODE, from `t = 0` (noise) to `t = 1`.

    [`pixeldit_eqx.sample`][] (its keywords: `num_steps`, `method`, `guidance`, ...) on an
    x-prediction function: `x_0 = noise * noise_scale`; on [`sampling_times`][], steps
    `0 .. N-2` are Euler (`x + dt v(x, t)`) or exact Heun (`v = v(x, t)`,
    `v' = v(x + dt v, t')`, `x + dt (v + v') / 2`), the last step is always Euler
    ([`grounded_solver`][] over `flow.integrate`'s scan), on the velocity [`GroundedVelocity`][].

    Reference: `GroundedSampler`, `GroundedEulerSampler`, `GroundedHeunSampler`. Deviation:
    one example per call; `shift` (1.0 = none), `solver` and `progress` are extensions.
    """
    return sample(XPrediction(x_pred_fn, null_label), noise, y, **options)

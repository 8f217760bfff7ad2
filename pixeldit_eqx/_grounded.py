"""PixelDiT2's flow matching: x-prediction, grounding dropout, REPA and the grounded samplers.

PixelDiT2 predicts the clean image: its velocity is `(x_pred - x) / max(1 - t, t_eps)`. The
unconditional branch of guidance (and of dropout in training) is the null label *and* no
grounding. Everything here works one example at a time on any x-prediction function

```python
x_pred_fn(x, t, y, skip_grounding) -> x_pred
```

(a `PixelDiT2` is adapted by [`pixeldit_eqx.sample`][] and the losses of
`pixeldit_eqx.train`).

Reference: `c2i/src/grounded_diffusion.py` (`GroundedFlowTrainer`, `GroundedSampler`,
`GroundedEulerSampler`, `GroundedHeunSampler`, `REPATeacher`).
"""

from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ._checks import check_int
from ._custom_types import Array, ArrayLike, Bool, Float, Image, Int, LabelLike, Real, TimeLike
from ._dinov2 import DINOv2
from ._linspace import torch_linspace
from ._resize import resize_bicubic
from ._solvers import _check_guidance, AbstractSolver, Euler, Heun, time_shift


#: `x_pred_fn(x, t, y, skip_grounding) -> x_pred`, `x_pred` shaped like `x`.
XPredFn: TypeAlias = Callable[[Array, Array, Any, Any], Array]

_METHODS = ("heun", "euler")
_DROP_MODES = ("independent", "coupled")


def _concrete(value: Any) -> float | None:
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):  # a tracer
        return None


def _check_t_eps(t_eps: Any) -> None:
    value = _concrete(t_eps)
    if value is not None and not value > 0:
        raise ValueError(f"`t_eps` must be > 0, got t_eps={t_eps!r}.")


def x_to_velocity(
    x_pred: Float[Array, "*shape"],
    x: Float[Array, "*shape"],
    t: Real[ArrayLike, ""],
    t_eps: Real[ArrayLike, ""] = 0.05,
) -> Float[Array, "*shape"]:
    """The velocity of an x-prediction: `(x_pred - x) / max(1 - t, t_eps)`.

    Reference: `GroundedSampler.velocity` and `GroundedFlowTrainer._impl_trainstep`
    (`scale = (1 - t).clamp_min(t_eps)`, in the dtype of `x`).
    """
    t = jnp.asarray(t, dtype=x.dtype)
    scale = jnp.maximum(1 - t, jnp.asarray(t_eps, dtype=x.dtype))
    return (x_pred - x) / scale


def guidance_weight(
    t: Float[ArrayLike, "*shape"],
    guidance: Real[ArrayLike, ""],
    guidance_interval: tuple[float | int, float | int],
) -> Float[Array, "*shape"]:
    """PixelDiT2's guidance weight at time `t`: `guidance` where `t < t_max` and `t > t_min`
    (any `t` when `t_min <= 0`, so `t = 0` is guided when `t_min == 0`), else 1.

    The bounds are compared in float32, as the reference compares its float32 times with
    Python floats. Reference: `GroundedSampler.velocity`.
    """
    t_min, t_max = (float(v) for v in guidance_interval)
    t = jnp.asarray(t, dtype=jnp.float32)
    inside = t < jnp.float32(t_max)
    if t_min > 0:
        inside = inside & (t > jnp.float32(t_min))
    return jnp.where(inside, jnp.asarray(guidance, dtype=jnp.float32), jnp.float32(1.0))


def sampling_times(num_steps: int, shift: Real[ArrayLike, ""] = 1.0) -> Float[Array, " {num_steps+1}"]:
    """The grounded samplers' grid: `linspace(0, 1, num_steps + 1)` in float32.

    `shift != 1` applies `pixeldit_eqx.flow.time_shift` on top (an extension: the
    reference has no shift; with the default 1.0 the grid is the reference's bit for bit).
    Reference: `GroundedSampler._impl_sampling`.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    value = _concrete(shift)
    if value is not None and not value > 0:
        raise ValueError(f"`shift` must be > 0, got shift={shift!r}.")
    grid = torch_linspace(0.0, 1.0, num_steps + 1)
    if value == 1.0:
        return grid
    return time_shift(grid, shift)


def evaluation_times(num_steps: int, method: str, shift: Real[ArrayLike, ""] = 1.0) -> Float[Array, " E"]:
    """The time of every velocity evaluation of a grounded sampler, in order.

    Euler: `t_0 .. t_{N-1}`. Heun (exact): `t_k, t_{k+1}` for the steps `k < N - 1`, then
    `t_{N-1}` for the last step, which is Euler: `2N - 1` evaluations. The samplers run on
    this schedule. Reference: `GroundedSampler._impl_sampling`.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got method={method!r}.")
    times = sampling_times(num_steps, shift)
    if method == "euler":
        return times[:-1]
    pairs = jnp.stack([times[:-2], times[1:-1]], axis=1).reshape(-1)
    return jnp.concatenate([pairs, times[-2:-1]])


class XPrediction(eqx.Module):
    """An x-prediction function `x_pred_fn(x, t, y, skip_grounding)` with its null label, called
    as a `PixelDiT2` is, so that [`pixeldit_eqx.sample`][] samples it with PixelDiT2's rules."""

    x_pred_fn: Any
    num_classes: Any  # the null label, as a PixelDiT2's `num_classes`

    def __call__(self, x: Array, t: Array, y: Any, *, skip_grounding: Any) -> Array:
        return self.x_pred_fn(x, t, y, skip_grounding)


class GroundedVelocity(eqx.Module):
    """PixelDiT2's guided velocity `v(x, t)`, the ODE its samplers solve.

    `v_u + w (v_c - v_u)`: `v_c` from `model(x, t, y, skip_grounding=False)`, `v_u` from
    `model(x, t, model.num_classes, skip_grounding=True)` (null label and no grounding), each
    through [`x_to_velocity`][], `w` from [`guidance_weight`][]. With `guidance` 1.0 (a Python
    number) only the conditional branch is evaluated. Reference: `GroundedSampler.velocity`.

    **Arguments:**

    - `model`: a `PixelDiT2` or an [`XPrediction`][].
    - `y`: the label.
    - `guidance`, `guidance_interval`: the guidance scale and `(t_min, t_max)`.
    - `t_eps`: the floor of `1 - t`.
    """

    model: Any
    y: Any
    guidance: Float[Array, ""]
    t_eps: Any
    guidance_interval: tuple[float, float] = eqx.field(static=True)
    guided: bool = eqx.field(static=True)

    def __init__(
        self,
        model: Any,
        y: Any,
        *,
        guidance: Real[ArrayLike, ""] = 1.0,
        guidance_interval: tuple[float | int, float | int] = (0.0, 1.0),
        t_eps: Real[ArrayLike, ""] = 0.05,
    ):
        self.guidance_interval = _check_guidance(guidance, guidance_interval)
        _check_t_eps(t_eps)
        self.model = model
        self.y = y
        self.guidance = jnp.asarray(guidance, dtype=jnp.float32)
        self.t_eps = t_eps
        self.guided = _concrete(guidance) != 1.0

    def __call__(self, x: Float[Array, "*shape"], t: Float[Array, ""]) -> Float[Array, "*shape"]:
        v_c = x_to_velocity(self.model(x, t, self.y, skip_grounding=False), x, t, self.t_eps)
        if not self.guided:
            return v_c
        v_u = x_to_velocity(self.model(x, t, self.model.num_classes, skip_grounding=True), x, t, self.t_eps)
        w = guidance_weight(t, self.guidance, self.guidance_interval)
        return v_u + w.astype(x.dtype) * (v_c - v_u)


def grounded_solver(method: str, solver: Any = None) -> AbstractSolver:
    """The grounded samplers' solver: `"euler"` is `flow.Euler()`, `"heun"` `flow.Heun(exact=True)`
    (`GroundedHeunSampler`: two evaluations a step, the last step Euler); `solver`, a
    `flow` solver object, instead of them (an extension)."""
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got method={method!r}.")
    if solver is None:
        return Euler() if method == "euler" else Heun(exact=True)
    if not isinstance(solver, AbstractSolver):
        raise ValueError(f"`solver` must be a flow.Euler, flow.Heun or flow.FlowDPM, got {type(solver).__name__}.")
    return solver


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class REPAProjection(eqx.Module):
    """The trainer's projection head `Linear, SiLU, Linear, SiLU, Linear` from the denoiser's
    width to the teacher's (reference keys `proj.0.*`, `proj.2.*`, `proj.4.*`).

    Reference: `GroundedFlowTrainer.proj`.
    """

    _torch_names: ClassVar[dict[str, str]] = {"linear0": "0", "linear2": "2", "linear4": "4"}

    linear0: eqx.nn.Linear
    linear2: eqx.nn.Linear
    linear4: eqx.nn.Linear

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, key: PRNGKeyArray):
        k0, k2, k4 = jr.split(key, 3)
        self.linear0 = eqx.nn.Linear(in_dim, hidden_dim, key=k0)
        self.linear2 = eqx.nn.Linear(hidden_dim, hidden_dim, key=k2)
        self.linear4 = eqx.nn.Linear(hidden_dim, out_dim, key=k4)

    def __call__(self, x: Float[Array, " D"]) -> Float[Array, " E"]:
        return self.linear4(jax.nn.silu(self.linear2(jax.nn.silu(self.linear0(x)))))


class PixelDiT2REPA(eqx.Module):
    """A PixelDiT2 trained with REPA: the network, the projection head trained with it, and
    the frozen DINOv2 teacher, in one pytree (what `pixeldit_eqx.train` optimises).

    Calling it calls the network, so it samples and trains like the bare model; the teacher
    is outside `pixeldit_eqx.trainable` (a frozen module).

    Reference: `GroundedFlowTrainer` (`repa_encoder`, `proj`, `repa_weight`,
    `repa_align_layer`) and `REPATeacher`.

    **Arguments:**

    - `model`: the `PixelDiT2`.
    - `teacher`: a [`pixeldit_eqx.DINOv2`][] (frozen by construction).
    - `align_layer`: the features after block `align_layer` (1-based, the reference's
        `repa_align_layer`) are aligned.
    - `weight`: the REPA loss weight (`repa_weight`).
    - `proj_hidden_dim`: the head's hidden width; default the model's width.
    - `key`: a PRNG key for the head.
    """

    model: Any
    proj: REPAProjection
    teacher: DINOv2
    align_layer: int = eqx.field(static=True)
    weight: float = eqx.field(static=True)

    def __init__(
        self,
        model: Any,
        teacher: DINOv2,
        *,
        align_layer: int = 8,
        weight: float = 0.5,
        proj_hidden_dim: int | None = None,
        key: PRNGKeyArray,
    ):
        if not isinstance(teacher, DINOv2):
            raise ValueError(f"`teacher` must be a pixeldit_eqx.DINOv2, got {type(teacher).__name__}.")
        depth = getattr(model, "depth", None)
        align_layer = check_int("align_layer", align_layer, 1)
        if depth is not None and align_layer > depth:
            raise ValueError(f"`align_layer` must be <= the model's depth {depth}, got align_layer={align_layer}.")
        if not weight >= 0:
            raise ValueError(f"`weight` must be >= 0, got weight={weight!r}.")
        hidden = model.hidden_size
        self.model = model
        self.teacher = teacher
        self.proj = REPAProjection(
            hidden, hidden if proj_hidden_dim is None else proj_hidden_dim, teacher.embed_dim, key=key
        )
        self.align_layer = align_layer
        self.weight = float(weight)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def __call__(
        self, x: Image, t: TimeLike, y: LabelLike, *, skip_grounding: bool | Bool[Array, ""] = False
    ) -> Float[Array, "C H W"]:
        """The network's x-prediction (see `PixelDiT2.__call__`)."""
        return self.model(x, t, y, skip_grounding=skip_grounding)

    def teacher_input(self, x: Float[Array, "C H W"]) -> Float[Array, "C h w"]:
        """The teacher's view of a clean image `x` in [-1, 1]: `(x + 1) / 2`, ImageNet-normalised,
        bicubic-resized to `int(q H / p) x int(q W / p)` (`p` the denoiser's patch, `q` the
        teacher's), float32. Reference: `REPATeacher.forward`."""
        images = (x.astype(jnp.float32) + 1.0) / 2.0
        mean = jnp.asarray(_IMAGENET_MEAN, dtype=jnp.float32)[:, None, None]
        std = jnp.asarray(_IMAGENET_STD, dtype=jnp.float32)[:, None, None]
        images = (images - mean) / std
        p, q = self.model.patch_size, self.teacher.patch_size
        return resize_bicubic(images, (int(q * x.shape[1] / p), int(q * x.shape[2] / p)))

    def teacher_features(self, x: Float[Array, "C H W"]) -> Float[Array, "L E"]:
        """The teacher's patch tokens for a clean image `x` in [-1, 1], rounded to bfloat16.

        Reference: `REPATeacher.forward` (its bf16 autocast is a CUDA-only path; here the
        teacher runs in float32 and its output is rounded to bfloat16, as the reference's
        `.to(torch.bfloat16)` does).
        """
        return jax.lax.stop_gradient(self.teacher(self.teacher_input(x))).astype(jnp.bfloat16)


def cosine_loss(src: Float[Array, "L E"], dst: Float[Array, "L E"]) -> Float[Array, ""]:
    """`mean(1 - cosine_similarity(src, dst))` over tokens, as torch computes it.

    Each input is normalised in its own dtype (`x / max(|x|, 1e-8)`): a bfloat16 `dst` has
    its norm and its normalised values rounded to bfloat16 before the float32 dot product.
    Reference: `F.cosine_similarity` in `GroundedFlowTrainer._impl_trainstep`.
    """

    def unit(v: Array) -> Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1, keepdims=True))
        norm = jnp.maximum(norm.astype(v.dtype), jnp.asarray(1e-8, dtype=v.dtype))
        return (v.astype(jnp.float32) / norm.astype(jnp.float32)).astype(v.dtype).astype(jnp.float32)

    return jnp.mean(1.0 - jnp.sum(unit(src) * unit(dst), axis=-1))


def _has_dropout(net: Any) -> bool:
    config = getattr(net, "config", None)
    return any(getattr(config, name, 0) > 0 for name in ("attn_dropout", "proj_dropout"))


def _x_pred_and_features(net: Any, x: Array, t: Array, y: Any, skip: Any, layer: int, key: Any) -> tuple[Array, Array]:
    """The x-prediction and the patch tokens after block `layer` (1-based), in-context tokens
    stripped, from one forward pass (`PixelDiT2.with_features`). Reference: the forward hook
    of `GroundedFlowTrainer._impl_trainstep` and `_strip_context_tokens`."""
    return net.with_features(x, t, y, depth=layer, skip_grounding=skip, key=key)


def pixeldit2_example_losses(
    model: Any,
    x: Float[Array, "C H W"],
    y: Int[ArrayLike, ""],
    *,
    t: Real[ArrayLike, ""],
    noise: Float[Array, "C H W"],
    drop_label: bool | Bool[ArrayLike, ""],
    drop_grounding: bool | Bool[ArrayLike, ""],
    t_eps: Real[ArrayLike, ""] = 0.05,
    key: PRNGKeyArray | None = None,
) -> dict[str, Float[Array, ""]]:
    """PixelDiT2's losses of one example at given draws: `fm_loss`, with REPA `cos_loss`,
    and `loss = fm_loss + weight * cos_loss` (see [`pixeldit2_example_loss`][])."""
    if x.ndim != 3 or noise.shape != x.shape:
        raise ValueError(f"`noise` must be shaped like `x` (C, H, W): expected {x.shape}, got {noise.shape}.")
    _check_t_eps(t_eps)
    repa = model if isinstance(model, PixelDiT2REPA) else None
    net: Any = model.model if repa is not None else model
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"`model` must be a PixelDiT2 (with `num_classes`), got {type(model).__name__}.")
    y = jnp.asarray(y)
    y = jnp.where(jnp.asarray(drop_label), jnp.asarray(num_classes, dtype=y.dtype), y)
    t = jnp.asarray(t, dtype=x.dtype)
    noise = noise.astype(x.dtype)
    x_t = t * x + (1 - t) * noise
    scale = jnp.maximum(1 - t, jnp.asarray(t_eps, dtype=x.dtype))
    skip = jnp.asarray(drop_grounding, dtype=bool)
    if not _has_dropout(net):  # without dropout, training mode is evaluation mode
        key = None
    tokens = None
    if repa is not None and repa.weight > 0:
        x_pred, tokens = _x_pred_and_features(net, x_t, t, y, skip, repa.align_layer, key)
    else:
        x_pred = net(x_t, t, y, skip_grounding=skip, key=key)
    velocity = (x - x_t) / scale
    velocity_pred = (x_pred - x_t) / scale
    fm_loss = jnp.mean(jnp.square((velocity - velocity_pred).astype(jnp.float32)))
    if repa is None or tokens is None:
        return {"fm_loss": fm_loss, "loss": fm_loss}
    src = jax.vmap(repa.proj)(tokens)
    dst = repa.teacher_features(x)
    if dst.shape[0] != src.shape[0]:
        raise ValueError(
            f"`x`: the teacher sees {dst.shape[0]} patches but the model {src.shape[0]}; expected equal grids."
        )
    cos_loss = cosine_loss(src.astype(jnp.float32), dst)
    return {"fm_loss": fm_loss, "cos_loss": cos_loss, "loss": fm_loss + jnp.float32(repa.weight) * cos_loss}


def pixeldit2_example_loss(
    model: Any, x: Float[Array, "C H W"], y: Int[ArrayLike, ""], **draws: Any
) -> Float[Array, ""]:
    """PixelDiT2's training loss of one example at given draws (the keywords of
    [`pixeldit2_example_losses`][], which checks them), `pixeldit2_example_losses(...)["loss"]`.

    `y -> null` if `drop_label`; `x_t = t x + (1 - t) noise`; `x_pred = model(x_t, t, y,
    skip_grounding=drop_grounding)`; with `s = max(1 - t, t_eps)`, the loss is the mean over
    `(C, H, W)` of `((x - x_t) / s - (x_pred - x_t) / s)**2`. For a [`PixelDiT2REPA`][], plus
    `weight * mean(1 - cos(proj(block features), teacher features))` over the tokens. The
    batch mean of this is the reference's loss.

    Reference: `GroundedFlowTrainer._impl_trainstep`.

    **Arguments:**

    - `model`: a `PixelDiT2` or a [`PixelDiT2REPA`][].
    - `x`: the clean image `(C, H, W)` in [-1, 1]; `y`: its label.
    - `t`: the time in [0, 1] (1 = clean); `noise`: the noise, already scaled by the
        trainer's `noise_scale`.
    - `drop_label`, `drop_grounding`: train this example with the null label / without
        grounding.
    - `t_eps`: the floor of `1 - t` in the velocity.
    - `key`: a PRNG key for the network's training-mode dropout (`proj_dropout`); None runs
        it as in evaluation (the same when the dropout rates are 0).

    **Returns:**

    A float32 scalar.
    """
    return pixeldit2_example_losses(model, x, y, **draws)["loss"]


def pixeldit2_dropout(
    u_class: Float[Array, " B"],
    u_grounding: Float[Array, " B"] | None,
    u_joint: Float[Array, " B"] | None,
    *,
    null_condition_p: float = 0.1,
    grounding_drop_mode: str = "independent",
    grounding_drop_p: float | None = None,
    grounding_joint_drop_p: float = 0.0,
) -> tuple[Bool[Array, " B"], Bool[Array, " B"]]:
    """The label and grounding drop masks from uniform draws.

    `class = u_class < null_condition_p`; `"coupled"`: `grounding = class`;
    `"independent"`: `grounding = u_grounding < grounding_drop_p` (default
    `null_condition_p`), and with `grounding_joint_drop_p > 0` both masks also where
    `u_joint < grounding_joint_drop_p`. Reference: `GroundedFlowTrainer.preproprocess`.
    """
    if grounding_drop_mode not in _DROP_MODES:
        raise ValueError(f"`grounding_drop_mode` must be one of {_DROP_MODES}, got {grounding_drop_mode!r}.")
    class_drop = u_class < jnp.float32(null_condition_p)
    if grounding_drop_mode == "coupled":
        return class_drop, class_drop
    p = null_condition_p if grounding_drop_p is None else grounding_drop_p
    if u_grounding is None:
        raise ValueError("`u_grounding`: expected the grounding draws in 'independent' mode, got None.")
    grounding_drop = u_grounding < jnp.float32(p)
    if grounding_joint_drop_p > 0:
        if u_joint is None:
            raise ValueError("`u_joint`: expected the joint draws when grounding_joint_drop_p > 0, got None.")
        joint = u_joint < jnp.float32(grounding_joint_drop_p)
        class_drop, grounding_drop = class_drop | joint, grounding_drop | joint
    return class_drop, grounding_drop


def pixeldit2_loss(
    model: Any,
    batch: tuple[Float[Array, "B C H W"], Int[Array, " B"]],
    key: PRNGKeyArray,
    *,
    p_mean: float = -0.8,
    p_std: float = 0.8,
    noise_scale: float = 1.0,
    t_eps: float = 0.05,
    null_condition_p: float = 0.1,
    grounding_drop_mode: str = "independent",
    grounding_drop_p: float | None = None,
    grounding_joint_drop_p: float = 0.0,
) -> Float[Array, ""]:
    """PixelDiT2's training loss of a batch, averaged over it: `loss(model, batch, key)`, the
    signature `pixeldit_eqx.train.make_train_step` takes (bind the options with
    `functools.partial`).

    Draws per example: the dropout uniforms (see [`pixeldit2_dropout`][]), a logit-normal
    time `t = sigmoid(n p_std + p_mean)`, and noise `N(0, I) * noise_scale`; then
    [`pixeldit2_example_loss`][] (with REPA when `model` is a [`PixelDiT2REPA`][]).

    Reference: `GroundedFlowTrainer` (`preproprocess`, `_impl_trainstep`; the same defaults,
    `null_condition_p` from `BaseTrainer`). Deviation: JAX's random streams, not torch's.

    **Arguments:**

    - `model`: a `PixelDiT2` or a [`PixelDiT2REPA`][].
    - `batch`: `(x, y)`: images `(B, C, H, W)` in [-1, 1] and labels `(B,)`.
    - `key`: a PRNG key.
    - `p_mean`, `p_std`: the logit-normal time law.
    - `noise_scale`: the noise's standard deviation.
    - `t_eps`: the floor of `1 - t` in the velocity.
    - `null_condition_p`: the label-dropout probability.
    - `grounding_drop_mode`: `"independent"` or `"coupled"` (grounding dropped exactly
        with the label).
    - `grounding_drop_p`: the grounding-dropout probability (independent mode); default
        `null_condition_p`.
    - `grounding_joint_drop_p`: independent mode: the probability of dropping both.

    **Returns:**

    The mean loss, a float32 scalar.
    """
    if len(batch) != 2:
        raise ValueError(f"`batch`: expected (x, y), got a sequence of length {len(batch)}.")
    x, y = batch
    if getattr(x, "ndim", None) != 4 or getattr(y, "shape", None) != x.shape[:1]:
        raise ValueError(
            f"`batch`: expected images (B, C, H, W) and labels (B,), got {getattr(x, 'shape', None)} "
            f"and {getattr(y, 'shape', None)}."
        )
    for name, value in dict(
        null_condition_p=null_condition_p,
        grounding_drop_p=grounding_drop_p,
        grounding_joint_drop_p=grounding_joint_drop_p,
    ).items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1], got {name}={value!r}.")
    if not p_std >= 0:
        raise ValueError(f"`p_std` must be >= 0, got p_std={p_std!r}.")
    b = x.shape[0]
    k_class, k_grounding, k_joint, k_t, k_noise, k_dropout = jr.split(key, 6)
    class_drop, grounding_drop = pixeldit2_dropout(
        jr.uniform(k_class, (b,)),
        jr.uniform(k_grounding, (b,)),
        jr.uniform(k_joint, (b,)),
        null_condition_p=null_condition_p,
        grounding_drop_mode=grounding_drop_mode,
        grounding_drop_p=grounding_drop_p,
        grounding_joint_drop_p=grounding_joint_drop_p,
    )
    t = jax.nn.sigmoid(jr.normal(k_t, (b,)) * jnp.float32(p_std) + jnp.float32(p_mean))
    noise = jr.normal(k_noise, x.shape, dtype=x.dtype) * jnp.asarray(noise_scale, dtype=x.dtype)

    def one(x, y, t, noise, drop_label, drop_grounding, k):
        return pixeldit2_example_loss(
            model, x, y, t=t, noise=noise, drop_label=drop_label, drop_grounding=drop_grounding, t_eps=t_eps, key=k
        )

    keys = jr.split(k_dropout, b)
    return jnp.mean(jax.vmap(one)(x, y, t, noise, class_drop, grounding_drop, keys))

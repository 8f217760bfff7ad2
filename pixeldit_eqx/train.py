"""Training: a pure train step on optax, EMA, a fit loop, checkpoints and model files.

The step is model-agnostic: it takes any batched `loss_fn(model, batch, key) -> scalar`
and any Equinox model, and optimises only the model's trainable partition
(`eqx.partition(model, pixeldit_eqx.trainable(model))`: inexact arrays, `Buffer`s left
out). [`c2i_loss`][] and [`t2i_loss`][] are the PixelDiT flow-matching losses for class-
and text-conditional batches; [`save_model`][] / [`load_model`][] write and read a
self-describing PixelDiT file.

```python
import equinox as eqx
import jax.random as jr
import pixeldit_eqx
from pixeldit_eqx import train

model = pixeldit_eqx.PixelDiT(..., num_classes=10, key=jr.key(0))
optimizer = train.default_optimizer(1e-3, warmup_steps=100)
state = train.init_train_state(model, optimizer, key=jr.key(1))
step = train.jit_steps(train.make_train_step(train.c2i_loss, optimizer), 4)
state, losses = train.fit(step, state, batches, num_steps=1000)
train.save_model("digits.eqx", state.ema)
```

The objective is the reference's rectified flow (`pixeldit_eqx.flow`: logit-normal
times, label dropout for guidance). Design choices of this module: one pure step
function with the jit boundary left to the caller ([`jit_step`][] compiles it with the
state donated, [`jit_steps`][] several steps per call); the EMA is a whole model (ready to
sample), updated every step; the optimizer runs under standard dtype promotion (optax
is not written for `jax_numpy_dtype_promotion="strict"`), the model does not.
"""

import dataclasses
import functools
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast, TYPE_CHECKING, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Real

from . import flow
from ._atomic import read_checksummed
from ._checks import check_int, check_key, is_int
from ._compat import known_compile_options
from ._grounded import (
    cosine_loss as cosine_loss,
    pixeldit2_dropout as pixeldit2_dropout,
    pixeldit2_example_loss as pixeldit2_example_loss,
    pixeldit2_example_losses as pixeldit2_example_losses,
    pixeldit2_loss as pixeldit2_loss,
    PixelDiT2REPA as PixelDiT2REPA,
    REPAProjection as REPAProjection,
)
from ._model import compiled_once
from ._model_file import (
    _open_and,
    _peek,
    _read_header as _read_header,  # the command line reads a model file's header
    _read_json_line,
    _refuse_nonfinite,
    _where,
    _write,
    load_model as load_model,
    save_model as save_model,
)
from ._optional import require
from ._torch_pickle import CheckpointFormatError
from .modules import trainable


if TYPE_CHECKING:
    import optax
else:
    optax = require("optax", "train", "pixeldit_eqx.train")


__all__ = [
    "NonFiniteTrainingError",
    "TrainState",
    "c2i_loss",
    "default_optimizer",
    "fit",
    "init_train_state",
    "jit_step",
    "jit_steps",
    "load_checkpoint",
    "load_model",
    "make_train_step",
    "save_checkpoint",
    "save_model",
    "t2i_loss",
]

#: `loss_fn(model, batch, key) -> scalar`: a loss averaged over a batch.
LossFn = Callable[[Any, Any, PRNGKeyArray], Float[Array, ""]]
_Metrics = TypeVar("_Metrics", bound=Mapping[str, Array])
# The attribute of a `make_train_step` step holding its variant for a donated state.
_IN_PLACE = "_in_place_step"

# XLA:CPU options for the programs of `jit_step` and `jit_steps`. With the fusion
# emitters on, compiling the mid model's training step holds about 600 MiB more at its
# peak (each fused kernel, above all the optimizer's and EMA's per-leaf updates, is
# emitted as its own module and kept until the compile ends); the memory-optimised
# scheduler orders the step so its temporaries take less room. Options an XLA does not
# know (jax >= 0.11 has no emitter switch) are left out.
_STEP_CPU_OPTIONS = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def _check_compiler_options(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`compiler_options` as a dict, or None for the package's (checked, not yet resolved)."""
    if options is None:
        return None
    if not isinstance(options, Mapping) or not all(isinstance(name, str) for name in options):
        raise ValueError(
            f"`compiler_options` must be None or a mapping from XLA option names to values, got {options!r}."
        )
    return dict(options)


def _step_compiler_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The options to compile a step with: `options` as given, or for `None` this
    package's for the backend (`_STEP_CPU_OPTIONS` on CPU, those this XLA knows)."""
    if options is None:
        if jax.default_backend() != "cpu":
            return None
        return known_compile_options(_STEP_CPU_OPTIONS) or None
    return options or None


class _FilterJit:
    """`eqx.filter_jit(fn)` donating every argument but the first (or none), with the
    step's compiler options; made at the first call, so that making a step does not start
    jax's backend (`jax.distributed.initialize` has to come before that)."""

    def __init__(self, fn: Callable[..., Any], donate: bool, options: dict[str, Any] | None):
        self._fn, self._donate, self._options = fn, donate, options
        self._jitted: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._jitted is None:
            # `jax.jit` keywords pass through `eqx.filter_jit`; its overloads do not spell them out.
            jit: Callable[..., Callable[..., Any]] = eqx.filter_jit
            self._jitted = jit(
                self._fn,
                donate="all-except-first" if self._donate else "none",
                compiler_options=_step_compiler_options(self._options),
            )
        return self._jitted(*args)


_CHECKPOINT_FORMAT = "pixeldit_eqx.checkpoint"
_CHECKPOINT_FORMAT_VERSION = 2


class NonFiniteTrainingError(FloatingPointError):
    """`fit` met too many consecutive steps with a non-finite loss or gradient (each skipped)."""

    #: The training state reached: the one from before the skipped steps.
    state: "TrainState"


class TrainState(eqx.Module):
    """Everything a training run carries from one step to the next.

    A pytree of arrays, so it passes through `eqx.filter_jit` whole and can be sharded.

    **Fields:**

    - `model`: the model being trained.
    - `ema`: an exponential moving average of `model`, of the same structure: its
        trainable leaves are averaged, the others are the model's. Ready to sample from.
    - `opt_state`: the optax state of the trainable partition.
    - `step`: the number of steps taken, an int32 scalar; also the data position: [`fit`][]
        with a step-indexed `batches(i)` resumes from batch `step` (skipped non-finite
        steps count too).
    - `key`: a typed PRNG key, split at every step.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_train_state(model: PyTree, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray) -> TrainState:
    """The state of a run at step 0.

    The optimizer is initialised on the trainable partition only
    (`eqx.filter(model, pixeldit_eqx.trainable(model))`), so `Buffer`s, integer arrays
    and non-array leaves are never touched by it (nor by weight decay). The EMA starts
    as a copy of `model`.

    **Arguments:**

    - `model`: any Equinox model (a `PixelDiT`, for one).
    - `optimizer`: an optax transformation, e.g. [`default_optimizer`][].
    - `key`: a PRNG key; the train step splits it every step.

    **Returns:**

    A [`TrainState`][] with `step = 0`.
    """
    key = check_key("key", key)
    optimizer = _standard_promotion(optimizer)

    def fresh(params: PyTree) -> tuple[PyTree, PyTree]:
        # A copy, not an alias: a caller may donate the state's buffers to a jitted step.
        return jax.tree.map(jnp.copy, params), optimizer.init(params)

    # One program, dropped after use: eagerly, each leaf's copy and zeros would compile
    # and keep a program per shape.
    ema_params, opt_state = compiled_once(fresh, eqx.filter(model, trainable(model)))
    return TrainState(
        model=model,
        ema=eqx.combine(ema_params, model),
        opt_state=opt_state,
        step=jnp.zeros((), dtype=jnp.int32),
        key=key,
    )


def default_optimizer(
    lr: float,
    *,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW behind gradient clipping by global norm, with an optional warmup and decay.

    `optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, ...))`. The
    schedule rises linearly from 0 to `lr` over `warmup_steps`, then stays at `lr`, or
    with `decay_steps` follows a cosine to 0 at step `decay_steps` (warmup included).

    **Arguments:**

    - `lr`: the peak learning rate, > 0.
    - `weight_decay`: AdamW's decoupled weight decay (only trainable leaves are decayed:
        the optimizer sees the trainable partition only).
    - `clip`: the global gradient norm to clip to, > 0; `None` for no clipping.
    - `warmup_steps`: steps of linear warmup, >= 0.
    - `decay_steps`: the total length of a cosine decay, > `warmup_steps`; `None` for a
        constant rate after the warmup.
    - `b1`, `b2`, `eps`: Adam's moment decays and epsilon.

    **Returns:**

    An `optax.GradientTransformation`.
    """
    _check_number("lr", lr, low=0.0)
    _check_number("weight_decay", weight_decay, low=0.0, low_ok=True)
    if clip is not None:
        _check_number("clip", clip, low=0.0, none_ok=True)
    _check_number("b1", b1, low=0.0, low_ok=True, high=1.0)
    _check_number("b2", b2, low=0.0, low_ok=True, high=1.0)
    _check_number("eps", eps, low=0.0, low_ok=True)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if decay_steps is not None and not (is_int(decay_steps) and decay_steps > warmup_steps):
        raise ValueError(
            f"`decay_steps` must be an integer > warmup_steps={warmup_steps} or None, got decay_steps={decay_steps!r}."
        )
    if decay_steps is not None:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps, end_value=0.0)
    elif warmup_steps > 0:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, warmup_steps),
                optax.constant_schedule(lr),
            ],
            [warmup_steps],
        )
    else:
        schedule = lr
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if clip is not None:
        adamw = optax.chain(optax.clip_by_global_norm(clip), adamw)
    return _standard_promotion(adamw)


def _check_number(
    name: str,
    value: Any,
    *,
    low: float,
    low_ok: bool = False,
    high: float | None = None,
    none_ok: bool = False,
) -> None:
    """`value` must be a finite real number above `low` (or equal, with `low_ok`) and below `high`."""
    real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
    ok = real and math.isfinite(value) and (value >= low if low_ok else value > low)
    if ok and high is not None:
        ok = value < high
    if not ok:
        bounds = f"{'>=' if low_ok else '>'} {low:g}" + ("" if high is None else f" and < {high:g}")
        extra = " or None" if none_ok else ""
        raise ValueError(f"`{name}` must be a finite number {bounds}{extra}, got {name}={value!r}.")


def _standard_promotion(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """The optimizer run under standard dtype promotion.

    optax mixes Python floats with its int32 step count (Adam's bias correction), which
    `jax_numpy_dtype_promotion="strict"` rejects; the model itself stays strict.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.init(params)

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.update(updates, state, params, **extra)

    return optax.GradientTransformation(init, update)


def _global_norm(tree: PyTree) -> Float[Array, ""]:
    """The L2 norm of all leaves together, in float32."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.float32(0.0)))


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float | Callable[[Int[Array, ""]], Real[Array, ""]] = 0.999,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """One optimisation step as a pure function `step(state, batch) -> (state, metrics)`.

    The step splits `state.key` into the key of this step and the next state's key,
    differentiates `loss_fn` with respect to the trainable partition of `state.model`
    only, applies the optimizer (clip gradients inside it, as [`default_optimizer`][]
    does), and updates the EMA: `ema <- d ema + (1 - d) params` on the trainable leaves
    (the others follow the model).

    The returned function is *not* jitted, so that it can be compiled with shardings
    over a device mesh. On a single device compile it with [`jit_step`][] (one
    `eqx.filter_jit` that reuses the state's buffers):

    ```python
    step = jit_step(make_train_step(c2i_loss, optimizer))
    state, metrics = step(state, (images, labels))
    ```

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key) -> scalar`, the loss averaged over the
        batch (e.g. [`c2i_loss`][], or `functools.partial(c2i_loss, drop_prob=0.2)`).
    - `optimizer`: the optax transformation `state.opt_state` was initialised with.
    - `ema_decay`: the EMA decay `d` in [0, 1], or a schedule `d(step)` called with the
        int32 number of steps taken before this one (for a warmup such as
        `lambda s: jnp.minimum(0.999, (1 + s) / (10 + s))`, a float32 result).
    - `skip_nonfinite`: when the loss or the gradient is not finite (one NaN pixel in a
        batch is enough), leave the model, the optimiser state and the EMA unchanged
        (`state.step` and `state.key` still advance, so the data position moves on).
        With `False` the update is applied whatever it holds.

    **Returns:**

    `step(state, batch) -> (state, metrics)`, `metrics` a dict of float32 scalars:
    `"loss"` (the loss at the parameters before the update), `"grad_norm"` (the
    global norm of the gradient before clipping) and `"skipped"` (1.0 when the loss or
    gradient was not finite and the update was skipped, else 0.0; with
    `skip_nonfinite=False` it still flags such a step, whose update was applied).
    """
    optimizer = _standard_promotion(optimizer)
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"`skip_nonfinite` must be a bool, got skip_nonfinite={skip_nonfinite!r}.")
    decay = 0.0
    if not callable(ema_decay):
        decay = float(ema_decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1], got ema_decay={ema_decay!r}.")

    def step_impl(state: TrainState, batch: Any, in_place: bool) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        key, next_key = jr.split(state.key)
        params, rest = eqx.partition(state.model, trainable(state.model))

        def loss_of(p):
            return loss_fn(eqx.combine(p, rest), batch, key)

        loss, grads = jax.value_and_grad(loss_of)(params)
        grad_norm = _global_norm(grads)
        nonfinite = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        d = ema_decay(state.step) if callable(ema_decay) else decay

        def average(e, p):
            w = jnp.asarray(d, dtype=jnp.float32)
            return (w * e.astype(jnp.float32) + (1 - w) * p.astype(jnp.float32)).astype(e.dtype)

        def update(params, opt_arrays, ema_params):
            updates, opt_state = optimizer.update(grads, eqx.combine(opt_arrays, opt_static), params)
            params = optax.apply_updates(params, updates)
            return params, eqx.filter(opt_state, eqx.is_array), jax.tree.map(average, ema_params, params)

        opt_arrays, opt_static = eqx.partition(state.opt_state, eqx.is_array)
        old = (params, opt_arrays, eqx.filter(state.ema, trainable(state.ema)))
        if not skip_nonfinite:
            new = update(*old)
        elif in_place:
            # For a donated state: a loop of zero or one updates reads each old leaf once
            # and writes it in place. Selecting between old and new values (below) keeps
            # the old ones alive past the update, and XLA then copies every donated leaf.
            trips = jnp.where(nonfinite, 0, 1)
            _, new = jax.lax.while_loop(lambda c: c[0] < trips, lambda c: (c[0] + 1, update(*c[1])), (0, old))
        else:
            # Without donation a select is free, and the loop would copy the inputs.
            new = jax.tree.map(lambda n, o: jnp.where(nonfinite, o, n), update(*old), old)
        params, opt_arrays, ema_params = new
        new_state = TrainState(
            model=eqx.combine(params, rest),
            ema=eqx.combine(ema_params, rest),
            opt_state=eqx.combine(opt_arrays, opt_static),
            step=state.step + 1,
            key=next_key,
        )
        metrics = {
            "loss": jnp.asarray(loss, dtype=jnp.float32),
            "grad_norm": jnp.asarray(grad_norm, dtype=jnp.float32),
            "skipped": nonfinite.astype(jnp.float32),
        }
        return new_state, metrics

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        return step_impl(state, batch, in_place=False)

    # What `jit_step` compiles when it donates the state.
    setattr(step, _IN_PLACE, functools.partial(step_impl, in_place=True))
    return step


def jit_step(
    step: Callable[[TrainState, Any], tuple[TrainState, _Metrics]],
    *,
    donate: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, _Metrics]]:
    """`eqx.filter_jit` of a train step that donates the state it is given.

    XLA then writes the new state into the old one's buffers, so a run holds one state
    (model, EMA, optimiser moments) instead of two during every step, as the reference's
    Lightning training does (PyTorch's `optimizer.step()` updates in place). The state passed
    in is deleted (so are the arrays of the model it was initialised from): use the
    returned one, as [`fit`][] does. Arrays held more than once in the state (frozen
    leaves the model and the EMA share) and the batch are never donated, and a leaf the
    step passes through unchanged (a frozen one) comes back as the same array, not a copy.
    A [`make_train_step`][] step skips a non-finite update here with a loop of zero or
    one updates instead of a select, which XLA can do in place; the values agree with
    `eqx.filter_jit(step)`'s to float32 round-off (XLA fuses the two differently).

    ```python
    step = train.jit_step(train.make_train_step(train.c2i_loss, optimizer))
    state, metrics = step(state, (images, labels))
    ```

    [`jit_steps`][] compiles several steps into one call, which [`fit`][] uses the same way.

    **Arguments:**

    - `step`: `step(state, batch) -> (state, metrics)`, e.g. from [`make_train_step`][].
    - `donate`: `False` donates nothing (the state passed in stays valid).
    - `compiler_options`: XLA options for the program; `None` takes this package's
        (on CPU, for memory: see [`jit_steps`][]), `{}` XLA's defaults.

    **Returns:**

    `step(state, batch) -> (state, metrics)`, compiled on its first call.
    """
    if not isinstance(donate, bool):
        raise ValueError(f"`donate` must be a bool, got donate={donate!r}.")
    options = _check_compiler_options(compiler_options)
    body = _in_place_variant(step) if donate else step

    # The first argument is never donated, the second is: with `donate=False`, nothing.
    def split_call(kept: tuple[Any, PyTree, tuple[int, ...]], donated: PyTree) -> tuple[PyTree, _Metrics]:
        batch, shared, first = kept
        # An array held twice outside (the model's and the EMA's frozen leaves) is one
        # value inside too, so the step sees, and passes through, one tracer.
        leaves, treedef = jax.tree.flatten(shared)
        leaves = [leaves[i] for i in first]
        new_state, metrics = body(eqx.combine(donated, jax.tree.unflatten(treedef, leaves)), batch)
        # XLA copies a non-donated input it returns; hand back its position instead.
        position = {id(x): i for i, x in enumerate(leaves) if eqx.is_array(x)}
        return jax.tree.map(lambda x: _Passed(position[id(x)]) if id(x) in position else x, new_state), metrics

    compiled = _FilterJit(split_call, donate, options)

    def jitted(state: TrainState, batch: Any) -> tuple[TrainState, _Metrics]:
        donated, shared = _partition_unshared(state) if donate else eqx.partition(state, lambda _: False)
        leaves = jax.tree.leaves(shared)
        new_state, metrics = compiled((batch, shared, _first_positions(leaves)), donated)
        new_state = jax.tree.map(lambda x: leaves[x.position] if isinstance(x, _Passed) else x, new_state)
        return new_state, metrics

    return jitted


def jit_steps(
    step: Callable[[TrainState, Any], tuple[TrainState, _Metrics]],
    steps_per_call: int,
    *,
    donate: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
) -> "_Steps":
    """[`jit_step`][] for several steps in a row: one compiled program runs `step` over a
    sequence of batches (`lax.scan`), and [`fit`][] calls it once per `steps_per_call` steps.

    On CPU, XLA allocates a program's temporary buffer afresh on every call, and a large
    one arrives as new pages the process faults in (`pixeldit_eqx.runtime`); one call
    for several steps pays that once for all of them, without changing the process's
    allocator. Each step computes what `jit_step`'s does (the same values; the
    reference's Lightning loop runs one step per call); the state is donated as there,
    and arrays held twice in it (frozen leaves the model and the EMA share) are passed
    through, never copied.

    ```python
    steps = train.jit_steps(train.make_train_step(train.c2i_loss, optimizer), 4)
    state, metrics = steps(state, [batch0, batch1, batch2, batch3])  # metrics["loss"]: shape (4,)
    state, losses = train.fit(steps, state, batches, num_steps=1000)  # 250 calls
    ```

    **Arguments:**

    - `step`: `step(state, batch) -> (state, metrics)`, e.g. from [`make_train_step`][];
        it must leave the arrays held twice in the state unchanged.
    - `steps_per_call`: how many steps [`fit`][] runs per call, >= 1.
    - `donate`: `False` donates nothing (the state passed in stays valid).
    - `compiler_options`: XLA options for the program. `None` takes this package's: on
        CPU, XLA's fusion emitters off (where the XLA has the switch; jax >= 0.11 has
        not) and its memory-optimised scheduler. Compiling then peaks hundreds of MiB
        lower and the step's temporaries are smaller, for a slower optimizer update
        (`docs/performance.md` has both measured). `{}` compiles with XLA's defaults.

    **Returns:**

    `steps(state, batches) -> (state, metrics)`: `batches` a list of 1 to `steps_per_call`
    batches of one structure, shapes and dtypes (a shorter list runs the same program, its
    padding skipped: `fit`'s last call takes the remainder), `metrics` with every value
    stacked along a leading axis, one entry per step run.
    """
    return _Steps(step, steps_per_call, donate, compiler_options=compiler_options)


class _Steps:
    """The callable [`jit_steps`][] returns: several steps per compiled call."""

    def __init__(
        self,
        step: Callable[[TrainState, Any], Any],
        steps_per_call: int,
        donate: bool,
        prepare: Callable[[str, Any], Any] | None = None,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        # `prepare(name, batch)`: checks a batch (named `name` in errors) and returns what
        # the program takes, e.g. a global array assembled from each process's part.
        if not isinstance(donate, bool):
            raise ValueError(f"`donate` must be a bool, got donate={donate!r}.")
        self.steps_per_call = check_int("steps_per_call", steps_per_call, 1)
        options = _check_compiler_options(compiler_options)
        self._prepare = prepare
        body = _in_place_variant(step) if donate else step

        def run(kept: tuple[Any, Any, PyTree, tuple[int, ...], PyTree], carried: PyTree) -> tuple[PyTree, Any]:
            batches, active, shared, first, spec = kept
            leaves, treedef = jax.tree.flatten(shared)
            shared = jax.tree.unflatten(treedef, [leaves[i] for i in first])
            fixed = {id(x) for x in jax.tree.leaves(shared)}

            def take(carry: PyTree, batch: Any) -> tuple[PyTree, Any]:
                new_state, metrics = body(eqx.combine(carry, shared), batch)
                new_carry, passed = eqx.partition(new_state, spec)
                if any(eqx.is_array(x) and id(x) not in fixed for x in jax.tree.leaves(passed)):
                    raise ValueError(
                        "jit_steps: the step changed an array that the state holds more than once (a leaf "
                        "shared by the model and the EMA); only arrays held once can be carried from step to "
                        "step. Compile this step with `train.jit_step`."
                    )
                return new_carry, metrics

            def one(carry: PyTree, indexed: tuple[Any, Any]) -> tuple[PyTree, Any]:
                # A loop of one trip, or none for the padding after the `active` batches:
                # the state stays where it is, in place, and one program serves every count.
                index, batch = indexed
                shapes = jax.eval_shape(lambda c: take(c, batch)[1], carry)
                zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
                trips = jnp.where(index < active, 1, 0)
                _, carry, metrics = jax.lax.while_loop(
                    lambda c: c[0] < trips, lambda c: (c[0] + 1, *take(c[1], batch)), (0, carry, zeros)
                )
                return carry, metrics

            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
            return jax.lax.scan(one, carried, (jnp.arange(len(batches)), stacked))

        self._compiled = _FilterJit(run, donate, options)

    def __call__(self, state: TrainState, batches: Any) -> tuple[TrainState, Any]:
        n = len(batches) if isinstance(batches, list) else 0
        if not 1 <= n <= self.steps_per_call:
            raise ValueError(
                f"`batches` must be a list of 1 to steps_per_call={self.steps_per_call} batches, got "
                + (f"{n}." if isinstance(batches, list) else f"a {type(batches).__name__}.")
            )
        if self._prepare is not None:
            batches = [self._prepare(f"batches[{i}]", b) for i, b in enumerate(batches)]

        def layout(batch: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
            leaves, treedef = jax.tree.flatten(batch)
            return treedef, [(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in leaves]

        layouts = [layout(b) for b in batches]
        for i, other in enumerate(layouts[1:], 1):
            if other != layouts[0]:
                raise ValueError(
                    f"`batches`: every batch must have the structure, shapes and dtypes of the first; "
                    f"batch {i} has {other}, batch 0 has {layouts[0]}."
                )
        padded = tuple(batches) + (batches[-1],) * (self.steps_per_call - n)
        spec = _unshared(state)
        carried, shared = eqx.partition(state, spec)
        first = _first_positions(jax.tree.leaves(shared))
        new_carried, metrics = self._compiled((padded, jnp.asarray(n, jnp.int32), shared, first, spec), carried)
        if n < self.steps_per_call:
            metrics = jax.tree.map(lambda m: m[:n], metrics)
        return eqx.combine(new_carried, shared), metrics


@dataclasses.dataclass(frozen=True)
class _Passed:
    """Where in the non-donated state arrays a step's output leaf came from unchanged
    (a pytree leaf, static under `eqx.filter_jit`)."""

    position: int


def _in_place_variant(step: Callable[[TrainState, Any], Any]) -> Callable[[TrainState, Any], Any]:
    """The form of a [`make_train_step`][] step to compile with its state donated (the
    same step computed so that XLA updates the state in place); other steps unchanged."""
    return getattr(step, _IN_PLACE, step)


def _unshared(tree: PyTree) -> PyTree:
    """`tree` with each leaf replaced by whether it is an array that occurs once in
    `tree` (by object identity): a filter spec for `eqx.partition`."""
    counts: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        if eqx.is_array(leaf):
            counts[id(leaf)] = counts.get(id(leaf), 0) + 1
    return jax.tree.map(lambda x: eqx.is_array(x) and counts[id(x)] == 1, tree)


def _partition_unshared(tree: PyTree) -> tuple[PyTree, PyTree]:
    """`(arrays that occur once in tree, everything else)`, by object identity."""
    return eqx.partition(tree, _unshared(tree))


def _first_positions(leaves: list[Any]) -> tuple[int, ...]:
    """For each leaf, the position of its first occurrence in `leaves` (by identity for
    arrays): how to rebuild, inside a program, the arrays held more than once."""
    seen: dict[int, int] = {}
    return tuple(seen.setdefault(id(x), i) if eqx.is_array(x) else i for i, x in enumerate(leaves))


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def _check_batch(name: str, arr: Any, ndim: int, batch: int | None, what: str) -> None:
    shape = getattr(arr, "shape", None)
    if shape is None or len(shape) != ndim or (batch is not None and shape[0] != batch):
        lead = "B" if batch is None else str(batch)
        raise ValueError(
            f"`batch`: expected {name} of shape ({lead}, {what}), got {None if shape is None else tuple(shape)}."
        )


def c2i_loss(
    model: Callable,
    batch: tuple[Float[Array, "B C H W"], Int[Array, " B"]],
    key: PRNGKeyArray,
    *,
    drop_prob: float = 0.1,
    shift: float = 1.0,
    null_class: int | None = None,
) -> Float[Array, ""]:
    """The class-conditional flow-matching loss of a batch, averaged over it.

    `jax.vmap` of `pixeldit_eqx.flow.flow_matching_loss` with one key per example;
    labels are dropped to the null class with probability `drop_prob` (for
    classifier-free guidance).

    **Arguments:**

    - `model`: `model(x (C, H, W), t, y) -> v (C, H, W)`, e.g. a `PixelDiT`.
    - `batch`: `(x, y)`: images `(B, C, H, W)` and integer labels `(B,)`.
    - `key`: a PRNG key for the noise, times and label dropout.
    - `drop_prob`: the label-dropout probability (0.1 in the reference).
    - `shift`: the time shift of the training times.
    - `null_class`: the null label; default `model.num_classes`.

    **Returns:**

    The mean loss, a float32 scalar.
    """
    x, y = batch
    _check_batch("images", x, 4, None, "C, H, W")
    _check_batch("labels", y, 1, x.shape[0], "")
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            raise ValueError("`null_class`: expected an int (the model has no `num_classes`), got None.")
    null = jnp.asarray(null_class, dtype=y.dtype)

    def one(x, y, k):
        return flow.flow_matching_loss(model, x, y, key=k, null_cond=null, drop_prob=drop_prob, shift=shift)

    keys = jr.split(key, x.shape[0])
    return jnp.mean(jax.vmap(one)(x, y, keys))


def t2i_loss(
    model: Callable,
    batch: tuple[Float[Array, "B C H W"], Float[Array, "B T txt"], Bool[Array, "B T"] | None],
    key: PRNGKeyArray,
    *,
    drop_prob: float = 0.1,
    shift: float = 1.0,
    null_text: Float[Array, "T txt"] | None = None,
) -> Float[Array, ""]:
    """The text-conditional flow-matching loss of a batch, averaged over it.

    With probability `drop_prob` an example's caption is replaced by the null text:
    `null_text` if given, else an all-zeros embedding, with an all-True mask (every
    null token is attended to). Zeros are a model-agnostic stand-in: a run with a real
    text encoder should pass the encoding of the empty prompt as `null_text`, and
    sample with the same null condition.

    **Arguments:**

    - `model`: `model(x (C, H, W), t, text (T, txt), mask (T,)) -> v`, e.g. a
        `PixelDiTT2I`.
    - `batch`: `(x, text, text_mask)`: images `(B, C, H, W)`, text embeddings
        `(B, T, txt)` and a boolean mask `(B, T)` (True on real tokens) or `None`
        (all real).
    - `key`: a PRNG key for the noise, times and caption dropout.
    - `drop_prob`: the caption-dropout probability.
    - `shift`: the time shift of the training times.
    - `null_text`: the unconditional text `(T, txt)`; default zeros.

    **Returns:**

    The mean loss, a float32 scalar.
    """
    if len(batch) != 3:
        raise ValueError(f"`batch`: expected (x, text, text_mask), got a sequence of length {len(batch)}.")
    x, text, mask = batch
    _check_batch("images", x, 4, None, "C, H, W")
    _check_batch("text", text, 3, x.shape[0], "T, txt")
    if mask is None:
        mask = jnp.ones(text.shape[:2], dtype=bool)
    _check_batch("text_mask", mask, 2, x.shape[0], "T")
    if mask.shape != text.shape[:2]:
        raise ValueError(f"`batch`: expected text_mask of shape {text.shape[:2]}, got {mask.shape}.")
    if null_text is None:
        null_text = jnp.zeros(text.shape[1:], dtype=text.dtype)
    elif null_text.shape != text.shape[1:]:
        raise ValueError(f"`null_text`: expected shape {text.shape[1:]}, got {null_text.shape}.")
    null = (null_text.astype(text.dtype), jnp.ones(text.shape[1:2], dtype=bool))

    def velocity(x, t, cond):
        return model(x, t, cond[0], cond[1])

    def one(x, text, mask, k):
        return flow.flow_matching_loss(
            velocity, x, (text, mask), key=k, null_cond=null, drop_prob=drop_prob, shift=shift
        )

    keys = jr.split(key, x.shape[0])
    return jnp.mean(jax.vmap(one)(x, text, mask.astype(bool), keys))


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def fit(
    step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Array]]],
    state: TrainState,
    batches: Iterable[Any] | Callable[[int], Any],
    *,
    num_steps: int,
    progress: bool = True,
    log_every: int = 50,
    start_step: int | None = None,
    max_consecutive_skips: int | None = 10,
) -> tuple[TrainState, Float[np.ndarray, " {num_steps}"]]:
    """Runs `num_steps` steps over `batches`, with a progress bar showing the loss.

    Steps are dispatched without waiting: the loss (and whether the step was skipped)
    is fetched from the device only every `log_every` steps and once at the end. A step
    compiled by [`jit_steps`][] is called once per `steps_per_call` batches (the last call
    with the remainder; skips are then counted, and `log_every` honoured, at the end of
    a call); on CPU that spares most of the per-call page faults that a process without
    `pixeldit_eqx.runtime.tune_cpu_allocator()` pays.

    **Resuming.** The data position is the step count: with a function `batches(i)`
    (a seeded, step-indexed batch order), step `i` of the run trains on `batches(i)`,
    starting at `state.step`, so a run resumed from a checkpoint continues exactly
    where it stopped (N + M steps in one go or N, save, load, M give bit-identical
    states). With an iterable, `start_step=k` draws and discards its first `k` batches
    (a fresh iterable after a resume); without it the iterable is read from where it
    is (a stateful iterator carries its own position).

    **Arguments:**

    - `step`: a (jitted) step, as made by [`make_train_step`][] and compiled by
        [`jit_steps`][] or [`jit_step`][] (which consume the `state` given here).
    - `state`: the state to start from.
    - `batches`: a function `batches(i) -> batch` of the step index `i`, or an
        iterable of batches, at least `num_steps` long (an infinite generator is fine:
        only `num_steps` are drawn).
    - `num_steps`: the number of steps, >= 0.
    - `progress`: show a tqdm bar (on stderr, only when it is a terminal).
    - `log_every`: how often the bar's loss is refreshed and skipped steps are
        counted, in steps, >= 1.
    - `start_step`: the index of the first step's batch; default `state.step` for a
        function, 0 (no batch discarded) for an iterable.
    - `max_consecutive_skips`: raise [`NonFiniteTrainingError`][] once this many steps
        in a row were skipped for a non-finite loss or gradient (the step's
        `"skipped"` metric, or a non-finite `"loss"` for a step without it); `None`
        never raises.

    **Returns:**

    `(state, losses)`: the final state and a float32 numpy array with the loss of every
    step (non-finite where a step was skipped).

    **Raises:**

    `NonFiniteTrainingError` after `max_consecutive_skips` skipped steps in a row; its
    `state` attribute holds the state reached (whose model, optimiser state and EMA
    are those from before the skipped steps).
    """
    num_steps = check_int("num_steps", num_steps, 0)
    log_every = check_int("log_every", log_every, 1)
    start_step = check_int("start_step", start_step, 0, none_ok=True)
    max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 1, none_ok=True)
    tqdm = require("tqdm.auto", "train", "the progress bar of `fit`").tqdm

    if callable(batches) and not isinstance(batches, Iterable):
        first = int(state.step) if start_step is None else start_step
        batch_of = batches

        def next_batch(i: int) -> Any:
            return batch_of(first + i)

    else:
        iterator = iter(cast(Iterable[Any], batches))
        for drawn in range(start_step or 0):
            if next(iterator, _EXHAUSTED) is _EXHAUSTED:
                raise ValueError(f"`batches` ran out after {drawn} batches while skipping start_step={start_step}.")

        def next_batch(i: int) -> Any:
            batch = next(iterator, _EXHAUSTED)
            if batch is _EXHAUSTED:
                raise ValueError(f"`batches` ran out after {i} batches; expected at least num_steps={num_steps}.")
            return batch

    show = progress and sys.stderr.isatty()
    losses: list[Array] = []
    flags: list[Array | None] = []
    streak = {"length": 0, "total": 0, "checked": 0, "calls": 0}

    def check_skips(state: TrainState) -> None:
        """Count the skipped steps since the last check; raise on too long a streak."""
        fetched = jax.device_get([(losses[i], flags[i]) for i in range(streak["calls"], len(losses))])
        start = streak["checked"]
        per_step = []
        for call_losses, call_flags in fetched:  # one call: a scalar, or one entry per step
            call_losses = np.ravel(call_losses)
            call_flags = [None] * call_losses.size if call_flags is None else np.ravel(call_flags)
            per_step += zip(call_losses, call_flags)
        for offset, (loss, flag) in enumerate(per_step):
            skipped = bool(flag) if flag is not None else not np.isfinite(loss)
            streak["length"] = streak["length"] + 1 if skipped else 0
            streak["total"] += skipped
            if max_consecutive_skips is not None and streak["length"] >= max_consecutive_skips:
                last = start + offset
                error = NonFiniteTrainingError(
                    f"{streak['length']} consecutive training steps (steps {last - streak['length'] + 1}-{last} of "
                    f"this `fit`) had a non-finite loss or gradient and were skipped "
                    f"(max_consecutive_skips={max_consecutive_skips}): the batches hold NaN/inf or the run diverged "
                    "(lower the learning rate, check the data). The model, optimiser state and EMA are those "
                    "from before the skipped steps; the state reached is this error's `state`."
                )
                error.state = state
                raise error
        streak["checked"] += len(per_step)
        streak["calls"] = len(losses)

    per_call = step.steps_per_call if isinstance(step, _Steps) else 0
    with tqdm(total=num_steps, disable=not show, desc="train", unit="step") as bar:
        i = 0
        while i < num_steps:
            if per_call:
                n = min(per_call, num_steps - i)
                state, metrics = step(state, [next_batch(i + j) for j in range(n)])
            else:
                n = 1
                state, metrics = step(state, next_batch(i))
            losses.append(metrics["loss"])
            flags.append(metrics.get("skipped"))
            done, i = i, i + n
            if i // log_every > done // log_every or i == num_steps:
                check_skips(state)
                if show:
                    bar.set_postfix(
                        loss=f"{float(np.ravel(losses[-1])[-1]):.4f}", skipped=streak["total"], refresh=False
                    )
                    bar.update(i - bar.n)
    history = np.concatenate([np.ravel(x) for x in jax.device_get(losses)] or [np.zeros(0)]).astype(np.float32)
    return state, history


_EXHAUSTED = object()


# ---------------------------------------------------------------------------------------
# Checkpoints (a training state); the model file and the helpers both use are in `_model_file`
# ---------------------------------------------------------------------------------------


def _keys_to_data(tree: PyTree) -> PyTree:
    def to_data(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.key_data(x)
        return x

    return jax.tree.map(to_data, tree)


def _checkpoint_path(path: Any) -> Any:
    """Where `eqx.tree_serialise_leaves` puts a checkpoint: `.eqx` added to a path without a suffix."""
    if isinstance(path, str | os.PathLike) and pathlib.Path(path).suffix == "":
        return pathlib.Path(path).with_suffix(".eqx")
    return path


def save_checkpoint(path: Any, state: TrainState) -> None:
    """Saves a training state: a checksummed header line, then `eqx.tree_serialise_leaves`.

    PRNG keys (which cannot be serialised as typed keys) are stored as their
    `jax.random.key_data`. `state.step` is the data position: resuming with
    [`fit`][] from the loaded state continues the batch order where it stopped. Restore
    with [`load_checkpoint`][]: training resumes bit-exactly.

    The write is atomic: a temporary file in the same folder is fsynced and replaces
    `path` whole, so an interrupted save (even `kill -9`) leaves the previous checkpoint,
    and two concurrent saves leave one of the two whole. The header's sha256 lets
    loading detect truncation, flipped bits and trailing bytes.

    **Arguments:**

    - `path`: a file path (`.eqx` is added to a path without a suffix, as Equinox
        does), or a binary file object.
    - `state`: the [`TrainState`][] to save.
    """
    header = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_FORMAT_VERSION}
    _write(_checkpoint_path(path), header, lambda f: eqx.tree_serialise_leaves(f, _keys_to_data(state)))


def load_checkpoint(path: Any, like_state: TrainState, *, allow_nonfinite: bool = False) -> TrainState:
    """Loads a training state saved by [`save_checkpoint`][].

    The file's checksum is verified before anything is read from its data. A
    checkpoint written before checksums existed (no header line) loads unverified.

    **Arguments:**

    - `path`: a file path (or a binary file object).
    - `like_state`: a state of the same structure, shapes and dtypes (e.g. a fresh
        `init_train_state(...)`, or its `eqx.filter_eval_shape`); its arrays are not
        used.
    - `allow_nonfinite`: load a state holding NaN or inf (refused by default).

    **Returns:**

    The saved [`TrainState`][], PRNG keys restored as typed keys of the same
    implementation as those of `like_state`.

    Raises `CheckpointFormatError` (a `ValueError`) when the file is truncated, corrupt,
    has trailing bytes, does not fit `like_state` or holds non-finite values.
    """

    def is_key(x: Any) -> bool:
        return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)

    def raw_like(x: Any) -> Any:
        return jax.eval_shape(jr.key_data, x) if is_key(x) else x

    def impl(x: Any) -> Any:
        # `jr.key_impl` needs a concrete key: a zero key of the same dtype stands in.
        return jr.key_impl(jnp.zeros((), x.dtype)) if is_key(x) else None

    like_leaves, treedef = jax.tree.flatten(like_state)
    impls = [impl(x) for x in like_leaves]
    raw_like_state = jax.tree.unflatten(treedef, [raw_like(x) for x in like_leaves])
    path = _checkpoint_path(path)
    where = _where(path)

    def read(f: Any) -> PyTree:
        if _peek(f) == b"{":  # A checkpoint written before checksums begins with a leaf (b"\x93NUMPY").
            header = _read_json_line(f, where, "checkpoint")
            if header.get("format") != _CHECKPOINT_FORMAT or header.get("version") != _CHECKPOINT_FORMAT_VERSION:
                raise CheckpointFormatError(
                    f"`path`: {where} is not a pixeldit_eqx training checkpoint of version "
                    f"{_CHECKPOINT_FORMAT_VERSION}: its header has format {str(header.get('format'))[:80]!r}, "
                    f"version {str(header.get('version'))[:20]!r}."
                )
            f = read_checksummed(f, header, f"`path`: {where}")
        raw = eqx.tree_deserialise_leaves(f, raw_like_state)
        if f.read(1):
            raise ValueError("expected the end of the file after the last leaf, got more data")
        return raw

    try:
        raw = _open_and(path, read)
    except (FileNotFoundError, CheckpointFormatError):
        raise
    except (RuntimeError, ValueError, EOFError, OSError, TypeError, KeyError, MemoryError, RecursionError) as e:
        raise CheckpointFormatError(
            f"`path`: the checkpoint {where} does not fit `like_state`: {type(e).__name__}: {str(e)[:300]}"
        ) from e
    if not allow_nonfinite:
        _refuse_nonfinite(raw, path, "training state")
    leaves = jax.tree.leaves(raw)
    return jax.tree.unflatten(
        treedef,
        [x if impl is None else jr.wrap_key_data(x, impl=impl) for x, impl in zip(leaves, impls)],
    )

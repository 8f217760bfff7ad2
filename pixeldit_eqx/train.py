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
step = eqx.filter_jit(train.make_train_step(train.c2i_loss, optimizer))
state, losses = train.fit(step, state, batches, num_steps=1000)
train.save_model("digits.eqx", state.ema)
```

The objective is the reference's rectified flow (`pixeldit_eqx.flow`: logit-normal
times, label dropout for guidance). Design choices of this module: one pure step
function with the jit boundary left to the caller; the EMA is a whole model (ready to
sample), updated every step; the optimizer runs under standard dtype promotion (optax
is not written for `jax_numpy_dtype_promotion="strict"`), the model does not.
"""

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Real

from . import flow
from ._optional import require
from .modules import trainable


optax = require("optax", "train", "pixeldit_eqx.train")


__all__ = [
    "TrainState",
    "c2i_loss",
    "default_optimizer",
    "fit",
    "init_train_state",
    "load_checkpoint",
    "load_model",
    "make_train_step",
    "save_checkpoint",
    "save_model",
    "t2i_loss",
]

#: `loss_fn(model, batch, key) -> scalar`: a loss averaged over a batch.
LossFn = Callable[[Any, Any, PRNGKeyArray], Float[Array, ""]]

_MODEL_FORMAT = "pixeldit_eqx.model"
_MODEL_FORMAT_VERSION = 1


class TrainState(eqx.Module):
    """Everything a training run carries from one step to the next.

    A pytree of arrays, so it passes through `eqx.filter_jit` whole and can be sharded.

    **Fields:**

    - `model`: the model being trained.
    - `ema`: an exponential moving average of `model`, of the same structure: its
        trainable leaves are averaged, the others are the model's. Ready to sample from.
    - `opt_state`: the optax state of the trainable partition.
    - `step`: the number of steps taken, an int32 scalar.
    - `key`: a typed PRNG key, split at every step.
    """

    model: PyTree
    ema: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


def _typed_key(key: Any, name: str = "key") -> PRNGKeyArray:
    """A typed PRNG key; a raw `uint32` key (`jr.PRNGKey`) is wrapped."""
    if not isinstance(key, jax.Array):
        raise ValueError(f"`{name}` must be a JAX PRNG key, got {type(key).__name__}.")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"`{name}` must be a single PRNG key, got shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jr.wrap_key_data(key)
    raise ValueError(
        f"`{name}` must be a PRNG key (`jax.random.key`), got an array of dtype {key.dtype} and shape {key.shape}."
    )


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
    params = eqx.filter(model, trainable(model))
    # A copy, not an alias: a caller may donate the state's buffers to a jitted step.
    ema = eqx.combine(jax.tree.map(jnp.copy, params), model)
    return TrainState(
        model=model,
        ema=ema,
        opt_state=_standard_promotion(optimizer).init(params),
        step=jnp.zeros((), dtype=jnp.int32),
        key=_typed_key(key),
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
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got lr={lr!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be >= 0, got weight_decay={weight_decay!r}.")
    if clip is not None and not clip > 0:
        raise ValueError(f"`clip` must be > 0 or None, got clip={clip!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0, got warmup_steps={warmup_steps!r}.")
    if decay_steps is not None and not (isinstance(decay_steps, int) and decay_steps > warmup_steps):
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
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """One optimisation step as a pure function `step(state, batch) -> (state, metrics)`.

    The step splits `state.key` into the key of this step and the next state's key,
    differentiates `loss_fn` with respect to the trainable partition of `state.model`
    only, applies the optimizer (clip gradients inside it, as [`default_optimizer`][]
    does), and updates the EMA: `ema <- d ema + (1 - d) params` on the trainable leaves
    (the others follow the model).

    The returned function is *not* jitted, so that it can be compiled with shardings
    over a device mesh. On a single device wrap it in one `eqx.filter_jit`:

    ```python
    step = eqx.filter_jit(make_train_step(c2i_loss, optimizer))
    state, metrics = step(state, (images, labels))
    ```

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key) -> scalar`, the loss averaged over the
        batch (e.g. [`c2i_loss`][], or `functools.partial(c2i_loss, drop_prob=0.2)`).
    - `optimizer`: the optax transformation `state.opt_state` was initialised with.
    - `ema_decay`: the EMA decay `d` in [0, 1], or a schedule `d(step)` called with the
        int32 number of steps taken before this one (for a warmup such as
        `lambda s: jnp.minimum(0.999, (1 + s) / (10 + s))`, a float32 result).

    **Returns:**

    `step(state, batch) -> (state, metrics)`, `metrics` a dict of float32 scalars:
    `"loss"` (the loss at the parameters before the update) and `"grad_norm"` (the
    global norm of the gradient before clipping).
    """
    optimizer = _standard_promotion(optimizer)
    if not callable(ema_decay):
        decay = float(ema_decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1], got ema_decay={ema_decay!r}.")

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        key, next_key = jr.split(state.key)
        params, rest = eqx.partition(state.model, trainable(state.model))

        def loss_of(p):
            return loss_fn(eqx.combine(p, rest), batch, key)

        loss, grads = jax.value_and_grad(loss_of)(params)
        grad_norm = _global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        model = eqx.combine(params, rest)

        d = ema_decay(state.step) if callable(ema_decay) else decay
        ema_params = eqx.filter(state.ema, trainable(state.ema))

        def average(e, p):
            w = jnp.asarray(d, dtype=jnp.float32)
            return (w * e.astype(jnp.float32) + (1 - w) * p.astype(jnp.float32)).astype(e.dtype)

        ema = eqx.combine(jax.tree.map(average, ema_params, params), rest)
        new_state = TrainState(model=model, ema=ema, opt_state=opt_state, step=state.step + 1, key=next_key)
        metrics = {
            "loss": jnp.asarray(loss, dtype=jnp.float32),
            "grad_norm": jnp.asarray(grad_norm, dtype=jnp.float32),
        }
        return new_state, metrics

    return step


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
    batches: Iterable[Any],
    *,
    num_steps: int,
    progress: bool = True,
    log_every: int = 50,
) -> tuple[TrainState, Float[np.ndarray, " {num_steps}"]]:
    """Runs `num_steps` steps over `batches`, with a progress bar showing the loss.

    Steps are dispatched without waiting: the loss is fetched from the device only
    every `log_every` steps (for the bar) and once at the end. On CPU, a process that
    calls `pixeldit_eqx.runtime.tune_cpu_allocator()` first runs its steps without
    per-step page faults.

    **Arguments:**

    - `step`: a (jitted) step, as made by [`make_train_step`][].
    - `state`: the state to start from.
    - `batches`: an iterable of batches, at least `num_steps` long (an infinite
        generator is fine: only `num_steps` are drawn).
    - `num_steps`: the number of steps, >= 0.
    - `progress`: show a tqdm bar (on stderr, only when it is a terminal).
    - `log_every`: how often the bar's loss is refreshed, in steps, >= 1.

    **Returns:**

    `(state, losses)`: the final state and a float32 numpy array with the loss of every
    step.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be an integer >= 0, got num_steps={num_steps!r}.")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be an integer >= 1, got log_every={log_every!r}.")
    tqdm = require("tqdm.auto", "train", "the progress bar of `fit`").tqdm

    show = progress and sys.stderr.isatty()
    losses: list[Array] = []
    iterator = iter(batches)
    with tqdm(total=num_steps, disable=not show, desc="train", unit="step") as bar:
        for i in range(num_steps):
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(
                    f"`batches` ran out after {i} batches; expected at least num_steps={num_steps}."
                ) from None
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
            if show and ((i + 1) % log_every == 0 or i + 1 == num_steps):
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
                bar.update((i + 1) - bar.n)
    history = np.asarray(jax.device_get(losses), dtype=np.float32).reshape(num_steps)
    return state, history


# ---------------------------------------------------------------------------------------
# Checkpoints (a training state) and model files (a self-describing PixelDiT)
# ---------------------------------------------------------------------------------------


def _keys_to_data(tree: PyTree) -> PyTree:
    def to_data(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.key_data(x)
        return x

    return jax.tree.map(to_data, tree)


def save_checkpoint(path: Any, state: TrainState) -> None:
    """Saves a training state with `eqx.tree_serialise_leaves`.

    PRNG keys (which cannot be serialised as typed keys) are stored as their
    `jax.random.key_data`. Restore with [`load_checkpoint`][]: training resumes
    bit-exactly.

    **Arguments:**

    - `path`: a file path (or a binary file object).
    - `state`: the [`TrainState`][] to save.
    """
    eqx.tree_serialise_leaves(path, _keys_to_data(state))


def load_checkpoint(path: Any, like_state: TrainState) -> TrainState:
    """Loads a training state saved by [`save_checkpoint`][].

    **Arguments:**

    - `path`: a file path (or a binary file object).
    - `like_state`: a state of the same structure, shapes and dtypes (e.g. a fresh
        `init_train_state(...)`, or its `eqx.filter_eval_shape`); its arrays are not
        used.

    **Returns:**

    The saved [`TrainState`][], PRNG keys restored as typed keys of the same
    implementation as those of `like_state`.

    Raises `ValueError` when the file does not fit `like_state`.
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
    try:
        raw = eqx.tree_deserialise_leaves(path, raw_like_state)
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"`path`: the checkpoint {path!r} does not fit `like_state`: {e}") from e
    leaves = jax.tree.leaves(raw)
    return jax.tree.unflatten(
        treedef,
        [x if impl is None else jr.wrap_key_data(x, impl=impl) for x, impl in zip(leaves, impls)],
    )


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def save_model(path: Any, model: PyTree) -> None:
    """Writes a PixelDiT to a self-describing file: no skeleton is needed to load it.

    The file is one line of JSON (format, `variant`, `config` — `model.config`, the
    constructor arguments —, parameter `dtype` and `compute_dtype`), then the leaves as
    `eqx.tree_serialise_leaves` writes them. This is Equinox's documented pattern for
    saving hyperparameters with a model.

    **Arguments:**

    - `path`: a file path, or a binary file object open for writing.
    - `model`: a `PixelDiT` or `PixelDiTT2I` (e.g. `state.ema`), whose trainable
        parameters share one dtype.
    """
    variant = getattr(type(model), "variant", None)
    config = getattr(model, "config", None)
    if variant not in ("c2i", "t2i") or not isinstance(config, dict):
        raise ValueError(
            f"`model`: expected a PixelDiT or PixelDiTT2I (with `variant` and `config`), got {type(model).__name__}."
        )
    dtypes = {x.dtype for x in jax.tree.leaves(eqx.filter(model, trainable(model)))}
    if len(dtypes) != 1:
        raise ValueError(
            "`model`: expected trainable parameters of a single dtype, got "
            f"{sorted(jnp.dtype(d).name for d in dtypes)}."
        )
    header = {
        "format": _MODEL_FORMAT,
        "version": _MODEL_FORMAT_VERSION,
        "variant": variant,
        "config": config,
        "dtype": _dtype_name(dtypes.pop()),
        "compute_dtype": _dtype_name(getattr(model, "compute_dtype", None)),
    }
    line = (json.dumps(header, sort_keys=True) + "\n").encode()

    def write(f: Any) -> None:
        f.write(line)
        eqx.tree_serialise_leaves(f, model)

    if hasattr(path, "write"):
        write(path)
    else:
        with open(path, "wb") as f:
            write(f)


def _read_header(f: Any, path: Any) -> dict[str, Any]:
    line = f.readline(1 << 20)
    try:
        header = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if (
        not isinstance(header, dict)
        or header.get("format") != _MODEL_FORMAT
        or not isinstance(header.get("config"), dict)
        or header.get("variant") not in ("c2i", "t2i")
    ):
        raise ValueError(
            f"`path`: {path!r} is not a pixeldit_eqx model file: expected a first line "
            f'of JSON with "format": "{_MODEL_FORMAT}", "variant" and "config", got '
            f"{line[:120]!r}."
        )
    if header.get("version") != _MODEL_FORMAT_VERSION:
        raise ValueError(
            f"`path`: {path!r} has model-file version {header.get('version')!r}; this "
            f"version of pixeldit_eqx reads version {_MODEL_FORMAT_VERSION}."
        )
    return header


def load_model(path: Any, *, checkpoint: bool = False) -> PyTree:
    """Reads a model written by [`save_model`][].

    The skeleton is built from the header with `eqx.filter_eval_shape(pixeldit_eqx.build,
    ...)` (no parameters are initialised), then filled with the stored leaves.

    **Arguments:**

    - `path`: a file path, or a binary file object open for reading.
    - `checkpoint`: rematerialise blocks in the backward pass (a runtime choice, not
        stored in the file).

    **Returns:**

    The `PixelDiT` or `PixelDiTT2I`, bit-identical to the one saved.

    Raises `ValueError` when the header is missing or corrupt, or when the stored leaves
    do not fit the model it describes.
    """
    from ._model import build

    def read(f: Any) -> PyTree:
        header = _read_header(f, path)
        try:
            skeleton = eqx.filter_eval_shape(
                build,
                header["config"],
                header["variant"],
                key=jr.key(0),
                dtype=header.get("dtype"),
                compute_dtype=header.get("compute_dtype"),
                checkpoint=checkpoint,
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"`path`: the header of {path!r} describes no valid model: {e}") from e
        try:
            model = eqx.tree_deserialise_leaves(f, skeleton)
        except (RuntimeError, ValueError, EOFError) as e:
            raise ValueError(f"`path`: the leaves in {path!r} do not fit the model its header describes: {e}") from e
        if f.read(1):
            raise ValueError(
                f"`path`: the leaves in {path!r} do not fit the model its header "
                "describes: expected the end of the file after the last leaf, got more data."
            )
        return model

    if hasattr(path, "read"):
        return read(path)
    with open(path, "rb") as f:
        return read(f)

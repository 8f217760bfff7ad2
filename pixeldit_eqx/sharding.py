"""Training and sampling on many devices, with JAX's own SPMD machinery.

A one-axis `jax.sharding.Mesh` over the devices; the batch split along that axis; the
training state either replicated on every device (data parallel) or split along the same
axis, FSDP-style (ZeRO-3: each device keeps a slice of every large parameter, Adam moment
and EMA array). The step is the single-device [`pixeldit_eqx.train.make_train_step`][]
compiled once with sharding constraints on its inputs and outputs: XLA's partitioner
inserts the collectives (the gradient all-reduce, or the parameter all-gathers and
gradient reduce-scatters of FSDP). Nothing here writes a `psum`, so the sharded step
computes the single-device step's numbers, up to the order of float32 sums.

```python
import jax.random as jr
from pixeldit_eqx import sharding, train

mesh = sharding.make_mesh()  # every device, one axis named "data"
optimizer = train.default_optimizer(1e-4)
state = train.init_train_state(model, optimizer, key=jr.key(0))
state = sharding.shard_state(state, mesh, strategy="fsdp")
step = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy="fsdp")
for images, labels in loader:  # numpy, global batch a multiple of the device count
    state, metrics = step(state, sharding.shard_batch((images, labels), mesh))
```

**The FSDP rule** ([`fsdp_spec`][]): an array is split along its largest dimension whose
size is divisible by the mesh axis size (on a tie, the first such dimension); arrays with
fewer than `min_size` elements (4096 by default), scalars, arrays with no divisible
dimension and PRNG keys are replicated. The rule reads shapes only, so Adam's moments and
the EMA are split exactly like the parameters they follow.

**Several processes, several hosts.** JAX's multi-controller runtime runs one process
per host (or per group of devices), each holding its own devices. Call
`jax.distributed.initialize(...)` first in every process (on CPU, with
`jax.config.update("jax_cpu_collectives_implementation", "gloo")` before it), build the
mesh over all devices (`make_mesh()`, the default), initialise the state with the same
key in every process, and feed each process its own part of every global batch. The
functions here then work unchanged: [`shard_state`][] builds each global array from the
shards a process holds (it checks that the processes agree on the PRNG keys and step),
[`shard_batch`][] and the step and sampler assemble the global batch with
`jax.make_array_from_process_local_data`. Sharded checkpoints, each process writing its
own shards, are [`pixeldit_eqx.checkpoint`][]'s. `docs/multi_host.md` has the recipe and
`examples/multi_process.py` runs it (2 processes x 4 CPU devices on one machine).

Reference: none (the PyTorch PixelDiT trains with Lightning's DDP/FSDP strategies). This
module replaces those with `jax.sharding`.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any, TYPE_CHECKING, TypeAlias

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from . import flow
from ._checks import check_choice, check_int, is_array_like, is_key
from ._custom_types import Array, Float, Int, Real
from ._optional import require
from .train import _in_place_variant, _Steps, _unshared, jit_step, make_train_step, TrainState


if TYPE_CHECKING:
    import optax
else:
    optax = require("optax", "train", "pixeldit_eqx.sharding")


__all__ = [
    "batch_sharding",
    "fsdp_spec",
    "make_mesh",
    "make_sharded_train_step",
    "shard_batch",
    "shard_state",
    "sharded_sample",
    "state_sharding",
]

#: A batch of examples of any one shape, `(B, *shape)`.
Batch: TypeAlias = Float[Array, "B *shape"]  # noqa: F821 (jaxtyping dims, not names)

_STRATEGIES = ("replicated", "fsdp")
_MIN_SIZE = 4096


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _check_mesh(mesh: Any, axis: Any) -> int:
    """The size of `axis` in `mesh`."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh`: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"`axis`: expected one of the mesh's axis names {tuple(mesh.axis_names)}, got {axis!r}.")
    return int(mesh.shape[axis])


def _is_global(x: Any) -> bool:
    """Whether `x` is a `jax.Array` spanning devices of other processes too."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _batch_size(tree: PyTree, name: str, size: int, *, scale: int = 1) -> int:
    """The common leading size of the array leaves of `tree`, checked divisible by `size`.

    `scale` multiplies the leading sizes of the leaves that are not global arrays first
    (the number of processes, for a batch of which each process holds its own part).
    """
    leaves = [x for x in jax.tree.leaves(tree) if is_array_like(x)]
    if not leaves:
        raise ValueError(f"`{name}`: expected at least one array with a leading batch dimension, got none.")
    sizes = set()
    for x in leaves:
        if len(x.shape) == 0:
            raise ValueError(f"`{name}`: expected arrays with a leading batch dimension, got a scalar.")
        sizes.add(x.shape[0] * (1 if _is_global(x) else scale))
    if len(sizes) != 1:
        raise ValueError(f"`{name}`: expected one leading batch size for all arrays, got sizes {sorted(sizes)}.")
    (batch,) = sizes
    if batch % size:
        raise ValueError(
            f"`{name}`: expected a batch size divisible by the size of the mesh axis ({size}), got batch size {batch}."
        )
    return batch


# ---------------------------------------------------------------------------------------
# Meshes and shardings
# ---------------------------------------------------------------------------------------


def make_mesh(num_devices: int | None = None, axis: str = "data") -> Mesh:
    """A one-axis device mesh, for the batch (and, with FSDP, the state) to be split over.

    The axis is of type `Auto`: shardings propagate through the program as the compiler
    sees fit, between the constraints this module places on inputs and outputs.

    **Arguments:**

    - `num_devices`: how many devices, the first `num_devices` of `jax.devices()`; default
        all of them (across all hosts after `jax.distributed.initialize()`: a multi-host
        run needs all of them).
    - `axis`: the name of the mesh axis.

    **Returns:**

    A `jax.sharding.Mesh` of shape `{axis: num_devices}`.
    """
    available = jax.device_count()
    if num_devices is None:
        num_devices = available
    num_devices = check_int("num_devices", num_devices, 1, maximum=available)  # the devices available
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"`axis`: expected a non-empty string, got {axis!r}.")
    return jax.make_mesh((num_devices,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """The sharding of a batch: the leading dimension split over `axis`, the rest whole.

    **Arguments:**

    - `mesh`: the device mesh.
    - `axis`: the mesh axis to split the batch over.

    **Returns:**

    `NamedSharding(mesh, PartitionSpec(axis))`.
    """
    _check_mesh(mesh, axis)
    return NamedSharding(mesh, P(axis))


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis: str = "data", *, min_size: int = _MIN_SIZE) -> P:
    """The FSDP rule: where one array of the training state is split.

    The largest dimension whose size is divisible by `axis_size` (on a tie, the first of
    them) is split over `axis`; arrays of fewer than `min_size` elements, scalars and
    arrays with no divisible dimension are replicated.

    **Arguments:**

    - `shape`: the array's shape.
    - `axis_size`: the size of the mesh axis, >= 1.
    - `axis`: the name of the mesh axis.
    - `min_size`: the smallest number of elements worth splitting, >= 0.

    **Returns:**

    A `PartitionSpec`: `P()` (replicated) or `P(None, ..., axis)`, of length at most
    `len(shape)`.

    **Example:**

    ```python
    fsdp_spec((128, 32), 8)  # P("data"): 16 rows per device
    fsdp_spec((1, 24, 32), 8)  # P(None, "data")
    fsdp_spec((32,), 8)  # P(): too small
    ```
    """
    axis_size = check_int("axis_size", axis_size, 1)
    min_size = check_int("min_size", min_size, 0)
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0 or int(np.prod(shape)) < min_size:
        return P()
    divisible = [i for i, d in enumerate(shape) if d >= axis_size and d % axis_size == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda i: (shape[i], -i))
    return P(*([None] * dim), axis)


def _layout(mesh: Mesh, strategy: str, axis: str, min_size: int) -> Callable[[Any], NamedSharding]:
    """The sharding of one array of a state, as a function of its shape and dtype."""
    size = _check_mesh(mesh, axis)
    check_choice("strategy", strategy, _STRATEGIES)
    min_size = check_int("min_size", min_size, 0)
    replicated = NamedSharding(mesh, P())

    def layout(x: Any) -> NamedSharding:
        if strategy == "replicated" or is_key(x):
            return replicated
        return NamedSharding(mesh, fsdp_spec(x.shape, size, axis, min_size=min_size))

    return layout


def state_sharding(
    state: PyTree,
    mesh: Mesh,
    *,
    strategy: str = "replicated",
    axis: str = "data",
    min_size: int = _MIN_SIZE,
) -> PyTree[NamedSharding | None]:
    """The sharding of every array of a training state (or of a model, or any pytree).

    **Arguments:**

    - `state`: a [`pixeldit_eqx.train.TrainState`][], a model, any pytree. Its array
        leaves may also be `jax.ShapeDtypeStruct`s (from `eqx.filter_eval_shape`), to
        plan shardings before anything is allocated.
    - `mesh`: the device mesh.
    - `strategy`: `"replicated"` (every array whole on every device: data parallel) or
        `"fsdp"` (arrays split by [`fsdp_spec`][]; PRNG keys replicated).
    - `axis`: the mesh axis to split over.
    - `min_size`: FSDP only: arrays of fewer elements stay replicated.

    **Returns:**

    A pytree of the structure of `state`: a `NamedSharding` at every array leaf, `None`
    at every other leaf.
    """
    layout = _layout(mesh, strategy, axis, min_size)
    return jax.tree.map(lambda x: layout(x) if is_array_like(x) else None, state)


def shard_state(
    state: PyTree,
    mesh: Mesh,
    *,
    strategy: str = "replicated",
    axis: str = "data",
    min_size: int = _MIN_SIZE,
) -> PyTree:
    """Places a training state (or a model) on the mesh, as [`state_sharding`][] says.

    Call it once, before the first step; the sharded step keeps the layout. The arrays
    are copied: a step that donates the sharded state leaves `state` (and the model it
    was built from) intact. An array the state holds twice (a frozen leaf the model and
    the EMA share) is placed once and stays shared, as the steps keep it.

    Across several processes every process must pass the same values (initialise with
    the same key); each builds the global arrays from the shards its own devices hold
    (`jax.make_array_from_callback`: nothing is placed on another process's devices),
    and arrays that are already global are re-laid out by a compiled copy. The PRNG keys
    and integer scalars (the step) are compared across processes first: `ValueError`
    when they differ.

    Inside `jit` it constrains the layout instead, so that a state too large for one
    device can be created already split:

    ```python
    def init(key):
        model = pixeldit_eqx.PixelDiT(..., key=key)
        state = train.init_train_state(model, optimizer, key=key)
        return sharding.shard_state(state, mesh, strategy="fsdp")

    state = eqx.filter_jit(init)(jr.key(0))  # each device allocates its slices only
    ```

    **Arguments:**

    - `state`: a [`pixeldit_eqx.train.TrainState`][], a model, any pytree.
    - `mesh`, `strategy`, `axis`, `min_size`: as for [`state_sharding`][].

    **Returns:**

    `state`, its arrays now global `jax.Array`s laid out over the mesh; the other leaves
    unchanged.
    """
    arrays, rest = eqx.partition(state, eqx.is_array)
    shardings = state_sharding(arrays, mesh, strategy=strategy, axis=axis, min_size=min_size)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays)):
        arrays = jax.tree.map(jax.lax.with_sharding_constraint, arrays, shardings)
        return eqx.combine(arrays, rest)
    single = jax.process_count() == 1
    if not single:
        _check_processes_agree(arrays)
    # An array held twice (a frozen leaf the model and the EMA share) is placed once and
    # stays shared: the steps pass it through, and its memory is not doubled.
    placed: dict[int, jax.Array] = {}

    def once(x: jax.Array, sharding: NamedSharding) -> jax.Array:
        if id(x) not in placed:
            # Copied first: `device_put` may reuse a buffer of the input for one of the
            # output's shards (even with `may_alias=False`, jax 0.10), and a step that
            # donates the sharded state would then delete arrays of the input (the
            # user's model, say).
            placed[id(x)] = jax.device_put(jnp.copy(x), sharding) if single else _place(x, sharding)
        return placed[id(x)]

    return eqx.combine(jax.tree.map(once, arrays, shardings), rest)


def _place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`x` as a global array laid out by `sharding`, built from this process's shards."""
    if _is_global(x):
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if is_key(x):
        return jax.make_array_from_callback(x.shape, sharding, lambda index: jnp.copy(x[index]))
    host = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: host[index])


def _check_processes_agree(arrays: PyTree) -> None:
    """Raises unless every process holds the same PRNG keys and integer scalars."""
    named = []
    for path, x in jax.tree_util.tree_leaves_with_path(arrays):
        if _is_global(x):
            continue  # one array already: nothing to disagree on
        if is_key(x):
            x = jax.random.key_data(x)
        elif x.ndim or not jnp.issubdtype(x.dtype, jnp.integer):
            continue
        named.append((jax.tree_util.keystr(path), np.asarray(x).reshape(-1)))
    if not named:
        return
    mine = np.concatenate([np.ascontiguousarray(v).view(np.uint8) for _, v in named])
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    for process, theirs in enumerate(everyone):
        if np.array_equal(theirs, mine):
            continue
        start = 0
        for path, value in named:
            stop = start + value.nbytes
            if not np.array_equal(theirs[start:stop], mine[start:stop]):
                other = theirs[start:stop].view(value.dtype)
                raise ValueError(
                    f"`state`: expected the same PRNG keys and steps in every process, got {path} = "
                    f"{value.tolist()} in process {jax.process_index()} and {other.tolist()} in process {process} "
                    "(initialise the state with the same key everywhere)."
                )
            start = stop


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: str = "data") -> PyTree:
    """Places a batch on the mesh, every array split along its leading dimension.

    In one process, `batch` is the whole (global) batch: numpy or JAX arrays. Across
    several processes (after `jax.distributed.initialize()`), each process passes its
    own part of the global batch (its examples: process `i` of `n` holds rows
    `i * B / n` to `(i + 1) * B / n` of a global batch of `B` when the mesh lists the
    devices in process order, as `make_mesh` does), and the global arrays are assembled
    with `jax.make_array_from_process_local_data`; leaves that are global arrays already
    are kept.

    **Arguments:**

    - `batch`: a pytree of arrays sharing a leading batch dimension (e.g. `(images,
        labels)`); `None` leaves are kept.
    - `mesh`: the device mesh.
    - `axis`: the mesh axis to split over.

    **Returns:**

    The batch as global `jax.Array`s with sharding [`batch_sharding`][]`(mesh, axis)`.

    Raises `ValueError` when the global batch size is not divisible by the size of `axis`.
    """
    size = _check_mesh(mesh, axis)
    processes = jax.process_count()
    _batch_size(batch, "batch", size, scale=processes)
    sharding = NamedSharding(mesh, P(axis))
    if processes == 1:
        return jax.device_put(batch, sharding)
    return _assemble(batch, sharding)


def _assemble(batch: PyTree, sharding: NamedSharding) -> PyTree:
    """Across processes: each array leaf not yet global is this process's part of it."""

    def one(x: Any) -> Any:
        if not eqx.is_array(x) or _is_global(x):
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, batch)


def _constrain_partition(tree: PyTree, spec: PyTree, sharding_of: Callable[[Any], NamedSharding]) -> PyTree:
    """`_constrain` on the leaves of `tree` that `spec` selects; the others unchanged."""
    chosen, rest = eqx.partition(tree, spec)
    return eqx.combine(_constrain(chosen, sharding_of), rest)


def _constrain(tree: PyTree, sharding_of: Callable[[Any], NamedSharding]) -> PyTree:
    """`with_sharding_constraint` on every array leaf of `tree` (inside `jit`)."""

    def one(x: Any) -> Any:
        return jax.lax.with_sharding_constraint(x, sharding_of(x)) if eqx.is_array(x) else x

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def make_sharded_train_step(
    loss_fn: Callable[[Any, Any, Any], Float[Array, ""]],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    strategy: str = "replicated",
    ema_decay: float | Callable[[Int[Array, ""]], Real[Array, ""]] = 0.999,
    donate: bool = True,
    axis: str = "data",
    min_size: int = _MIN_SIZE,
    steps_per_call: int | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """The train step of [`pixeldit_eqx.train.make_train_step`][], compiled for a mesh.

    One `eqx.filter_jit` around the pure step, with `with_sharding_constraint` on the
    way in and out: the batch split over `axis`, the state laid out as
    [`state_sharding`][]`(state, mesh, strategy=strategy)` says, the metrics replicated.
    The gradient reduction over the batch split is XLA's: data-parallel, an all-reduce;
    FSDP, the parameters gathered for the forward and backward passes and the gradients
    reduce-scattered back to their slices. The numbers are those of the single-device
    step, up to the order of float32 sums.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key) -> scalar`, the loss averaged over the
        batch (e.g. [`pixeldit_eqx.train.c2i_loss`][]).
    - `optimizer`: the optax transformation the state was initialised with.
    - `mesh`: the device mesh (e.g. [`make_mesh`][]`()`).
    - `strategy`: `"replicated"` or `"fsdp"`, as for [`state_sharding`][].
    - `ema_decay`: as for `make_train_step`.
    - `donate`: let the step reuse the buffers of the state it is given (that state is
        then deleted: use the returned one). The batch is never donated.
    - `axis`, `min_size`: as for [`state_sharding`][].
    - `steps_per_call`: `None` for one step per call; a count >= 1 compiles that many
        steps into one call, as [`pixeldit_eqx.train.jit_steps`][] does (on CPU a call's
        temporary buffers are mapped afresh, so fewer calls fault fewer pages).
    - `compiler_options`: as for [`pixeldit_eqx.train.jit_steps`][].

    **Returns:**

    `step(state, batch) -> (state, metrics)`, compiled on its first call; with
    `steps_per_call`, `step(state, batches) -> (state, metrics)` for a list of 1 to
    `steps_per_call` batches, metrics stacked, one entry per step (what
    [`pixeldit_eqx.train.fit`][] calls once per `steps_per_call` steps). Pass a state
    placed by [`shard_state`][] with the same `strategy` (so that the layout it arrives
    in is the one it leaves in) and a batch from [`shard_batch`][] (numpy arrays work
    too, at the cost of a host-to-device copy inside the call; across processes, as for
    `shard_batch`, each process's own part of the batch). The global batch size must be
    divisible by the size of `axis` (`ValueError` otherwise).
    """
    size = _check_mesh(mesh, axis)
    layout = _layout(mesh, strategy, axis, min_size)
    data = NamedSharding(mesh, P(axis))
    replicated = NamedSharding(mesh, P())
    if strategy == "fsdp":
        # Gather the parameters where the loss uses them: XLA all-gathers each slice for
        # the forward and backward passes and reduce-scatters its gradient back to the
        # slice. Without this, the partitioner may carry the parameters' layout into the
        # activations instead of the batch split (correct, but slow).
        def gathered_loss(model: Any, batch: Any, key: Any) -> Float[Array, ""]:
            return loss_fn(_constrain(model, lambda _: replicated), batch, key)

        step = make_train_step(gathered_loss, optimizer, ema_decay=ema_decay)
    else:
        step = make_train_step(loss_fn, optimizer, ema_decay=ema_decay)

    body = _in_place_variant(step) if donate else step

    def sharded(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        # Arrays held twice (frozen leaves the model and the EMA share) stay as they came:
        # the compiled step passes them through untouched, never copied.
        once = _unshared(state)
        batch = _constrain(batch, lambda _: data)
        state = _constrain_partition(state, once, layout)
        state, metrics = body(state, batch)
        return _constrain_partition(state, once, layout), _constrain(metrics, lambda _: replicated)

    def prepare(name: str, batch: Any) -> Any:
        processes = jax.process_count()
        _batch_size(batch, name, size, scale=processes)
        return _assemble(batch, data) if processes > 1 else batch

    if steps_per_call is not None:
        return _Steps(sharded, steps_per_call, donate, prepare, compiler_options=compiler_options)
    compiled = jit_step(sharded, donate=donate, compiler_options=compiler_options)

    def sharded_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        return compiled(state, prepare("batch", batch))

    return sharded_step


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


@eqx.filter_jit
def _sample_batch(sampler: Any, noise: Any, cond: Any, mesh: Mesh, axis: str) -> PyTree[Array]:
    data = NamedSharding(mesh, P(axis))
    replicated = NamedSharding(mesh, P())
    # A model sharded FSDP-style is gathered whole where it is used (as in training).
    sampler = _constrain(sampler, lambda _: replicated)
    noise = _constrain(noise, lambda _: data)
    cond = _constrain(cond, lambda _: data)
    out = jax.vmap(sampler)(noise, cond)
    return _constrain(out, lambda _: data)


def sharded_sample(
    sampler: Any,
    noise: Batch,
    cond: PyTree,
    mesh: Mesh,
    *,
    axis: str = "data",
    **sample_options: Any,
) -> PyTree[Array]:
    """A per-example sampler over a batch split across the mesh.

    `jax.vmap(sampler)(noise, cond)` under one `eqx.filter_jit`, the noise, the conditions
    and the samples split over `axis`: each device integrates its own examples. The
    sampler's arrays (a model, replicated or FSDP-sharded by [`shard_state`][]) are
    gathered whole on every device. Compiled programs are cached across calls with the same
    shapes and the same sampler settings.

    The sampler is a pytree, so that its model is an input of the compiled program and not
    a constant baked into it: `eqx.Partial(flow.sample, model, num_steps=50, ...)` (or
    `pixeldit_eqx.sample`, or any `eqx.Module` whose `__call__(noise, cond)` samples one
    example). A plain `lambda` closing over a model works but compiles anew for every
    lambda and holds the model as a constant.

    Across several processes, `noise` and `cond` are as for [`shard_batch`][]: global
    arrays, or each process's own part of the batch. The samples come back as a global
    array; `jax.experimental.multihost_utils.process_allgather(samples)` gives every
    process all of them.

    **Arguments:**

    - `sampler`: `sampler(noise, cond)` for one example, returning its sample (or any
        pytree of arrays: `(sample, trajectory)` with `return_trajectory=True`).
    - `noise`: the starting points `(B, *shape)`, `B` divisible by the size of `axis`
        (across processes, `B` counts the examples of all processes).
    - `cond`: the conditions, a pytree of arrays with leading dimension `B` (labels
        `(B,)`, say).
    - `mesh`: the device mesh.
    - `axis`: the mesh axis to split the batch over.
    - `sample_options`: deprecated: `sharded_sample(velocity_fn, noise, cond, mesh,
        num_steps=..., ...)` with `flow.sample`'s keywords still samples with
        `flow.sample` (and warns); pass `eqx.Partial(flow.sample, velocity_fn, num_steps=...)`.

    **Returns:**

    What `sampler` returns, batched: the samples `(B, *shape)`, split over `axis`.

    **Example:**

    ```python
    mesh = sharding.make_mesh()
    noise = jax.random.normal(key, (64, 3, 256, 256))
    labels = jnp.arange(64) % 1000
    sampler = eqx.Partial(flow.sample, state.ema, num_steps=50, guidance=2.75, null_cond=1000)
    images = sharding.sharded_sample(sampler, noise, labels, mesh)
    ```
    """
    if sample_options:
        warnings.warn(
            "sharded_sample(velocity_fn, noise, cond, mesh, num_steps=..., ...) is deprecated: pass a per-example "
            "sampler, sharded_sample(eqx.Partial(flow.sample, velocity_fn, num_steps=..., ...), noise, cond, mesh).",
            DeprecationWarning,
            stacklevel=2,
        )
        sampler = eqx.Partial(flow.sample, sampler, **sample_options)
    if not callable(sampler):
        raise ValueError(f"`sampler` must be callable as sampler(noise, cond), got {type(sampler).__name__}.")
    size = _check_mesh(mesh, axis)
    processes = jax.process_count()
    batch = _batch_size(noise, "noise", size, scale=processes)
    cond_sizes = {
        x.shape[0] * (1 if _is_global(x) else processes) if len(x.shape) else None
        for x in jax.tree.leaves(cond)
        if is_array_like(x)
    }
    if cond_sizes and cond_sizes != {batch}:
        raise ValueError(
            f"`cond`: expected arrays with leading dimension {batch} (the batch size of `noise`), got "
            f"{sorted(cond_sizes, key=str)}."
        )
    if processes > 1:
        data = NamedSharding(mesh, P(axis))
        noise, cond = _assemble(noise, data), _assemble(cond, data)
    return _sample_batch(sampler, noise, cond, mesh, axis)

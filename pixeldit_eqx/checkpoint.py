"""Sharded, asynchronous checkpoints of a training state, with Orbax.

The successor of [`pixeldit_eqx.train.save_checkpoint`][] for runs whose state is laid
out over a mesh ([`pixeldit_eqx.sharding`][]), in one process or several: every process
writes only the shards it holds (Orbax's OCDBT format, one folder per step), saving runs
in the background while training goes on, and restoring places every array directly
onto the shardings asked for (e.g. those of [`pixeldit_eqx.sharding.state_sharding`][]
for a state from `eqx.filter_eval_shape`), so no device ever holds the whole state. The
mesh, strategy and number of processes at restore may differ from those at save.

```python
from pixeldit_eqx import checkpoint, sharding

with checkpoint.Checkpointer("/shared/run1", max_to_keep=3) as checkpoints:
    like = eqx.filter_eval_shape(init)  # the state's structure, nothing allocated
    shardings = sharding.state_sharding(like, mesh, strategy="fsdp")
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(like, shardings=shardings)  # resume
    for images, labels in loader:
        state, metrics = step(state, sharding.shard_batch((images, labels), mesh))
        if int(state.step) % 1000 == 0:
            checkpoints.save(state)  # returns once the arrays are copied to the host
```

Every process makes the same calls (Orbax synchronises them), with a `directory` all of
them can reach. PRNG keys are stored as their `jax.random.key_data` and re-wrapped as
typed keys of the implementation of those in the state restored into. Requires the
`orbax` extra (`pip install pixeldit-eqx[orbax]`).
"""

import os
from typing import Any, TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from ._checks import check_int, is_array_like, is_key
from ._compat import single_device_sharding
from ._optional import require


if TYPE_CHECKING:
    import orbax.checkpoint as ocp
else:
    ocp = require("orbax.checkpoint", "orbax", "pixeldit_eqx.checkpoint")

__all__ = ["Checkpointer"]


def _key_impl(x: Any) -> Any:
    # `jr.key_impl` needs a concrete key: a zero key of the same dtype stands in.
    return jr.key_impl(jnp.zeros((), x.dtype))


#: Replicated arrays smaller than this per replica are written whole by one replica.
#: Orbax splits the writing of a replicated array among its replicas by slicing it on
#: the devices, one small program compiled per slice; for the many small arrays of a
#: training state that compiling costs more than the parallel write saves (measured on
#: the first save of `examples/multi_process.py`'s FSDP state: `docs/performance.md`).
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, replica-parallel writing only for large slices."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _name(path: tuple) -> str:
    """A key path as `a.b.0.c`, the same for an attribute and a dict key of that name."""
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


class Checkpointer:
    """Saves and restores training states in `directory`, one checkpoint per step.

    A thin layer over `orbax.checkpoint.CheckpointManager` that knows a
    [`pixeldit_eqx.train.TrainState`][] (or any pytree with array leaves): only the
    arrays are stored, PRNG keys as their key data; the other leaves (the model's
    configuration) come from the state restored into.

    **Arguments:**

    - `directory`: the folder of the run's checkpoints (created if missing), the same
        for every process and reachable by all of them.
    - `max_to_keep`: keep only this many most recent checkpoints; `None` keeps all.
    - `async_save`: save in a background thread: [`save`][] returns once the arrays are
        copied off the devices, and the files are written while training goes on.
        [`wait`][] (or [`close`][], or leaving a `with` block) waits for the write.

    Use it as a context manager, or call [`close`][] at the end.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = True):
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise ValueError(f"`directory`: expected a non-empty path, got {directory!r}.")
        max_to_keep = check_int("max_to_keep", max_to_keep, 1, none_ok=True)
        if not isinstance(async_save, bool):
            raise ValueError(f"`async_save`: expected a bool, got {async_save!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handler())

    # --- Saving -------------------------------------------------------------------------

    def save(self, state: PyTree, *, step: int | None = None) -> None:
        """Starts saving `state` as the checkpoint of `step`.

        Every process calls it with its part of the same (global) state. With
        `async_save`, it returns once the arrays are copied to host memory: the state
        may then be donated to the next train step while the files are written. A save
        waits for the previous one to finish first.

        **Arguments:**

        - `state`: a [`pixeldit_eqx.train.TrainState`][] (sharded or not), or any pytree.
        - `step`: the step to file it under; default `int(state.step)`.

        Raises `ValueError` when `step` is already saved.
        """
        if step is None:
            if not is_array_like(getattr(state, "step", None)):
                raise ValueError(f"`step`: expected an integer (the state has no `step` array), got {step!r}.")
            step = int(state.step)
        step = check_int("step", step, 0)
        saved = sorted(self._manager.all_steps())  # being written included
        if step in saved:
            raise ValueError(f"`step`: expected a step not saved yet, got {step} (saved: {saved}).")
        arrays, _ = eqx.partition(state, eqx.is_array)
        if not jax.tree.leaves(arrays):
            raise ValueError("`state`: expected a pytree with array leaves, got none.")
        arrays = jax.tree.map(lambda x: jr.key_data(x) if is_key(x) else x, arrays)
        self._manager.save(step, args=ocp.args.PyTreeSave(arrays))

    def wait(self) -> None:
        """Blocks until the checkpoint being written (if any) is complete on disk."""
        self._manager.wait_until_finished()

    def saving(self) -> bool:
        """Whether a checkpoint is being written in the background."""
        return self._manager.is_saving_in_progress()

    # --- Restoring ----------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints in `directory` (read from it), in increasing order.

        A checkpoint still being written is not listed until it is complete on disk.
        """
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The last complete checkpoint's step, or `None` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, like_state: PyTree, *, step: int | None = None, shardings: PyTree | None = None) -> PyTree:
        """Reads a checkpoint, each array placed directly onto its sharding.

        **Arguments:**

        - `like_state`: a state of the saved structure, shapes and dtypes: a fresh one,
            or (better: nothing is allocated) its `eqx.filter_eval_shape`. Its non-array
            leaves are those of the result.
        - `step`: which checkpoint; default the latest.
        - `shardings`: where every array goes, a pytree of the structure of
            `like_state` with a `jax.sharding.Sharding` at every array leaf, e.g.
            `sharding.state_sharding(like_state, mesh, strategy="fsdp")` (any mesh:
            another device count, another strategy than the run saved with). Default:
            the shardings of `like_state`'s arrays, and one local device for those that
            have none.

        **Returns:**

        The saved state, its arrays global `jax.Array`s on `shardings`, PRNG keys typed
        keys of the implementation of those of `like_state`.

        Raises `ValueError` when there is no such checkpoint or it does not fit
        `like_state`.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"`directory`: expected a saved checkpoint in {self.directory!r}, found none.")
            step = steps[-1]
        step = check_int("step", step, 0)
        if step not in steps:
            raise ValueError(f"`step`: expected one of the saved steps {steps}, got {step}.")
        like, rest = eqx.partition(like_state, is_array_like)
        if shardings is None:
            shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), like)
        else:
            try:
                shardings = jax.tree.map(lambda _, s: s, like, shardings)
            except ValueError as e:
                raise ValueError(f"`shardings`: expected the structure of `like_state`: {e}") from e
        device = single_device_sharding(jax.local_devices()[0])

        def abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
            sharding = device if sharding is None else sharding
            if not isinstance(sharding, jax.sharding.Sharding):
                raise ValueError(f"`shardings`: expected a jax.sharding.Sharding per array, got {sharding!r}.")
            if is_key(x):
                data = jax.eval_shape(jr.key_data, x)
                return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        targets = jax.tree.map(abstract, like, shardings)
        # Checked against the stored metadata first: a restore that fails half-way leaves
        # Orbax's reads pending.
        stored = {
            _name(p): (tuple(m.shape), np.dtype(m.dtype))
            for p, m in jax.tree_util.tree_leaves_with_path(self._manager.item_metadata(step))
        }
        wanted = {
            _name(p): (tuple(t.shape), np.dtype(t.dtype)) for p, t in jax.tree_util.tree_leaves_with_path(targets)
        }
        problems = [f"{k} missing from the checkpoint" for k in wanted if k not in stored]
        problems += [f"{k} in the checkpoint, not in `like_state`" for k in stored if k not in wanted]
        problems += [
            f"{k} expected {wanted[k][1]}{list(wanted[k][0])}, stored {stored[k][1]}{list(stored[k][0])}"
            for k in wanted
            if k in stored and stored[k] != wanted[k]
        ]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(
                f"`like_state`: the checkpoint of step {step} in {self.directory!r} does not fit it: "
                + "; ".join(problems[:5])
                + more
                + "."
            )
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
            raw = self._manager.restore(step, args=ocp.args.PyTreeRestore(targets, restore_args=restore_args))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"`like_state`: the checkpoint of step {step} in {self.directory!r} does not fit it: {e}"
            ) from e
        raw_leaves, treedef = jax.tree.flatten(raw)
        like_leaves = jax.tree.leaves(like)
        target_leaves = jax.tree.leaves(targets)
        if len(raw_leaves) != len(like_leaves):
            raise ValueError(
                f"`like_state`: the checkpoint of step {step} in {self.directory!r} does not fit it: expected "
                f"{len(like_leaves)} arrays, got {len(raw_leaves)}."
            )
        leaves = []
        for path_x, x, want in zip(jax.tree_util.tree_leaves_with_path(targets), raw_leaves, target_leaves):
            if (x.shape, x.dtype) != (want.shape, want.dtype):
                raise ValueError(
                    f"`like_state`: the checkpoint of step {step} in {self.directory!r} does not fit it: "
                    f"{jax.tree_util.keystr(path_x[0])} expected {want.dtype}{list(want.shape)}, "
                    f"got {x.dtype}{list(x.shape)}."
                )
            leaves.append(x)
        leaves = [jr.wrap_key_data(x, impl=_key_impl(y)) if is_key(y) else x for x, y in zip(leaves, like_leaves)]
        return eqx.combine(jax.tree.unflatten(treedef, leaves), rest)

    # --- Lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the checkpoint being written, then releases Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

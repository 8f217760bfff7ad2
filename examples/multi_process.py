"""Train on several processes with JAX's multi-controller runtime, with sharded checkpoints.

One process per host is how JAX runs on several machines: every process runs this same
program, holds its own devices, reads its own part of every global batch, and writes
its own shards of every checkpoint. This script runs that recipe on one machine: by
default it starts 2 processes with 4 simulated CPU devices each, connected by
`jax.distributed` through a coordinator on localhost and CPU collectives (gloo), and
trains a tiny PixelDiT on the 8-device mesh, data parallel and FSDP. For each strategy
it saves a checkpoint in the background mid-run, samples with the sharded sampler, then
resumes from the checkpoint and checks that the resumed run ends bit-identical to the
uninterrupted one.

```bash
python examples/multi_process.py                               # 2 processes x 4 CPU devices
python examples/multi_process.py --processes 1 --devices 8     # the same run in one process
```

The first command is a launcher: it picks a free port and starts one worker per process,

```bash
python examples/multi_process.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 --devices 4
python examples/multi_process.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 1 --devices 4
```

and fails loudly: when a worker dies, it stops the others and exits non-zero at once
(a worker left alone would wait in a collective for its peer), and after `--timeout`
seconds it stops them all. **On several hosts**, run the worker command on every host
(`--process-id` 0 to n-1, the coordinator being host 0's address and a free port there,
`--devices 0` for the real devices, `--out` a folder all hosts can reach); see
`docs/multi_host.md`.

With `--out DIR`, process 0 writes `DIR/results.npz` (losses, the final states gathered,
the samples, the resumed states, the save timings) and the checkpoints go to
`DIR/checkpoints/<strategy>/`; `tests/test_multi_process.py` compares the 2-process run
against the 1-process one. `--restore-check DIR` also restores another run's FSDP
checkpoint onto a 4-device mesh, replicated and FSDP, into the results.
"""

# ruff: noqa: E402 (jax is imported after XLA_FLAGS is set)

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _line(text: str) -> None:
    """One write of a whole line: the processes share the launcher's stdout, and a separate
    write of the newline (unbuffered output) lets two processes' lines run together."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="launcher: processes to start on this machine")
    p.add_argument("--timeout", type=float, default=600.0, help="launcher: seconds before every worker is stopped")
    p.add_argument("--coordinator", default=None, help="worker: the coordinator's host:port (process 0's host)")
    p.add_argument("--num-processes", type=int, default=1, help="worker: the number of processes in all")
    p.add_argument("--process-id", type=int, default=None, help="worker: this process's index; makes this a worker")
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process; 0 for the real devices")
    p.add_argument("--steps", type=int, default=4, help="training steps per strategy")
    p.add_argument("--save-at", type=int, default=2, help="the step after which a checkpoint is saved")
    p.add_argument("--batch", type=int, default=16, help="global batch size, a multiple of the device count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.npz and checkpoints (default: a temporary one)")
    p.add_argument("--restore-check", default=None, help="restore this run folder's FSDP checkpoint on 4 devices")
    p.add_argument(
        "--different-keys", action="store_true", help="a mistake, to see it caught: a different key in each process"
    )
    args = p.parse_args(argv)
    if not 0 < args.save_at < args.steps:
        p.error(f"--save-at must lie in [1, --steps), got {args.save_at}")
    return args


# ---------------------------------------------------------------------------------------
# The launcher: one worker process per simulated host, on this machine
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Starts `args.processes` workers and waits for all; stops all when one fails."""
    port = free_port()
    if args.out is None:  # one folder for all: the checkpoints are written together
        argv = [*argv, "--out", tempfile.mkdtemp(prefix="pixeldit_multi_process_")]
    procs: list[subprocess.Popen] = []

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # A launcher told to stop (SIGTERM) stops its workers first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for i in range(args.processes):
            command = [sys.executable, os.path.abspath(__file__), *argv]
            command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.processes)]
            command += ["--process-id", str(i)]
            procs.append(subprocess.Popen(command))
            _line(f"[launcher] process {i} pid {procs[-1].pid}: {' '.join(command[1:])}")
        start = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                _line(f"[launcher] FAILED: process {i} exited with code {code}; stopping the others")
                return 1
            if all(c == 0 for c in codes):
                _line(f"[launcher] all {len(procs)} processes finished in {time.monotonic() - start:.1f} s")
                return 0
            if time.monotonic() - start > args.timeout:
                _line(f"[launcher] FAILED: timed out after {args.timeout:.0f} s; stopping every process")
                return 1
            time.sleep(0.1)
    finally:
        stop_all()


# ---------------------------------------------------------------------------------------
# The worker: what every process (every host) runs
# ---------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    if args.devices:
        # Before jax is imported: XLA reads the flag when it creates the CPU backend.
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    if args.num_processes > 1:
        # CPU devices of different processes talk through gloo (GPUs use NCCL, TPUs ICI).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    try:
        train_all(args)
    finally:
        if args.num_processes > 1:
            jax.distributed.shutdown()


def train_all(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("pixeldit_eqx") is None:  # a checkout, not installed
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import pixeldit_eqx
    from pixeldit_eqx import checkpoint, sharding, train

    me, processes = jax.process_index(), jax.process_count()

    t0 = time.perf_counter()

    def say(message: str) -> None:
        _line(f"[process {me}] {time.perf_counter() - t0:6.1f} s  {message}")

    mesh = sharding.make_mesh()  # every device of every process
    say(
        f"ready: {processes} process(es), {jax.local_device_count()} of {jax.device_count()} devices; mesh {dict(mesh.shape)}"
    )
    num_classes, image = 10, (3, 8, 8)
    model = pixeldit_eqx.PixelDiT(
        in_channels=image[0],
        num_groups=2,
        hidden_size=32,
        pixel_hidden_size=8,
        patch_depth=1,
        pixel_depth=1,
        patch_size=4,
        num_classes=num_classes,
        key=jr.key(args.seed),  # the same key, so the same model, in every process
    )
    # Adam with a large epsilon: the update is then a smooth function of the gradient,
    # and the float32 round-off of the sharded sums stays round-off in the parameters.
    optimizer = train.default_optimizer(1e-3, eps=1e-3)
    rows = slice(me * args.batch // processes, (me + 1) * args.batch // processes)

    def local_batch(i: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of global batch `i` (a data loader would read only these)."""
        rng = np.random.default_rng([args.seed, i])
        images = rng.standard_normal((args.batch, *image)).astype(np.float32)
        labels = rng.integers(0, num_classes, size=args.batch).astype(np.int32)
        return images[rows], labels[rows]

    replicated = NamedSharding(mesh, P())

    @jax.jit
    def to_replicated(tree):
        return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: replicated, tree))

    def gather(state) -> dict[str, np.ndarray]:
        """Every array of `state`, whole, in every process (PRNG keys as key data)."""
        arrays = eqx.filter(state, eqx.is_array)
        arrays = jax.tree.map(lambda x: jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, arrays)
        whole = to_replicated(arrays)
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(whole)}

    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="pixeldit_multi_process_")).resolve()
    results: dict[str, np.ndarray] = {}

    def init_state():
        seed = args.seed + 1 + (me if args.different_keys else 0)
        return train.init_train_state(model, optimizer, key=jr.key(seed))

    like = eqx.filter_eval_shape(init_state)  # structure, shapes, dtypes; nothing allocated
    for strategy in ("replicated", "fsdp"):
        # Built from the shards each process holds; the processes' keys and steps are
        # compared first.
        state = sharding.shard_state(init_state(), mesh, strategy=strategy)
        step = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy=strategy)
        say(f"{strategy}: state placed")
        losses = []
        with checkpoint.Checkpointer(out / "checkpoints" / strategy) as checkpoints:
            for i in range(args.steps):
                if i == args.save_at:
                    jax.block_until_ready(state)
                    start = time.perf_counter()
                    checkpoints.save(state)  # in the background: the loop goes on at once
                    save_call = time.perf_counter() - start
                    saving = checkpoints.saving()
                # This process's rows become its shards of the global batch.
                state, metrics = step(state, sharding.shard_batch(local_batch(i), mesh))
                losses.append(metrics["loss"])
                if i == 0:
                    jax.block_until_ready(state)
                    say(f"{strategy}: first step done")
            jax.block_until_ready(state)
            start = time.perf_counter()
            checkpoints.wait()
            wait = time.perf_counter() - start
            say(
                f"{strategy}: losses {[round(float(x), 6) for x in losses]}; save returned in {save_call:.3f} s "
                f"(still writing: {saving}), the write then took {wait:.3f} s more"
            )
            final = gather(state)
            say(f"{strategy}: gathered")

            noise = np.asarray(jr.normal(jr.key(args.seed + 2), (args.batch, *image)))[rows]
            labels = (np.arange(args.batch, dtype=np.int32) % num_classes)[rows]
            sampler = eqx.Partial(pixeldit_eqx.flow.sample, state.ema, num_steps=3, null_cond=num_classes)
            samples = sharding.sharded_sample(sampler, noise, labels, mesh)
            samples = np.asarray(multihost_utils.process_allgather(samples, tiled=True))
            say(f"{strategy}: sampled")

            # Resume: the checkpoint restored straight onto the shardings of the run.
            shardings = sharding.state_sharding(like, mesh, strategy=strategy)
            restored = checkpoints.restore(like, step=args.save_at, shardings=shardings)
            placed = jax.tree.map(lambda x: x.sharding, eqx.filter(restored, eqx.is_array))
            if jax.tree.leaves(placed) != jax.tree.leaves(shardings):
                raise RuntimeError("the restored state is not on the shardings asked for")
            at_save = gather(restored)
            say(f"{strategy}: restored")
            for i in range(args.save_at, args.steps):
                restored, _ = step(restored, local_batch(i))  # numpy rows: the step assembles them alike
            resumed = gather(restored)
            # The same steps again from the checkpoint, all in one call (`steps_per_call`):
            # each batch this process's rows, assembled alike.
            rest = list(range(args.save_at, args.steps))
            several = sharding.make_sharded_train_step(
                train.c2i_loss, optimizer, mesh, strategy=strategy, steps_per_call=max(1, len(rest))
            )
            again = checkpoints.restore(like, step=args.save_at, shardings=shardings)
            if rest:
                again, _ = several(again, [local_batch(i) for i in rest])
            in_one_call = gather(again)
            say(f"{strategy}: resumed again, {len(rest)} steps in one call")
        same = all(np.array_equal(resumed[k], final[k]) for k in final)
        say(f"{strategy}: resumed from step {args.save_at}, bit-identical to the uninterrupted run: {same}")
        results[f"{strategy}/losses"] = np.asarray(jax.device_get(losses), dtype=np.float32)
        results[f"{strategy}/samples"] = samples
        results[f"{strategy}/timing"] = np.asarray([save_call, wait, float(saving)])
        for name, tree in (("final", final), ("at_save", at_save), ("resumed", resumed), ("in_one_call", in_one_call)):
            results.update({f"{strategy}/{name}/{k}": v for k, v in tree.items()})

    if args.restore_check:
        # Another run's FSDP checkpoint (8 devices, maybe several processes), restored
        # onto 4 devices: replicated, and FSDP over 4.
        mesh4 = sharding.make_mesh(4)
        with checkpoint.Checkpointer(pathlib.Path(args.restore_check) / "checkpoints" / "fsdp") as checkpoints:
            for strategy in ("replicated", "fsdp"):
                shardings = sharding.state_sharding(like, mesh4, strategy=strategy)
                restored = checkpoints.restore(like, step=args.save_at, shardings=shardings)
                for x in jax.tree.leaves(eqx.filter(restored, eqx.is_array)):
                    if x.sharding.device_set != set(mesh4.devices.flat):
                        raise RuntimeError(f"restored onto {x.sharding}, not the 4-device mesh")
                arrays = eqx.filter(restored, eqx.is_array)
                arrays = jax.tree.map(
                    lambda x: jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, arrays
                )
                results.update(
                    {
                        f"restore4/{strategy}/{jax.tree_util.keystr(p)}": np.asarray(x)
                        for p, x in jax.tree_util.tree_leaves_with_path(arrays)
                    }
                )
                say(f"restored {args.restore_check}'s FSDP checkpoint onto 4 devices, {strategy}")

    if me == 0:
        np.savez(out / "results.npz", **results)
        say(f"wrote {out / 'results.npz'}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    ARGS = parse_args(argv)
    if ARGS.process_id is None and ARGS.processes > 1:
        sys.exit(launch(ARGS, argv))
    if ARGS.process_id is None:
        ARGS.process_id, ARGS.num_processes = 0, 1
    worker(ARGS)

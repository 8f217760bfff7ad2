"""Train a small PixelDiT on 8 devices, data-parallel and FSDP-style, with `jax.sharding`.

On one machine without accelerators, the script makes the CPU look like 8 devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set below before jax is imported)
and trains a tiny class-conditional PixelDiT for a few steps in both layouts of
`pixeldit_eqx.sharding`:

- `replicated`: every device holds the whole training state and an eighth of the batch;
  XLA all-reduces the gradients.
- `fsdp`: every device holds an eighth of each large array of the state (parameters,
  EMA, Adam's moments; the rule is `pixeldit_eqx.sharding.fsdp_spec`) and an eighth of
  the batch; XLA all-gathers the parameters where the loss uses them and
  reduce-scatters the gradients.

It prints where the arrays live and the losses of both runs (the same, up to float32
rounding: both compute the single-device step), then samples a batch with the sharded
sampler.

```bash
python examples/data_parallel.py                 # 8 simulated CPU devices
python examples/data_parallel.py --simulate 0    # the real devices: 8 GPUs, say
```

**On 8 GPUs**, nothing changes but the flag: `--simulate 0` leaves `XLA_FLAGS` alone, so
`jax.devices()` lists the GPUs and the mesh spans them.

**On several hosts** (e.g. 4 hosts with 8 GPUs each), start the same command on every
host with `--distributed`: it calls `jax.distributed.initialize()` first (which reads
the coordinator address, process count and process id from the cluster's environment
such as SLURM or Cloud TPU, or take them as arguments), and then

- `make_mesh()` spans the devices of all hosts (32 here);
- every host initialises the state with the same key, so `shard_state` places the same
  values everywhere;
- every host loads only its own part of the global batch (`--batch` examples in all,
  `--batch / jax.process_count()` per host) and `shard_batch` assembles the global
  array with `jax.make_array_from_process_local_data`;
- the step and the sampler are the same compiled SPMD program on every host.
"""

# ruff: noqa: E402 (jax is imported after XLA_FLAGS is set)

import argparse
import os
import pathlib
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--simulate", type=int, default=8, help="simulated CPU devices; 0 for the real devices")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (several hosts)")
    p.add_argument("--steps", type=int, default=5, help="training steps per strategy")
    p.add_argument("--batch", type=int, default=16, help="global batch size, a multiple of the device count")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.simulate:
    # Before jax is imported: XLA reads the flag when it creates the CPU backend.
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.simulate}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util


if importlib.util.find_spec("pixeldit_eqx") is None:  # a checkout, not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import pixeldit_eqx
from pixeldit_eqx import sharding, train


NUM_CLASSES = 4
IMAGE = (3, 16, 16)


def make_model(key: jax.Array) -> pixeldit_eqx.PixelDiT:
    return pixeldit_eqx.PixelDiT(
        in_channels=IMAGE[0],
        num_groups=2,
        hidden_size=64,
        pixel_hidden_size=8,
        patch_depth=2,
        pixel_depth=1,
        patch_size=4,
        num_classes=NUM_CLASSES,
        key=key,
    )


def local_batches(seed: int, global_batch: int):
    """This host's part of every global batch: noisy copies of one pattern per class.

    numpy on the host, as a data loader would give them; each host draws its own
    examples (the seed includes the process index).
    """
    patterns = np.sign(np.random.default_rng(1234).standard_normal((NUM_CLASSES, *IMAGE))).astype(np.float32)
    size = global_batch // jax.process_count()
    rng = np.random.default_rng([seed, jax.process_index()])
    while True:
        labels = rng.integers(0, NUM_CLASSES, size=size).astype(np.int32)
        images = patterns[labels] + 0.1 * rng.standard_normal((size, *IMAGE)).astype(np.float32)
        yield images, labels


def describe(name: str, x: jax.Array) -> str:
    shards = sorted({tuple(s.data.shape) for s in x.addressable_shards})
    return f"  {name:<56} {str(tuple(x.shape)):<14} spec={str(x.sharding.spec):<22} shard shapes={shards}"


def run(strategy: str, mesh: jax.sharding.Mesh, args: argparse.Namespace) -> list[float]:
    optimizer = train.default_optimizer(1e-3, warmup_steps=2)

    # The state is created inside jit, already laid out: with FSDP no device ever holds
    # the whole of it. Every host runs this with the same key.
    @eqx.filter_jit
    def init(key):
        model_key, train_key = jr.split(key)
        state = train.init_train_state(make_model(model_key), optimizer, key=train_key)
        return sharding.shard_state(state, mesh, strategy=strategy)

    state = init(jr.key(args.seed))
    step = sharding.make_sharded_train_step(train.c2i_loss, optimizer, mesh, strategy=strategy)
    batches = local_batches(args.seed, args.batch)

    print(f"\n[{strategy}]")
    batch = sharding.shard_batch(next(batches), mesh)
    print(describe("batch images", batch[0]))
    print(describe("batch labels", batch[1]))
    # One large weight as the model, the EMA and Adam's two moments hold it, one small
    # array, and the scalars.
    for path, x in jax.tree_util.tree_leaves_with_path(eqx.filter(state, eqx.is_array)):
        name = jax.tree_util.keystr(path)
        if name.endswith(("patch_blocks.blocks.attn.qkv.weight", ".model.y_embedder.embedding_table.weight")):
            print(describe(name, x))
        elif name in (".step", ".key"):
            print(describe(name, x))

    losses = []
    for i in range(args.steps):
        if i:
            batch = sharding.shard_batch(next(batches), mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        print(f"  step {i + 1}: loss {losses[-1]:.6f}  grad_norm {float(metrics['grad_norm']):.6f}")

    noise = jr.normal(jr.key(args.seed + 1), (args.batch, *IMAGE), dtype=jnp.float32)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % NUM_CLASSES
    sampler = eqx.Partial(pixeldit_eqx.flow.sample, state.ema, num_steps=4, guidance=2.0, null_cond=NUM_CLASSES)
    images = sharding.sharded_sample(sampler, noise, labels, mesh)
    print(describe("samples", images))
    return losses


def main(args: argparse.Namespace) -> None:
    if args.distributed:
        jax.distributed.initialize()
    mesh = sharding.make_mesh()
    print(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"mesh {dict(mesh.shape)}; global batch {args.batch}"
    )
    losses = {strategy: run(strategy, mesh, args) for strategy in ("replicated", "fsdp")}
    gap = max(abs(a - b) for a, b in zip(losses["replicated"], losses["fsdp"]))
    print(f"\nlargest loss difference between the two strategies: {gap:.2e}")


if __name__ == "__main__":
    main(ARGS)

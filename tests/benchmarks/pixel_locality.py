"""The per-pixel MLP in cache-sized chunks: what locality would buy, and what `vmap` costs.

    python tests/benchmarks/pixel_locality.py [--repeats 15]

The pixel path is memory-bound: at 128x128 and batch 8 the PiT blocks' per-pixel MLP
reads and writes `(131072, 64)` float32 arrays (33.5 MB each) between its two thin
matmuls and the GELU. Timed alternately in one process (medians), float32, the module's
own `PixelMLP.apply`:

- one elementwise pass over a `(131072, 64)` array (`y * 2`): the machine's memory rate;
- the MLP on all pixels at once, forward and forward+backward (the model's form);
- the same in `lax.map` chunks of the pixel axis, each chunk under `jax.checkpoint`
  (its hidden array stays in cache, and the backward recomputes it per chunk);
- the chunks as a per-example module must write them: `lax.map` over the patch axis of
  one example, `vmap`ped over the batch. The scan then runs over a non-leading axis of
  the batched arrays, and XLA transposes every input and output around the loop; the
  number of transposes in the compiled forward+backward is printed.
"""

import argparse
import os
import re
import statistics
import sys

import equinox as eqx
import jax
import jax.numpy as jnp


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from pixeldit_eqx.modules import PixelMLP  # noqa: E402
from tests.benchmarks.bench import time_alternately  # noqa: E402


BATCH, PATCHES, PIXELS, WIDTH = 8, 256, 64, 16  # 128x128, patch 8, pixel width 16


def _whole(mlp: PixelMLP, x: jax.Array) -> jax.Array:
    return mlp.apply(x)


def _chunked(chunks: int):
    def apply(mlp: PixelMLP, x: jax.Array) -> jax.Array:
        parts = x.reshape(chunks, x.shape[0] // chunks, *x.shape[1:])
        body = jax.checkpoint(lambda part: mlp.apply(part))
        return jax.lax.map(body, parts).reshape(x.shape)

    return apply


def _forward_backward(fn):
    """Cotangents of the input and of the MLP's parameters, as in training."""
    return eqx.filter_jit(lambda mlp, x, g: eqx.filter_vjp(fn, mlp, x)[1](g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mlp = PixelMLP(WIDTH, 4.0, key=k1)
    pixels = BATCH * PATCHES * PIXELS
    x = jax.random.normal(k2, (pixels, WIDTH))
    g = jax.random.normal(k3, (pixels, WIDTH))
    wide = jax.random.normal(k2, (pixels, 4 * WIDTH))
    xb, gb = x.reshape(BATCH, PATCHES, PIXELS, WIDTH), g.reshape(BATCH, PATCHES, PIXELS, WIDTH)

    calls = {"memory pass (131072, 64) float32": (jax.jit(lambda y: y * 2), (wide,))}
    forms = {"whole array": _whole} | {f"{n} chunks of the pixel axis": _chunked(n) for n in (4, 8, 16)}
    for name, fn in forms.items():
        calls[f"forward, {name}"] = (eqx.filter_jit(fn), (mlp, x))
        calls[f"forward+backward, {name}"] = (_forward_backward(fn), (mlp, x, g))
    per_example = eqx.filter_vmap(_chunked(8), in_axes=(None, 0))  # chunks of 32 patches of one example
    calls["forward, per example: 8 chunks of the patch axis, vmapped"] = (eqx.filter_jit(per_example), (mlp, xb))
    calls["forward+backward, per example: 8 chunks, vmapped"] = (_forward_backward(per_example), (mlp, xb, gb))
    compiled = {name: (fn.lower(*a).compile(), a) for name, (fn, a) in calls.items()}

    whole = compiled["forward, whole array"][0](mlp, x)
    for name in forms:
        out = compiled[f"forward, {name}"][0](mlp, x)
        assert bool(jnp.all(out == whole)), f"{name}: forward differs from the whole-array MLP"
    hlo = compiled["forward+backward, per example: 8 chunks, vmapped"][0].compiled.as_text()
    transposes = len(re.findall(r"\btranspose\(", hlo))

    medians = {name: statistics.median(t) for name, t in time_alternately(compiled, args.repeats).items()}
    for name, seconds in medians.items():
        extra = f"  ({2 * wide.nbytes / seconds / 1e9:.1f} GB/s)" if name.startswith("memory") else ""
        print(f"{name:60s} {seconds * 1e3:7.2f} ms{extra}")
    print(f"transposes in the per-example forward+backward program: {transposes}")


if __name__ == "__main__":
    main()

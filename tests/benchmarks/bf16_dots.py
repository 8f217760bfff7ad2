"""XLA:CPU matmul rates by operand and result dtype, at the model's shapes.

    python tests/benchmarks/bf16_dots.py [--repeats 7]

Times, interleaved in one process (medians), `dot_general` on float32 operands, on
bfloat16 operands with a bfloat16 result, on bfloat16 operands with a float32 result
(`preferred_element_type=float32`, what `modules.dense` asks for bf16 inputs), and on a
float32 x bfloat16 pair (what autodiff's transposes of the latter multiply: a float32
cotangent with a bf16 operand). Shapes: a 2048 square, the patch blocks' Linears
(2048 tokens, width 256 -> 768), the pixel adaLN (2048 x 256 -> 6144) and its two
backward matmuls, the per-pixel MLP (131072 pixels, 16 -> 64).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


SHAPES = {
    "square 2048": ((2048, 2048), (2048, 2048), 1, 0),
    "patch Linear 2048x256 @ 256x768": ((2048, 256), (256, 768), 1, 0),
    "pixel adaLN 2048x256 @ 256x6144": ((2048, 256), (256, 6144), 1, 0),
    "adaLN input grad 2048x6144 @ 6144x256": ((2048, 6144), (6144, 256), 1, 0),
    "adaLN weight grad 6144x2048 @ 2048x256": ((2048, 6144), (2048, 256), 0, 0),
    "pixel MLP 131072x16 @ 16x64": ((131072, 16), (16, 64), 1, 0),
}

DTYPES = {
    "f32 x f32 -> f32": (jnp.float32, jnp.float32, None),
    "bf16 x bf16 -> bf16": (jnp.bfloat16, jnp.bfloat16, None),
    "bf16 x bf16 -> f32": (jnp.bfloat16, jnp.bfloat16, jnp.float32),
    "f32 x bf16 -> f32": (jnp.float32, jnp.bfloat16, jnp.float32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    k1, k2 = jax.random.split(jax.random.key(0))
    for shape_name, (sa, sb, ca, cb) in SHAPES.items():
        m = sa[1 - ca]
        flops = 2 * m * sa[ca] * sb[1 - cb]
        cases = {}
        for name, (da, db, pet) in DTYPES.items():
            a, b = jax.random.normal(k1, sa, da), jax.random.normal(k2, sb, db)
            fn = jax.jit(
                lambda a, b, pet=pet: jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=pet)
            )
            jax.block_until_ready(fn(a, b))
            cases[name] = (fn, a, b, [])
        for _ in range(args.repeats):  # interleaved: the dtypes share the same conditions
            for fn, a, b, times in cases.values():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(a, b))
                times.append(time.perf_counter() - t0)
        base = statistics.median(cases["f32 x f32 -> f32"][3])
        print(f"\n{shape_name} ({flops / 1e9:.2f} GFLOP)")
        for name, (*_, times) in cases.items():
            t = statistics.median(times)
            print(f"  {name:22s} {t * 1e3:8.2f} ms {flops / t / 1e9:7.1f} GFLOP/s  {base / t:5.2f}x f32")


if __name__ == "__main__":
    main()

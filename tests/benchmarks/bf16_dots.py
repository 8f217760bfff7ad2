"""XLA:CPU matmul rates by operand and result dtype, at the model's shapes.

    python tests/benchmarks/bf16_dots.py [--repeats 7]

Times, interleaved in one process (medians), `dot_general` on float32 operands, on
bfloat16 operands with a bfloat16 result, on bfloat16 operands with a float32 result
(`preferred_element_type=float32`, what `modules.dense` asks for bf16 inputs), and on a
float32 x bfloat16 pair (what autodiff's transposes of the latter multiply: a float32
cotangent with a bf16 operand). Shapes: a 2048 square, the patch blocks' Linears
(2048 tokens, width 256 -> 768), the pixel adaLN (2048 x 256 -> 6144) and its two
backward matmuls, the per-pixel MLP (131072 pixels, 16 -> 64).

Then the adaLN weight gradient in bf16 three ways: as autodiff writes it (`g^T @ s`,
both operands contracted on their major, token axis), as `s^T @ g` with `s^T` given
already transposed, and as `s^T @ g` with the transpose taken inside the program; with
whether XLA converted the bf16 operands to float32 before the dot.
"""

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from tests.benchmarks.bench import time_alternately  # noqa: E402


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


def _interleaved_medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each `fn(*operands)` in `calls`, timed in turn (`bench.time_alternately`)."""
    return {name: statistics.median(t) for name, t in time_alternately(calls, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    k1, k2 = jax.random.split(jax.random.key(0))
    for shape_name, (sa, sb, ca, cb) in SHAPES.items():
        m = sa[1 - ca]
        flops = 2 * m * sa[ca] * sb[1 - cb]
        calls = {}
        for name, (da, db, pet) in DTYPES.items():
            a, b = jax.random.normal(k1, sa, da), jax.random.normal(k2, sb, db)
            fn = jax.jit(
                lambda a, b, pet=pet: jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=pet)
            )
            calls[name] = (fn, (a, b))
        medians = _interleaved_medians(calls, args.repeats)
        base = medians["f32 x f32 -> f32"]
        print(f"\n{shape_name} ({flops / 1e9:.2f} GFLOP)")
        for name, t in medians.items():
            print(f"  {name:22s} {t * 1e3:8.2f} ms {flops / t / 1e9:7.1f} GFLOP/s  {base / t:5.2f}x f32")
    weight_gradient_forms(args.repeats)


def weight_gradient_forms(repeats: int) -> None:
    """The bf16 adaLN weight gradient (2048 tokens, 6144 x 256) in three layouts."""
    k1, k2 = jax.random.split(jax.random.key(1))
    g = jax.random.normal(k1, (2048, 6144), jnp.bfloat16)
    s = jax.random.normal(k2, (2048, 256), jnp.bfloat16)
    s_t = jnp.asarray(s.T)

    def dot(a, b, ca, cb):
        return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)

    forms = {
        "g^T @ s (autodiff's form)": (lambda g, s: dot(g, s, 0, 0), (g, s)),
        "s^T @ g, s^T given": (lambda s_t, g: dot(s_t, g, 1, 0), (s_t, g)),
        "s^T @ g, s^T in-program": (lambda g, s: dot(s.T, g, 1, 0), (g, s)),
    }
    calls, upcast = {}, {}
    for name, (fn, operands) in forms.items():
        compiled = jax.jit(fn).lower(*operands).compile()
        text = compiled.as_text()
        upcast[name] = "f32[2048,256]" in text or "f32[256,2048]" in text  # s (or s^T) converted
        calls[name] = (compiled, operands)
    medians = _interleaved_medians(calls, repeats)
    flops = 2 * 2048 * 6144 * 256
    print(f"\nbf16 adaLN weight gradient, 2048 tokens, 6144 x 256 ({flops / 1e9:.2f} GFLOP), bf16 x bf16 -> f32")
    for name, t in medians.items():
        note = "operands converted to f32" if upcast[name] else "bf16 operands"
        print(f"  {name:26s} {t * 1e3:8.2f} ms {flops / t / 1e9:7.1f} GFLOP/s  ({note})")


if __name__ == "__main__":
    main()

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

Last, a scanned stack of six blocks that keeps one bf16 matmul output per layer for the
backward pass (as `BlockStack` keeps the named residuals), forward+backward with that
residual kept as bf16 (the model's way), as float32, and as the uint16 bits of the bf16
value; with the dtype XLA wrote each stacked residual buffer in. XLA:CPU widens a bf16
`dynamic-update-slice` to float32, so each layer's write rewrites the whole bf16 stack.
The uint16 form is in place but is not a way open to the model: an integer residual
carries no derivative, so derivatives of the backward pass through it are wrong.
"""

import argparse
import os
import re
import statistics
import sys

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


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
    scan_residuals(args.repeats)


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


_KEPT = "kept"


@jax.custom_jvp
def _kept_as_bits(x: jax.Array) -> jax.Array:
    """An identity whose value a `checkpoint_name` policy keeps as uint16 bits (first
    derivatives only: the integer residual carries no derivative)."""
    return x


@_kept_as_bits.defjvp
def _kept_as_bits_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), _KEPT)
    return jax.lax.bitcast_convert_type(bits, x.dtype), dx


def scan_residuals(repeats: int, depth: int = 6, tokens: int = 2048, width: int = 256, hidden: int = 1024) -> None:
    """Forward+backward of `depth` scanned blocks `x + gelu(h) @ w2`, `h = x @ w1` in bf16
    (f32 accumulation), keeping `h` for the backward pass in three forms."""

    def bf16_dot(a, b):  # bf16 operands, float32 result, as `modules.dense`
        return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    kept = {
        "bf16 (the model's way)": lambda h: checkpoint_name(h.astype(jnp.bfloat16), _KEPT),
        "float32": lambda h: checkpoint_name(h, _KEPT).astype(jnp.bfloat16),
        "uint16 bits of the bf16": lambda h: _kept_as_bits(h.astype(jnp.bfloat16)),
    }

    def loss(keep, params, x):
        def body(x, w):
            w1, w2 = w
            h = keep(bf16_dot(x, w1))
            return x + bf16_dot(jax.nn.gelu(h.astype(jnp.float32), approximate=False), w2), None

        policy = jax.checkpoint_policies.save_only_these_names(_KEPT)
        x, _ = jax.lax.scan(jax.checkpoint(body, policy=policy), x, params)
        return jnp.sum(x * x)

    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    params = (
        jax.random.normal(k1, (depth, width, hidden)) / width**0.5,
        jax.random.normal(k2, (depth, hidden, width)) / hidden**0.5,
    )
    x = jax.random.normal(k3, (tokens, width))
    calls, stacks = {}, {}
    for name, keep in kept.items():
        grad = jax.jit(jax.grad(lambda p, x, keep=keep: loss(keep, p, x)))
        compiled = grad.lower(params, x).compile()
        stacked = re.findall(rf"= (\w+)\[{depth},{tokens},{hidden}\]\S* dynamic-update-slice\(", compiled.as_text())
        stacks[name] = ", ".join(sorted(set(stacked))) or "none"
        calls[name] = (compiled, (params, x))
    medians = _interleaved_medians(calls, repeats)
    base = medians["bf16 (the model's way)"]
    print(f"\n{depth} scanned blocks keeping a bf16 ({tokens}, {hidden}) matmul output, forward+backward")
    for name, t in medians.items():
        print(f"  kept as {name:24s} {t * 1e3:8.2f} ms  {base / t:5.2f}x  (stacked buffer written as {stacks[name]})")


if __name__ == "__main__":
    main()

"""`torch.linspace` in float32 as PyTorch's CPU kernel computes it: the rope positions
and the samplers' time grid depend on it bit for bit."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def torch_linspace(start: float, end: float, steps: int) -> Float[Array, " {steps}"]:
    """`torch.linspace(start, end, steps)` in float32: the step `(end - start) / (steps - 1)`
    in float32, the first half counted up from `start`, the second half down from `end`.

    Bit for bit up to 15 points, where the kernel does not vectorise; beyond, within an ulp.
    """
    start32, end32 = jnp.float32(start), jnp.float32(end)
    if steps == 1:
        return jnp.full((1,), start32)
    step = (end32 - start32) / jnp.float32(steps - 1)
    i = jnp.arange(steps, dtype=jnp.float32)
    up = start32 + step * i
    down = end32 - step * (jnp.float32(steps - 1) - i)
    return jnp.where(jnp.arange(steps) < steps // 2, up, down)

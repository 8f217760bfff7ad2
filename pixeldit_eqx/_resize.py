"""Bicubic resizing exactly as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`.

Keys' cubic convolution with `a = -0.75`, the four taps of every output pixel clamped at
the border, and no antialiasing, also when downsampling (`jax.image.resize` uses
`a = -0.5` and antialiases downsampling, so it is not used). The tap indices and
weights are computed with `jnp` from the static sizes, in float32 as PyTorch's CPU
kernel does.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float


_A = -0.75


def _cubic_inner(x: Array) -> Array:
    """Keys' kernel for `|x| <= 1` (PyTorch `cubic_convolution1`)."""
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic_outer(x: Array) -> Array:
    """Keys' kernel for `1 < |x| < 2` (PyTorch `cubic_convolution2`)."""
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _taps(in_size: int, out_size: int, scale: float | None) -> tuple[Array, list[Array]]:
    """Source indices `(out, 4)` and the four weights `(out,)` of each output position.

    `scale` is the `scale_factor` given to `F.interpolate` (then the source coordinate
    is `(dst + 0.5) / scale - 0.5`), or None for `size=` (`in_size / out_size`).
    """
    ratio = in_size / out_size if scale is None else 1.0 / scale
    real = jnp.float32(ratio) * (jnp.arange(out_size, dtype=jnp.float32) + jnp.float32(0.5)) - jnp.float32(0.5)
    index = jnp.minimum(jnp.floor(real).astype(jnp.int32), in_size - 1)
    t = jnp.clip(real - index.astype(jnp.float32), 0.0, 1.0)
    weights = [_cubic_outer(t + 1), _cubic_inner(t), _cubic_inner(1 - t), _cubic_outer(2 - t)]
    taps = jnp.clip(index[:, None] + jnp.arange(-1, 3, dtype=jnp.int32)[None, :], 0, in_size - 1)
    return taps, weights


def _resize_axis(x: Array, axis: int, out_size: int, scale: float | None) -> Array:
    """Interpolate `x` along `axis`, summing the four taps in PyTorch's order."""
    taps, weights = _taps(x.shape[axis], out_size, scale)
    shape = [1] * x.ndim
    shape[axis] = out_size
    terms = [jnp.take(x, taps[:, j], axis=axis) * weights[j].astype(x.dtype).reshape(shape) for j in range(4)]
    return ((terms[0] + terms[1]) + terms[2]) + terms[3]


def resize_bicubic(
    x: Float[Array, "C H W"],
    size: tuple[int, int] | None = None,
    *,
    scale_factor: tuple[float, float] | None = None,
) -> Float[Array, "C h w"]:
    """Resize a channel-first image like `F.interpolate(x[None], size, mode="bicubic",
    align_corners=False)[0]` (or with `scale_factor=(sh, sw)` instead of `size`).

    **Arguments:**

    - `x`: the image `(C, H, W)`.
    - `size`: the output `(h, w)`; source coordinates map by `H / h`, `W / w`.
    - `scale_factor`: instead of `size`: the output is `floor(H * sh)` by
      `floor(W * sw)` and source coordinates map by `1 / sh`, `1 / sw` (not by the
      ratio of the sizes), as PyTorch does when given a scale factor.

    Same size in and out (with `size`) returns `x` unchanged. Computed in float32 for
    float32 input; the width is interpolated first, then the height, the order of
    PyTorch's kernel.
    """
    if x.ndim != 3:
        raise ValueError(f"`x`: expected one image (C, H, W), got shape {tuple(x.shape)}.")
    if (size is None) == (scale_factor is None):
        raise ValueError("resize_bicubic: give exactly one of `size` and `scale_factor`.")
    _, height, width = x.shape
    if size is not None:
        if not isinstance(size, tuple | list) or len(size) != 2:
            raise ValueError(f"`size` must be a pair (h, w), got {size!r}.")
        out_h, out_w = size
        _check_size("size[0]", out_h)
        _check_size("size[1]", out_w)
        if (out_h, out_w) == (height, width):
            return x
        scale_h = scale_w = None
    else:
        if not isinstance(scale_factor, tuple | list) or len(scale_factor) != 2:
            raise ValueError(f"`scale_factor` must be a pair (sh, sw), got {scale_factor!r}.")
        scale_h, scale_w = (float(s) for s in scale_factor)
        if not (scale_h > 0 and scale_w > 0 and math.isfinite(scale_h) and math.isfinite(scale_w)):
            raise ValueError(f"`scale_factor` must be two positive finite numbers, got {scale_factor!r}.")
        out_h, out_w = math.floor(height * scale_h), math.floor(width * scale_w)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"`scale_factor`={scale_factor!r} maps the image ({height}, {width}) to an empty one ({out_h}, {out_w})."
            )
    out = _resize_axis(x, 2, out_w, scale_w)
    return _resize_axis(out, 1, out_h, scale_h)

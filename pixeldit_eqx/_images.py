"""Image grids as PNG files, from batches of channel-first images in [-1, 1]."""

import math
import os
import tempfile

import numpy as np

from ._checks import check_int
from ._custom_types import ArrayLike, Float
from ._optional import require


def save_image_grid(
    images: Float[ArrayLike, "N C H W"],
    path: str | os.PathLike,
    *,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = -1.0,
    scale: int = 1,
) -> None:
    """Writes a batch of images as one PNG grid, `nrow` images per row, row by row.

    The model's range maps to 8-bit pixels as `round((x + 1) / 2 * 255)`, clipped to
    [0, 255]; one channel gives a greyscale PNG, three an RGB one, four RGBA. The file is
    written to a temporary name beside `path` and renamed, so no half-written PNG is
    ever left. The layout is that of `torchvision.utils.save_image`.

    **Arguments:**

    - `images`: `(N, C, H, W)` in [-1, 1] (a numpy or JAX array), `C` in 1, 3, 4.
    - `path`: where to write the PNG; missing parent directories are created.
    - `nrow`: images per row (the last row may be partly empty).
    - `padding`: pixels between images and around the grid.
    - `pad_value`: the value of the padding and of empty cells, in [-1, 1] (-1 is black).
    - `scale`: every pixel becomes a `scale x scale` block (nearest neighbour), for
        small images.
    """
    image_module = require("PIL.Image", "images", "save_image_grid")
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            f"`images`: expected a non-empty (N, C, H, W) array with C in (1, 3, 4), got shape {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"`images`: expected floating-point values in [-1, 1], got dtype {array.dtype}.")
    bad = int(np.sum(~np.isfinite(array)))
    if bad:
        raise ValueError(f"`images`: expected finite values in [-1, 1], got {bad} NaN or infinite value(s).")
    nrow = check_int("nrow", nrow, 1)
    padding = check_int("padding", padding, 0)
    scale = check_int("scale", scale, 1)
    if not -1.0 <= float(pad_value) <= 1.0:
        raise ValueError(f"`pad_value` must be in [-1, 1], got pad_value={pad_value!r}.")

    n, c, h, w = array.shape
    pixels = np.clip(np.round((array.astype(np.float64) + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    fill = np.uint8(np.clip(round((float(pad_value) + 1.0) / 2.0 * 255.0), 0, 255))
    canvas = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        canvas[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)
    picture = image_module.fromarray(canvas[..., 0] if c == 1 else canvas)  # L, RGB or RGBA

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".grid-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

"""The one vocabulary of dims used on every public signature.

`C H W` image (channel-first), `L` patch tokens, `p2` pixels per patch, `D` patch width,
`D_pix` pixel width, `heads`, `hd` head dim, `T` text tokens, `txt` text embedding width.
"""

from typing import Literal, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int, Real


#: A channel-first image `(C, H, W)`, as `eqx.nn.Conv2d` takes it.
Image: TypeAlias = Float[Array, "C H W"]
#: A scalar time in [0, 1]: a Python float, a numpy scalar or a 0-d array.
TimeLike: TypeAlias = Real[ArrayLike, ""]
#: A scalar integer class label (`num_classes` is the null class).
LabelLike: TypeAlias = Int[ArrayLike, ""]
#: Text token embeddings `(T, txt)` from a frozen text encoder.
Text: TypeAlias = Float[Array, "T txt"]
#: Which text tokens are real (True) rather than padding (False).
TextMask: TypeAlias = Bool[Array, " T"]
#: What the blocks keep for the backward pass: `False` every matmul output (fastest),
#: `"lean"` all but the wide ones (recomputed), `True` only each block's input.
Checkpoint: TypeAlias = bool | Literal["lean"]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Checkpoint",
    "Float",
    "Image",
    "Int",
    "LabelLike",
    "Real",
    "Text",
    "TextMask",
    "TimeLike",
]

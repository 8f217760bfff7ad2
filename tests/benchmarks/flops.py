"""Analytic FLOP count of a PixelDiT forward and forward+backward pass.

Counted the way PyTorch's `FlopCounterMode` counts a model: every matmul `(M, K) @ (K, N)`
is `2*M*N*K`; attention is its two matmuls, `Q K^T` and `P V`; nothing else (norms,
activations, softmax, rope, modulation) is counted. The backward pass of a matmul is
two matmuls of the same size (gradient of the input and of the weight), except where the
input is data that needs no gradient (the patch and pixel embedders read the image, the
timestep MLP its sinusoid, the text embedder the text): there only the weight gradient
is counted. The backward pass of attention is four matmuls (dV, dP, dQ, dK), twice its
forward. Work whose result feeds nothing (the text stream of the last t2i block after
its attention) has a forward but no backward pass, as under autograd. Hence
`forward_backward` is slightly less than `3 * forward`.

The count is of the model's own work; a rematerialising backward pass (`checkpoint`)
repeats some of it, which the count does not include (it is a cost, not model work).
`tests/benchmarks/test_flops.py` checks this count against the matmuls that the traced
program of the model really contains.

Checked against the reference itself: `FlopCounterMode` (torch 2.13, CPU) on the PyTorch
reference at the benchmark's mid config, batch 8, counts 10.03 / 30.02 GFLOP (forward /
forward+backward) at 64x64 and 39.98 / 119.73 at 128x128, all of it Linear layers: on
CPU `scaled_dot_product_attention` runs `_scaled_dot_product_flash_attention_for_cpu`,
for which it has no formula, so attention counts zero there. With the attention term of
this count added (`4 N^2 D` per layer per example forward, twice that backward) the
totals are this count's 10.29 / 30.83 and 44.28 / 132.62 exactly.
"""

from collections.abc import Mapping
from typing import Any


__all__ = ["pixeldit_flops"]

_FREQ_DIM = 256  # TimestepConditioner's sinusoid width


def _swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    return int(2 * int(dim * mlp_ratio) / 3)


class _Counter:
    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def matmul(self, m: int, k: int, n: int, *, input_grad: bool = True, grad: bool = True) -> None:
        flops = 2 * m * k * n
        self.forward += flops
        if grad:
            self.backward += 2 * flops if input_grad else flops

    def attention(self, queries: int, keys: int, width: int) -> None:
        """Softmax attention of `queries` on `keys`; `width` = heads * head dim."""
        flops = 2 * (2 * queries * keys * width)  # Q K^T and P V
        self.forward += flops
        self.backward += 2 * flops

    def swiglu(self, tokens: int, dim: int, hidden: int, *, grad: bool = True) -> None:
        self.matmul(tokens, dim, hidden, grad=grad)  # w1
        self.matmul(tokens, dim, hidden, grad=grad)  # w3
        self.matmul(tokens, hidden, dim, grad=grad)  # w2


def pixeldit_flops(
    config: Mapping[str, Any],
    variant: str,
    height: int,
    width: int,
    batch: int = 1,
    text_len: int = 0,
) -> dict[str, int]:
    """FLOPs of one call on `batch` images of `height x width`.

    **Arguments:**

    - `config`: the reference constructor arguments (as for `pixeldit_eqx.build`).
    - `variant`: `"c2i"` or `"t2i"`.
    - `height`, `width`: image size (multiples of the patch size).
    - `batch`: examples per call.
    - `text_len`: text tokens per example (t2i), before truncation to `txt_max_length`.

    **Returns:** `{"forward": ..., "backward": ..., "forward_backward": ...}` in FLOPs.
    """
    c = dict(config)
    p = c.get("patch_size", 2)
    chans = c.get("in_channels", 4 if variant == "c2i" else 3)
    dim = c.get("hidden_size", 1152)
    d_pix = c.get("pixel_hidden_size", 64)
    mlp_ratio = c.get("mlp_ratio", 4.0)
    n_mod = 4 if c.get("pit_adaln_post_modulation", False) else 6
    if height % p or width % p:
        raise ValueError(f"image {height}x{width} is not a multiple of patch {p}.")
    tokens = (height // p) * (width // p)
    p2 = p * p
    pixels = tokens * p2
    hidden = _swiglu_hidden(dim, mlp_ratio)
    pix_hidden = int(d_pix * mlp_ratio)

    n = _Counter()
    n.matmul(1, _FREQ_DIM, dim, input_grad=False)  # t_embedder.mlp.0
    n.matmul(1, dim, dim)  # t_embedder.mlp.2
    n.matmul(tokens, chans * p2, dim, input_grad=False)  # s_embedder
    if variant == "c2i":
        attn_dim = dim
        for _ in range(c.get("patch_depth", 18)):
            n.matmul(1, dim, 6 * dim)  # adaLN
            n.matmul(tokens, dim, 3 * dim)  # qkv
            n.attention(tokens, tokens, dim)
            n.matmul(tokens, dim, dim)  # proj
            n.swiglu(tokens, dim, hidden)
    elif variant == "t2i":
        attn_dim = c.get("pixel_attn_hidden_size") or dim
        n_txt = min(text_len, c.get("txt_max_length", 1024))
        n.matmul(n_txt, c.get("txt_embed_dim", 4096), dim, input_grad=False)
        seq = n_txt + tokens
        depth = c.get("patch_depth", 26)
        for i in range(depth):
            # The last block's text stream after the attention (projection, SwiGLU)
            # feeds nothing: it runs forward but has no backward pass.
            live = i < depth - 1
            n.matmul(1, dim, 6 * dim)  # adaLN, image stream
            n.matmul(1, dim, 6 * dim)  # adaLN, text stream
            n.matmul(tokens, dim, 3 * dim)
            n.matmul(n_txt, dim, 3 * dim)
            n.attention(seq, seq, dim)  # one softmax over [text, image]
            n.matmul(tokens, dim, dim)
            n.matmul(n_txt, dim, dim, grad=live)
            n.swiglu(tokens, dim, hidden)
            n.swiglu(n_txt, dim, hidden, grad=live)
    else:
        raise ValueError(f"`variant` must be 'c2i' or 't2i', got {variant!r}.")
    n.matmul(pixels, chans, d_pix, input_grad=False)  # pixel_embedder
    for _ in range(c.get("pixel_depth", 4 if variant == "c2i" else 2)):
        n.matmul(tokens, dim, n_mod * d_pix * p2)  # pixel-wise adaLN
        n.matmul(tokens, p2 * d_pix, attn_dim)  # compress_to_attn
        n.matmul(tokens, attn_dim, 3 * attn_dim)  # qkv
        n.attention(tokens, tokens, attn_dim)
        n.matmul(tokens, attn_dim, attn_dim)  # proj
        n.matmul(tokens, attn_dim, p2 * d_pix)  # expand_from_attn
        n.matmul(pixels, d_pix, pix_hidden)  # pixel MLP fc1
        n.matmul(pixels, pix_hidden, d_pix)  # fc2
    n.matmul(pixels, d_pix, chans)  # final layer
    fwd, bwd = batch * n.forward, batch * n.backward
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}

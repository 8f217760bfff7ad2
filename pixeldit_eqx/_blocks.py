"""Transformer blocks (DiT, MMDiT, PiT) and `BlockStack`, the scanned stack of
identical blocks (built with `eqx.filter_vmap`, run with `lax.scan`)."""

from collections.abc import Callable, Sequence
from typing import Any, cast, ClassVar, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from ._attention import _check_heads, JointAttention, RotaryAttention
from ._custom_types import Checkpoint
from ._ops import dense, keep, linear, RESIDUAL, WIDE_RESIDUAL
from .modules import PixelMLP, RMSNorm, SwiGLU


_Block = TypeVar("_Block", bound=eqx.Module)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """`x * (1 + scale) + shift` (reference `modules.apply_adaln`), explicit broadcast."""
    if shift.ndim < x.ndim:
        shift = shift.reshape((1,) * (x.ndim - shift.ndim) + shift.shape)
        scale = scale.reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
    return x * (1 + scale) + shift


def _gate(gate: Array, x: Array) -> Array:
    return gate.reshape((1,) * (x.ndim - gate.ndim) + gate.shape) * x


def _modulated(norm: RMSNorm, x: Array, shift: Array, scale: Array, dtype: Any) -> Array:
    """`norm(x) * (1 + scale) + shift` in the stream's dtype, rounded once to the
    compute `dtype` for the branch that reads it."""
    h = norm.apply(x)
    return _modulate(h, shift.astype(h.dtype), scale.astype(h.dtype)).astype(dtype)


def _add(x: Array, gate: Array, branch: Array, shift: Array | None = None) -> Array:
    """Residual update `x + gate * branch` (or `x + branch * (1 + gate) + shift`,
    post-modulation) in the stream's dtype: a float32 stream stays float32 while the
    branches compute in bf16, so the rounding of the updates does not accumulate."""
    branch = branch.astype(x.dtype)
    if shift is not None:
        return x + _modulate(branch, shift.astype(x.dtype), gate.astype(x.dtype))
    return x + _gate(gate.astype(x.dtype), branch)


class DiTBlock(eqx.Module):
    """Patch-level block of the class-conditional model, adaLN-modulated.

    Reference: `pixeldit_c2i.AugmentedDiTBlock`: `adaLN_modulation.0` is Linear(D -> 6D)
    with no SiLU inside (the conditioning arrives activated); chunks shift, scale, gate
    (attention) then shift, scale, gate (SwiGLU).

    **Arguments:**

    - `hidden_size`: the token width `D`.
    - `heads`: attention heads (`D` a multiple of it).
    - `mlp_ratio`: the SwiGLU's width ratio (`SwiGLU`).
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    norm1: RMSNorm
    attn: RotaryAttention
    norm2: RMSNorm
    mlp: SwiGLU
    adaln: eqx.nn.Linear

    _torch_names: ClassVar[dict[str, str]] = {"adaln": "adaLN_modulation.0"}

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = RMSNorm(hidden_size, dtype=dtype)
        self.attn = RotaryAttention(hidden_size, heads, dtype=dtype, key=k1)
        self.norm2 = RMSNorm(hidden_size, dtype=dtype)
        self.mlp = SwiGLU(hidden_size, mlp_ratio, dtype=dtype, key=k2)
        self.adaln = eqx.nn.Linear(hidden_size, 6 * hidden_size, dtype=dtype, key=k3)

    @jax.named_scope("DiTBlock")
    def __call__(
        self,
        x: Float[Array, "L D"],
        c: Float[Array, " D"],
        angles: Float[Array, "L hd2"],
    ) -> Float[Array, "L D"]:
        """One DiT block on the patch tokens `x` under the activated conditioning `c`."""
        dtype = self.adaln.weight.dtype  # the compute dtype; x carries the stream's
        mod = keep(linear(self.adaln, c, x.dtype))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6)
        h = _modulated(self.norm1, x, shift_msa, scale_msa, dtype)
        x = _add(x, gate_msa, self.attn(h, angles))
        h = _modulated(self.norm2, x, shift_mlp, scale_mlp, dtype)
        return _add(x, gate_mlp, self.mlp.apply(h))


class MMDiTBlock(eqx.Module):
    """Patch-level block of the text-to-image model: image and text streams with their
    own norms, SwiGLUs and adaLN, joined in one attention over `[text, image]`.

    Reference: `pixeldit_t2i.MMDiTBlockT2I`. Called on the carry `(x, y)`.

    **Arguments:**

    - `hidden_size`: the width `D` of both streams.
    - `heads`: attention heads (`D` a multiple of it).
    - `mlp_ratio`: the SwiGLUs' width ratio (`SwiGLU`).
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    norm_x1: RMSNorm
    norm_y1: RMSNorm
    attn: JointAttention
    norm_x2: RMSNorm
    norm_y2: RMSNorm
    mlp_x: SwiGLU
    mlp_y: SwiGLU
    adaln_img: eqx.nn.Linear
    adaln_txt: eqx.nn.Linear

    _torch_names: ClassVar[dict[str, str]] = {
        "adaln_img": "adaLN_modulation_img.0",
        "adaln_txt": "adaLN_modulation_txt.0",
    }

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        self.norm_x1 = RMSNorm(hidden_size, dtype=dtype)
        self.norm_y1 = RMSNorm(hidden_size, dtype=dtype)
        self.attn = JointAttention(hidden_size, heads, dtype=dtype, key=k1)
        self.norm_x2 = RMSNorm(hidden_size, dtype=dtype)
        self.norm_y2 = RMSNorm(hidden_size, dtype=dtype)
        self.mlp_x = SwiGLU(hidden_size, mlp_ratio, dtype=dtype, key=k2)
        self.mlp_y = SwiGLU(hidden_size, mlp_ratio, dtype=dtype, key=k3)
        self.adaln_img = eqx.nn.Linear(hidden_size, 6 * hidden_size, dtype=dtype, key=k4)
        self.adaln_txt = eqx.nn.Linear(hidden_size, 6 * hidden_size, dtype=dtype, key=k5)

    @jax.named_scope("MMDiTBlock")
    def __call__(
        self,
        xy: tuple[Float[Array, "L D"], Float[Array, "T D"]],
        c: Float[Array, " D"],
        image_angles: Float[Array, "L hd2"],
        text_angles: Float[Array, "T hd2"] | None = None,
        text_mask: Bool[Array, " T"] | None = None,
    ) -> tuple[Float[Array, "L D"], Float[Array, "T D"]]:
        """One MMDiT block on the pair of streams `(image, text)`; returns the updated pair."""
        x, y = xy
        dtype = self.adaln_img.weight.dtype  # the compute dtype; x, y carry the streams'
        mod_x = keep(linear(self.adaln_img, c, x.dtype))
        mod_y = keep(linear(self.adaln_txt, c, y.dtype))
        sx_msa, cx_msa, gx_msa, sx_mlp, cx_mlp, gx_mlp = jnp.split(mod_x, 6)
        sy_msa, cy_msa, gy_msa, sy_mlp, cy_mlp, gy_mlp = jnp.split(mod_y, 6)
        x_in = _modulated(self.norm_x1, x, sx_msa, cx_msa, dtype)
        y_in = _modulated(self.norm_y1, y, sy_msa, cy_msa, dtype)
        attn_x, attn_y = self.attn(x_in, y_in, image_angles, text_angles, text_mask)
        x = _add(x, gx_msa, attn_x)
        y = _add(y, gy_msa, attn_y)
        x = _add(x, gx_mlp, self.mlp_x.apply(_modulated(self.norm_x2, x, sx_mlp, cx_mlp, dtype)))
        y = _add(y, gy_mlp, self.mlp_y.apply(_modulated(self.norm_y2, y, sy_mlp, cy_mlp, dtype)))
        return x, y


class PiTBlock(eqx.Module):
    """Pixel-level block: pixel-wise AdaLN from the per-patch conditioning, attention on
    compacted tokens (one per patch), a per-pixel GELU MLP.

    Reference: `pixeldit_c2i.PiTBlock`. `adaLN_modulation.0` maps each patch's
    conditioning to `n_mod * D_pix` numbers for every one of its `p*p` pixels. *Pre*
    modulation (`post_modulation=False`, 6 chunks in DiT order) modulates the norms'
    outputs and gates the branches; *post* (4 chunks: scale1, shift1, scale2, shift2)
    modulates the branches' outputs.

    **Arguments:**

    - `pixel_size`: the pixel token width `D_pix`.
    - `cond_size`: the width `D` of the per-patch conditioning.
    - `patch_size`: the patch side `p` (each patch has `p*p` pixels).
    - `attn_size`: the width of the compacted tokens the attention runs on (one per
      patch, `p*p*D_pix -> attn_size`).
    - `heads`: attention heads (`attn_size` a multiple of it).
    - `mlp_ratio`: the per-pixel MLP's width ratio (`PixelMLP`).
    - `post_modulation`: the post-modulation variant (4 chunks) instead of pre (6).
    - `dtype`: the parameters' dtype (default float32).
    - `key`: a PRNG key for the initialisation.
    """

    compress_to_attn: eqx.nn.Linear
    expand_from_attn: eqx.nn.Linear
    norm1: RMSNorm
    attn: RotaryAttention
    norm2: RMSNorm
    mlp: PixelMLP
    adaln: eqx.nn.Linear
    patch_size: int = eqx.field(static=True)
    post_modulation: bool = eqx.field(static=True)

    _torch_names: ClassVar[dict[str, str]] = {"adaln": "adaLN_modulation.0"}

    def __init__(
        self,
        pixel_size: int,
        cond_size: int,
        patch_size: int,
        attn_size: int,
        heads: int,
        mlp_ratio: float = 4.0,
        post_modulation: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        _check_heads(attn_size, heads, "PiTBlock attention")
        if patch_size < 1:
            raise ValueError(f"PiTBlock: `patch_size` must be >= 1, got {patch_size}.")
        p2 = patch_size * patch_size
        n_mod = 4 if post_modulation else 6
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        self.compress_to_attn = eqx.nn.Linear(p2 * pixel_size, attn_size, dtype=dtype, key=k1)
        self.expand_from_attn = eqx.nn.Linear(attn_size, p2 * pixel_size, dtype=dtype, key=k2)
        self.norm1 = RMSNorm(pixel_size, dtype=dtype)
        self.attn = RotaryAttention(attn_size, heads, dtype=dtype, key=k3)
        self.norm2 = RMSNorm(pixel_size, dtype=dtype)
        self.mlp = PixelMLP(pixel_size, mlp_ratio, dtype=dtype, key=k4)
        self.adaln = eqx.nn.Linear(cond_size, n_mod * pixel_size * p2, dtype=dtype, key=k5)
        self.patch_size = patch_size
        self.post_modulation = post_modulation

    @jax.named_scope("PiTBlock")
    def __call__(
        self,
        x: Float[Array, "L p2 D_pix"],
        s_cond: Float[Array, "L D"],
        angles: Float[Array, "L hd2"],
    ) -> Float[Array, "L p2 D_pix"]:
        """One PiT block on the pixel tokens of every patch, modulated pixel by pixel by `s_cond`."""
        n, p2, d = x.shape
        n_mod = 4 if self.post_modulation else 6
        # Pixel-wise AdaLN: one (L, D) @ (D, p2*D_pix) matmul per chunk. The reference's
        # outputs are ordered (pixel, chunk, channel); each chunk's rows of the weight
        # are taken here on their own, so every chunk comes out as a contiguous array:
        # the elementwise work reads it in long runs, and the backward pass takes each
        # chunk's cotangent where it is, never concatenating all six into one array.
        # Same numbers forward in float32 (bitwise); faster than one matmul for all the
        # chunks at 128px, in float32 and bf16 (`docs/performance.md`, "Numbers behind
        # choices in the code").
        dtype = self.adaln.weight.dtype  # the compute dtype; x carries the stream's
        # The chunks' rows are taken with `lax.split`, whose transpose concatenates the
        # chunks' weight gradients. Indexing (`weight[:, i]`) transposes to a zero pad per
        # chunk and a sum of the pads, which XLA:CPU evaluated element by element, with a
        # bf16 rounding per term under bf16 compute: same numbers, 128px bf16
        # forward+backward 1.08-1.12x faster (`docs/performance.md`, "Numbers behind
        # choices in the code").
        weights = jax.lax.split(self.adaln.weight.reshape(p2, n_mod, d, -1), (1,) * n_mod, axis=1)
        biases = (
            (None,) * n_mod
            if self.adaln.bias is None
            else jax.lax.split(self.adaln.bias.reshape(p2, n_mod, d), (1,) * n_mod, axis=1)
        )
        # Under bf16 compute the modulation is bf16 too (deliberate deviation: the
        # stream stays float32, and the modulation is computed in float32 and rounded
        # once; `test_precision.py::test_pixel_modulation_is_bf16_under_bf16_compute`):
        # at 128px it is the largest array of the pixel blocks (100 MB per block in
        # float32 at batch 8), and bf16 halves the memory traffic of every pass over it.
        out_dtype = None if jnp.finfo(dtype).bits < 32 else x.dtype
        # Each chunk is p*p times as wide as the conditioning it comes from: the widest
        # kept value of the model, recomputed under `checkpoint="lean"`.
        mod = [
            keep(
                dense(s_cond, w.reshape(p2 * d, -1), None if b is None else b.reshape(-1), out_dtype),
                wide=True,
            ).reshape(n, p2, d)
            for w, b in zip(weights, biases, strict=True)
        ]
        if self.post_modulation:
            h = self.norm1.apply(x).astype(dtype)
        else:
            shift_msa, scale_msa = mod[:2]
            h = _modulated(self.norm1, x, shift_msa, scale_msa, dtype)
        compact = keep(linear(self.compress_to_attn, h.reshape(n, p2 * d)))
        expanded = keep(linear(self.expand_from_attn, self.attn(compact, angles)))
        expanded = expanded.reshape(n, p2, d)
        # The per-pixel MLP runs on all L*p2 pixels as two matmuls; its activations
        # are not kept (recomputing them costs two thin matmuls and one GELU).
        if self.post_modulation:
            scale1, shift1, scale2, shift2 = mod
            x = _add(x, scale1, expanded, shift1)
            return _add(x, scale2, self.mlp.apply(self.norm2.apply(x).astype(dtype)), shift2)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[2:]
        x = _add(x, gate_msa, expanded)
        return _add(x, gate_mlp, self.mlp.apply(_modulated(self.norm2, x, shift_mlp, scale_mlp, dtype)))


def check_checkpoint(checkpoint: object) -> None:
    """Raise for a `checkpoint` that is not `False`, `"lean"` or `True`."""
    if not (isinstance(checkpoint, bool) or (isinstance(checkpoint, str) and checkpoint == "lean")):
        raise ValueError(f'`checkpoint` must be False, "lean" or True, got checkpoint={checkpoint!r}.')


def rematerialised(body: Callable[..., Any], checkpoint: Checkpoint) -> Callable[..., Any]:
    """`body` under the `jax.checkpoint` policy `checkpoint` names (`BlockStack`)."""
    if checkpoint is True:
        return jax.checkpoint(body)
    names = (RESIDUAL,) if checkpoint == "lean" else (RESIDUAL, WIDE_RESIDUAL)
    return jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(*names))


class BlockStack(eqx.Module, Generic[_Block]):
    """`depth` identical blocks stored as one block whose arrays carry a leading layer
    axis, applied with `lax.scan`: compile time does not grow with depth.

    **Arguments:**

    - `make_block`: `key -> block`, called (vmapped) once per layer key.
    - `depth`: the number of layers (0: the stack returns its carry).
    - `key`: a PRNG key, split into one per layer.
    - `checkpoint`: what the backward pass keeps (below): `False`, `"lean"` or `True`.
    - `blocks`: instead of `make_block` and `key`, an already stacked block whose arrays
      have the leading axis `depth` (`from_layers` stacks separately built blocks).

    Each block is called as `block(carry, *args) -> carry`; `args` (tables,
    conditioning) are shared by all layers and closed over, not stacked.

    What the backward pass keeps: by default (`checkpoint=False`) each layer keeps only
    the values its block marks with `_ops.keep` (matmul outputs: adaLN modulation, qkv,
    attention and projection outputs, the SwiGLU hidden layers) and recomputes the
    elementwise work in between (norms, modulation, activations, the per-pixel MLP) from
    them; measured, that halves the memory of forward+backward at no cost in time, and
    no matmul of the model is done twice except the two thin per-pixel MLP ones and the
    attention logits. `checkpoint="lean"` keeps those but the wide ones (the per-pixel
    adaLN modulation and the SwiGLU hidden layers), which are recomputed by their
    matmuls. With `checkpoint=True` the whole scan body is rematerialised: only the
    carry is kept per layer (least memory, one more forward pass).
    """

    blocks: _Block  # stacked: every array has a leading axis of size `depth`
    depth: int = eqx.field(static=True)
    checkpoint: Checkpoint = eqx.field(static=True)

    def __init__(
        self,
        make_block: Callable[[PRNGKeyArray], _Block] | None = None,
        depth: int = 1,
        *,
        key: PRNGKeyArray | None = None,
        checkpoint: Checkpoint = False,
        blocks: _Block | None = None,
    ):
        check_checkpoint(checkpoint)
        if blocks is None:
            if make_block is None or key is None:
                raise ValueError("BlockStack needs `make_block` and `key`, or stacked `blocks`.")
            if depth < 0:
                raise ValueError(f"BlockStack: `depth` must be >= 0, got {depth}.")
            blocks = cast(_Block, eqx.filter_vmap(make_block)(jr.split(key, depth)))
        else:
            sizes = {x.shape[0] for x in jax.tree.leaves(eqx.filter(blocks, eqx.is_array)) if x.ndim > 0}
            if sizes != {depth}:
                raise ValueError(
                    f"BlockStack: stacked `blocks` must have leading axis `depth`={depth}, got {sorted(sizes)}."
                )
        self.blocks = blocks
        self.depth = depth
        self.checkpoint = checkpoint

    @classmethod
    def from_layers(cls, layers: Sequence[_Block], checkpoint: Checkpoint = False) -> "BlockStack[_Block]":
        """Stack separately built blocks (all of one structure) into a `BlockStack`."""
        if not layers:
            raise ValueError(
                "BlockStack.from_layers: `layers` is empty; it needs one block to take the structure from."
            )
        params = [eqx.filter(layer, eqx.is_array) for layer in layers]
        static = eqx.filter(layers[0], eqx.is_array, inverse=True)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params)
        return cls(
            blocks=eqx.combine(stacked, static),
            depth=len(layers),
            checkpoint=checkpoint,
        )

    def layer(self, i: int) -> _Block:
        """Block `i` on its own (arrays without the layer axis)."""
        params, static = eqx.partition(self.blocks, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda x: x[i], params), static)

    def __call__(self, carry: PyTree[Array], *args: Any) -> PyTree[Array]:
        """Runs the stacked blocks in order under `lax.scan`: `carry = block_i(carry, *args)`."""
        if self.depth == 0:  # an empty stack (e.g. a reference config with `patch_depth=0`)
            return carry
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(carry, layer_params):
            return eqx.combine(layer_params, static)(carry, *args), None

        carry, _ = jax.lax.scan(rematerialised(body, self.checkpoint), carry, params)
        return carry

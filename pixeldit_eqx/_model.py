"""The two PixelDiT networks: class-conditional `PixelDiT` (reference
`pixeldit_c2i.PixDiT`) and text-conditional `PixelDiTT2I` (`pixeldit_t2i.PixDiT_T2I`).
Their settings are `PixelDiTConfig` and `PixelDiTT2IConfig` (`_config`)."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._blocks import BlockStack, DiTBlock, MMDiTBlock, PiTBlock
from ._compat import compile_lowered
from ._config import (
    build as build,  # re-exported: the loaders import it from here
    config_attribute,
    PixelDiTConfig,
    PixelDiTT2IConfig,
    register,
)
from ._custom_types import Checkpoint, Image, LabelLike, TimeLike
from ._ops import token_wise, zero_linear
from ._rope import rope_1d, rope_2d
from ._tokens import (
    check_image_size,
    ClassEmbedder,
    PatchEmbedder,
    patchify,
    PixelEmbedder,
    TextEmbedder,
    unpatchify,
)
from .modules import cast_params, FinalLayer, TimestepConditioner
from .runtime import _release_after_one_off


# The program that draws a model's initial parameters runs once, so on CPU XLA's
# optimisation passes cost more time than they save. Options an XLA does not know are
# dropped (`compile_lowered`).
_INIT_CPU_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
# Above this many parameters the random draws, not the compiles, take the time, and one
# program's temporaries would raise the peak memory (PixelDiT-XL: 6.6 GiB against 5.1).
_INIT_ONE_PROGRAM_MAX_PARAMS = 50_000_000


def _initialise(make: Any, key: PRNGKeyArray) -> Any:
    """`make(key)`, run as one compiled program when `key` is a concrete array and
    the result has at most 50M parameters.

    Eagerly, every initialiser compiles its own small program per parameter shape and
    keeps it cached (about 100 for a PixelDiT); one program for the whole model compiles
    once and is dropped after use (`docs/performance.md` has the times and memory
    measured). Under a transformation (`eqx.filter_eval_shape`, `jit`, `vmap` over keys)
    `make` is traced inline.
    """
    return compiled_once(make, key, max_outputs=_INIT_ONE_PROGRAM_MAX_PARAMS)


def compiled_once(fn: Any, *args: Any, max_outputs: int | None = None) -> Any:
    """`fn(*args)` as one program compiled for this call and dropped after it, so that
    nothing of it stays cached (eager ops each compile and keep a program per shape).

    Runs `fn` inline instead under a transformation (an argument is a tracer), with jit
    disabled, when the arrays in `args` lie on more than one device (their layout is
    then the caller's), or when the result has more than `max_outputs` elements.
    """
    leaves = [x for x in jax.tree.leaves(args) if eqx.is_array(x)]
    if getattr(jax.config, "jax_disable_jit") or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return fn(*args)
    if len({d for x in leaves if isinstance(x, jax.Array) for d in x.sharding.device_set}) > 1:
        return fn(*args)
    dynamic_args, static_args = eqx.partition(args, eqx.is_array)
    static = []

    def arrays(dynamic_args):
        dynamic, static_part = eqx.partition(fn(*eqx.combine(dynamic_args, static_args)), eqx.is_array)
        static.append(static_part)
        return dynamic

    lowered = jax.jit(arrays).lower(dynamic_args)
    if (
        max_outputs is not None
        and sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(lowered.out_info)) > max_outputs
    ):
        return fn(*args)
    options = _INIT_CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    out = jax.block_until_ready(compile_lowered(lowered, options)(dynamic_args))
    _release_after_one_off()
    return eqx.combine(out, static[0])


def _check_time(t: Any) -> None:
    t = jnp.asarray(t)
    if t.shape != ():
        raise ValueError(f"`t`: expected one scalar time (batch with `jax.vmap`), got shape {tuple(t.shape)}.")
    if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
        raise ValueError(f"`t`: expected a real time in [0, 1], got dtype {t.dtype}.")


def _check_label(y: Any, num_classes: int) -> Array:
    """`y` as an integer scalar array; out-of-range values raise at run time (under jit
    and vmap too) instead of silently reading a clamped table row."""
    y = jnp.asarray(y)
    if y.shape != ():
        raise ValueError(f"`y`: expected one class label (batch with `jax.vmap`), got shape {tuple(y.shape)}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"`y`: class labels must be integers, got dtype {y.dtype}; cast with `.astype(jnp.int32)`.")
    return eqx.error_if(
        y,
        (y < 0) | (y > num_classes),
        f"`y`: class labels must lie in [0, {num_classes}] (the last is the null class).",
    )


def _stream_dtype(dtype: Any) -> Any:
    """The residual streams' dtype: at least float32, whatever the compute dtype.

    The blocks compute in the compute dtype (bf16 when asked) and add their updates to
    float32 streams, so that the rounding of every update does not accumulate over the
    depth; the output head reads the float32 stream. `promote_types` obeys the
    promotion mode, and strict mode has no bf16 -> f32 path, hence the context.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


def _shared_parts(
    config: "PixelDiTConfig | PixelDiTT2IConfig",
    keys: tuple[PRNGKeyArray, ...],
    *,
    zero_pixel_adaln: bool,
    dtype: Any,
    checkpoint: Checkpoint,
) -> dict[str, Any]:
    """The parts both variants build alike, from the keys `(pixel embedder, patch embedder,
    timestep, pixel blocks, final layer)`: c2i zero-initialises the PiT blocks' adaLN, t2i
    does not (as the references)."""
    c = config
    kp, ks, kt, kx, kf = keys

    def make_pixel_block(k):
        block = PiTBlock(
            c.pixel_hidden_size, c.hidden_size, c.patch_size, c.pixel_attn_size, c.pixel_heads, c.mlp_ratio,
            c.pit_adaln_post_modulation, dtype, key=k,
        )  # fmt: skip
        return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln)) if zero_pixel_adaln else block

    return dict(
        pixel_embedder=PixelEmbedder(c.in_channels, c.pixel_hidden_size, c.use_pixel_abs_pos, dtype, key=kp),
        s_embedder=PatchEmbedder(c.in_channels * c.patch_size**2, c.hidden_size, dtype, key=ks),
        t_embedder=TimestepConditioner(c.hidden_size, dtype=dtype, key=kt),
        pixel_blocks=BlockStack(make_pixel_block, c.pixel_depth, key=kx, checkpoint=checkpoint),
        final_layer=FinalLayer(c.pixel_hidden_size, c.in_channels, dtype, key=kf),
    )


def _set_parts(model: eqx.Module, parts: dict[str, Any]) -> None:
    """Assign the initialised parts to `model`'s fields (in `__init__`)."""
    for name, part in parts.items():
        setattr(model, name, part)


class _ImageModel(eqx.Module):
    """What every model of the package shares (PixelDiT, PixelDiTT2I, PixelDiT2): a
    `config`, the image checks and the compute-dtype view."""

    s_embedder: eqx.AbstractVar[PatchEmbedder]
    config: eqx.AbstractVar[Any]
    compute_dtype: eqx.AbstractVar[Any]

    # The reference's attributes, read from the config.
    in_channels = config_attribute("in_channels")
    patch_size = config_attribute("patch_size")
    hidden_size = config_attribute("hidden_size")

    def _check_image(self, x: Array) -> tuple[int, int]:
        if x.ndim != 3:
            raise ValueError(
                f"`x`: expected one image of shape (C, H, W) (batch with `jax.vmap`), got shape {tuple(x.shape)}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`x`: expected a floating-point image, got dtype {x.dtype}.")
        if x.shape[0] != self.in_channels:
            raise ValueError(f"`x`: expected {self.in_channels} channels (C, H, W), got shape {tuple(x.shape)}.")
        return check_image_size(x.shape[1], x.shape[2], self.patch_size)

    def _compute_view(self, x: Array) -> tuple[Any, Array]:
        """The model and image in the compute dtype (parameters keep their own dtype)."""
        dtype = self.compute_dtype or self.s_embedder.proj.weight.dtype
        model = self if self.compute_dtype is None else cast_params(self, dtype)
        return model, x.astype(dtype)


class _PixelDiTBase(_ImageModel):
    """What both PixelDiT variants share: tokens, the pixel-level stack and the output head."""

    pixel_embedder: eqx.AbstractVar[PixelEmbedder]
    t_embedder: eqx.AbstractVar[TimestepConditioner]
    pixel_blocks: eqx.AbstractVar[BlockStack[PiTBlock]]
    final_layer: eqx.AbstractVar[FinalLayer]

    num_groups = config_attribute("num_groups")
    pixel_hidden_size = config_attribute("pixel_hidden_size")
    pixel_attn_hidden_size = config_attribute("pixel_attn_size", "Width of the pixel-level attention.")
    pixel_num_groups = config_attribute("pixel_heads", "Heads of the pixel-level attention.")

    def _pixel_level(self, x: Array, s_cond: Array) -> Array:
        """Pixel tokens through the PiT stack and the final layer, back to `(C, H, W)`."""
        _, h, w = x.shape
        hs, ws = h // self.patch_size, w // self.patch_size
        angles = rope_2d(self.pixel_attn_hidden_size // self.pixel_num_groups, hs, ws)
        out_dtype = _stream_dtype(x.dtype)
        with jax.named_scope("pixel_embed"):
            pix = self.pixel_embedder(x, self.patch_size).astype(out_dtype)
        with jax.named_scope("pixel_blocks"):
            pix = self.pixel_blocks(pix, s_cond, angles)
        # float32 island: the output head runs in (at least) float32.
        with jax.named_scope("final_layer"):
            final = cast_params(self.final_layer, out_dtype)
            return unpatchify(token_wise(final, pix.astype(out_dtype)), self.patch_size, h, w)


@register
class PixelDiT(_PixelDiTBase):
    """Class-conditional PixelDiT: patch-level DiT blocks for semantics, pixel-level PiT
    blocks for detail, in pixel space.

    Reference: `pixeldit_c2i.PixDiT`; argument names and defaults are the reference's,
    `model.config` holds them (`PixelDiTConfig`).
    Init as the reference: adaLN and final Linears zero, patch embedder xavier, class
    table and timestep MLP normal(0.02).

    **Arguments:**

    - `in_channels`, `patch_size`: image channels and patch side `p`.
    - `num_groups`, `hidden_size`, `patch_depth`: heads, width `D` and depth of the
      patch-level stack; `pixel_hidden_size` (`D_pix`), `pixel_depth`: the pixel level.
    - `num_classes`: labels `0..num_classes-1`; `num_classes` is the null class.
    - `use_pixel_abs_pos`: add the 2D sincos table to pixel tokens.
    - `pit_adaln_post_modulation`: the PiT blocks' post-modulation variant.
    - `mlp_ratio`: the width ratio of the patch blocks' SwiGLUs and the PiT blocks' MLPs.
    - `dtype`: parameter dtype; `compute_dtype`: dtype of activations (e.g.
      `jnp.bfloat16`: the matmuls and activations run in it; the residual streams, norm
      statistics, adaLN modulation and gates, timestep sinusoid, rope, softmax and the
      output head stay float32). Parameters are cast per call and stored as `dtype`.
    - `checkpoint`: what the blocks keep for the backward pass (memory for compute).
      `False`: their matmul outputs only (the rest is recomputed; fastest). `"lean"`: as
      `False` but the per-pixel adaLN modulation and the SwiGLU hidden layers, the
      widest of them, are recomputed too (one more matmul each). `True`: each block's
      input only (the whole block is rematerialised).
    - `key`: a PRNG key.

    Call on one example; `jax.vmap` for batches:

    ```python
    model = PixelDiT(patch_size=4, num_groups=4, hidden_size=64, pixel_hidden_size=8,
                     patch_depth=2, pixel_depth=2, num_classes=10, key=jr.key(0))
    v = jax.vmap(model)(x, t, y)  # x (B, 3, H, W), t (B,), y (B,) -> (B, 3, H, W)
    ```
    """

    pixel_embedder: PixelEmbedder
    s_embedder: PatchEmbedder
    t_embedder: TimestepConditioner
    y_embedder: ClassEmbedder
    patch_blocks: BlockStack[DiTBlock]
    pixel_blocks: BlockStack[PiTBlock]
    final_layer: FinalLayer
    config: PixelDiTConfig = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)

    variant: ClassVar[str] = "c2i"

    def __init__(
        self,
        in_channels: int = 4,
        num_groups: int = 12,
        hidden_size: int = 1152,
        pixel_hidden_size: int = 64,
        patch_depth: int = 18,
        pixel_depth: int = 4,
        patch_size: int = 2,
        num_classes: int = 1000,
        use_pixel_abs_pos: bool = True,
        pit_adaln_post_modulation: bool = False,
        mlp_ratio: float = 4.0,
        *,
        dtype: Any = None,
        compute_dtype: Any = None,
        checkpoint: Checkpoint = False,
        key: PRNGKeyArray,
    ):
        self.config = config = PixelDiTConfig.of(locals())
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

        def make_patch_block(k):
            block = DiTBlock(config.hidden_size, config.num_groups, config.mlp_ratio, dtype, key=k)
            return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln))

        def make_parts(key):
            kp, ks, kt, ky, kb, kx, kf = jr.split(key, 7)
            shared = _shared_parts(
                config, (kp, ks, kt, kx, kf), zero_pixel_adaln=True, dtype=dtype, checkpoint=checkpoint
            )
            return dict(
                shared,
                y_embedder=ClassEmbedder(config.num_classes, config.hidden_size, dtype, key=ky),
                patch_blocks=BlockStack(make_patch_block, config.patch_depth, key=kb, checkpoint=checkpoint),
            )

        _set_parts(self, _initialise(make_parts, key))

    num_classes = config_attribute("num_classes", "Labels `0..num_classes-1`; `num_classes` is the null label.")

    def patch_level(self, x: Image, t: TimeLike, y: LabelLike) -> Float[Array, "L {self.hidden_size}"]:
        """The per-patch conditioning `silu(t_emb + s)` that feeds the pixel blocks."""
        self._check_image(x)
        model, x = self._compute_view(x)
        return model._patch_level(x, t, y)

    def _patch_level(self, x: Array, t: TimeLike, y: LabelLike) -> Array:
        hs, ws = self._check_image(x)
        _check_time(t)
        y = _check_label(y, self.num_classes)
        t_emb = self.t_embedder(t)
        c = jax.nn.silu(t_emb + self.y_embedder(y))
        with jax.named_scope("patch_embed"):
            s = self.s_embedder(patchify(x, self.patch_size)).astype(_stream_dtype(x.dtype))
        with jax.named_scope("patch_blocks"):
            s = self.patch_blocks(s, c, rope_2d(self.hidden_size // self.num_groups, hs, ws))
        return jax.nn.silu(t_emb[None, :].astype(s.dtype) + s).astype(x.dtype)

    def __call__(self, x: Image, t: TimeLike, y: LabelLike) -> Float[Array, "{self.in_channels} H W"]:
        """Velocity `(C, H, W)` for image `x` at time `t` (0 noise, 1 data), label `y`."""
        self._check_image(x)
        model, xc = self._compute_view(x)
        return model._pixel_level(xc, model._patch_level(xc, t, y))


@register
class PixelDiTT2I(_PixelDiTBase):
    """Text-conditional PixelDiT: MMDiT patch blocks attend jointly over text and image.

    Reference: `pixeldit_t2i.PixDiT_T2I`; argument names and defaults are the
    reference's, `model.config` holds them (`PixelDiTT2IConfig`). Only the final Linear
    is zero-initialised. The conditioning is `silu(t_emb)`; text tokens are
    `norm(proj(text)) + y_pos_embedding[:T]`, text longer than `txt_max_length` is
    truncated to it (as the reference does).

    **Arguments:**

    - `in_channels`, `patch_size`, `num_groups`, `hidden_size`, `patch_depth`,
      `pixel_hidden_size`, `pixel_depth`, `use_pixel_abs_pos`, `pit_adaln_post_modulation`,
      `mlp_ratio`, `dtype`, `compute_dtype`, `checkpoint`, `key`: as `PixelDiT`'s.
    - `pixel_attn_hidden_size`, `pixel_num_groups`: width and heads of the pixel-level
      attention (default: the patch level's).
    - `txt_embed_dim`: the width of the text encoder's embeddings; `txt_max_length`: the
      rows of the text position table (longer text is truncated).
    - `use_text_rope`, `text_rope_theta`: 1D rope on the text stream, and its base.

    The reference's `num_text_blocks` and `repa_encoder_index` change nothing the model
    computes (one is unused, the other picks the tokens of a training-only loss); `build`
    and `load_reference` accept and ignore them.

    ```python
    v = jax.vmap(model)(x, t, text, text_mask)  # text (B, T, txt), mask (B, T) bool
    ```
    """

    pixel_embedder: PixelEmbedder
    s_embedder: PatchEmbedder
    t_embedder: TimestepConditioner
    y_embedder: TextEmbedder
    y_pos_embedding: Float[Array, "max_len D"]
    patch_blocks: BlockStack[MMDiTBlock]
    pixel_blocks: BlockStack[PiTBlock]
    final_layer: FinalLayer
    config: PixelDiTT2IConfig = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)

    variant: ClassVar[str] = "t2i"
    # The reference stores the text position table as (1, max_len, D).
    _torch_leading_one: ClassVar[tuple[str, ...]] = ("y_pos_embedding",)

    def __init__(
        self,
        in_channels: int = 3,
        num_groups: int = 16,
        hidden_size: int = 1152,
        pixel_hidden_size: int = 64,
        pixel_attn_hidden_size: int | None = None,
        pixel_num_groups: int | None = None,
        patch_depth: int = 26,
        pixel_depth: int = 2,
        patch_size: int = 16,
        txt_embed_dim: int = 4096,
        txt_max_length: int = 1024,
        use_text_rope: bool = True,
        text_rope_theta: float = 10000.0,
        use_pixel_abs_pos: bool = True,
        pit_adaln_post_modulation: bool = False,
        mlp_ratio: float = 4.0,
        *,
        dtype: Any = None,
        compute_dtype: Any = None,
        checkpoint: Checkpoint = False,
        key: PRNGKeyArray,
    ):
        self.config = config = PixelDiTT2IConfig.of(locals())
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        d = config.hidden_size

        def make_parts(key):
            kp, ks, kt, ky, kpos, kb, kx, kf = jr.split(key, 8)
            shared = _shared_parts(
                config, (kp, ks, kt, kx, kf), zero_pixel_adaln=False, dtype=dtype, checkpoint=checkpoint
            )
            return dict(
                shared,
                y_embedder=TextEmbedder(config.txt_embed_dim, d, dtype, key=ky),
                y_pos_embedding=jr.normal(kpos, (config.txt_max_length, d), dtype or jnp.float32),
                patch_blocks=BlockStack(
                    lambda k: MMDiTBlock(d, config.num_groups, config.mlp_ratio, dtype, key=k),
                    config.patch_depth,
                    key=kb,
                    checkpoint=checkpoint,
                ),
            )

        _set_parts(self, _initialise(make_parts, key))

    txt_embed_dim = config_attribute("txt_embed_dim")
    txt_max_length = config_attribute("txt_max_length")
    use_text_rope = config_attribute("use_text_rope")
    text_rope_theta = config_attribute("text_rope_theta")

    def _check_text(self, text: Array, text_mask: Array | None) -> None:
        if text.ndim != 2 or text.shape[1] != self.txt_embed_dim:
            raise ValueError(f"`text`: expected shape (T, {self.txt_embed_dim}), got {tuple(text.shape)}.")
        if text.shape[0] < 1:
            raise ValueError("`text`: needs at least one token, got T=0.")
        if not jnp.issubdtype(text.dtype, jnp.floating):
            raise ValueError(f"`text`: expected floating-point text embeddings, got dtype {text.dtype}.")
        if text_mask is not None and text_mask.dtype != jnp.bool_:
            raise ValueError(
                f"`text_mask`: expected a boolean mask (True on real tokens), got dtype {text_mask.dtype}."
            )
        if text_mask is not None and text_mask.shape != (text.shape[0],):
            raise ValueError(
                f"`text_mask`: expected shape ({text.shape[0]},) to match `text`, got {tuple(text_mask.shape)}."
            )

    def patch_level(
        self,
        x: Image,
        t: TimeLike,
        text: Float[Array, "T txt"],
        text_mask: Bool[Array, " T"] | None = None,
    ) -> Float[Array, "L {self.hidden_size}"]:
        """The per-patch conditioning `silu(t_emb + s)` that feeds the pixel blocks."""
        self._check_image(x)
        model, x = self._compute_view(x)
        return model._patch_level(x, t, text, text_mask)

    def _patch_level(self, x: Array, t: TimeLike, text: Array, text_mask: Array | None) -> Array:
        hs, ws = self._check_image(x)
        _check_time(t)
        self._check_text(text, text_mask)
        n_txt = min(text.shape[0], self.txt_max_length)
        text = text[:n_txt].astype(x.dtype)
        if text_mask is not None:
            text_mask = text_mask[:n_txt]
        y = self.y_embedder(text)
        y = y + self.y_pos_embedding[:n_txt].astype(y.dtype)
        t_emb = self.t_embedder(t)
        hd = self.hidden_size // self.num_groups
        text_angles = rope_1d(hd, n_txt, self.text_rope_theta) if self.use_text_rope else None
        stream = _stream_dtype(x.dtype)
        with jax.named_scope("patch_embed"):
            s = self.s_embedder(patchify(x, self.patch_size)).astype(stream)
        with jax.named_scope("patch_blocks"):
            s, _ = self.patch_blocks(
                (s, y.astype(stream)), jax.nn.silu(t_emb), rope_2d(hd, hs, ws), text_angles, text_mask
            )
        return jax.nn.silu(t_emb[None, :].astype(s.dtype) + s).astype(x.dtype)

    def __call__(
        self,
        x: Image,
        t: TimeLike,
        text: Float[Array, "T txt"] | tuple[Float[Array, "T txt"], Bool[Array, " T"] | None],
        text_mask: Bool[Array, " T"] | None = None,
    ) -> Float[Array, "{self.in_channels} H W"]:
        """Velocity `(C, H, W)` at time `t` for text embeddings `(T, txt_embed_dim)`;
        `text_mask` False marks padding tokens, which then take no part as keys.

        `text` may also be the pair `(text, text_mask)`: the one condition that
        `flow.sample(model, noise, (text, mask), ...)` hands over as the third argument.

        Text longer than `txt_max_length` tokens is truncated to its first
        `txt_max_length` tokens (and `text_mask` with it), silently, as the reference
        does: the position table has no rows beyond."""
        if isinstance(text, tuple | list):
            if len(text) != 2 or text_mask is not None:
                raise ValueError(
                    "`text`: expected a text array (T, txt_embed_dim) or one pair (text, text_mask) with "
                    f"`text_mask` left out, as in `flow.sample(model, noise, (text, mask), ...)`; got a "
                    f"{type(text).__name__} of length {len(text)}"
                    + (" and a `text_mask` too." if text_mask is not None else ".")
                )
            text, text_mask = text
        if not hasattr(text, "ndim"):
            raise ValueError(
                "`text`: expected a text array (T, txt_embed_dim) or a pair (text, text_mask), as in "
                f"`flow.sample(model, noise, (text, mask), ...)`; got {type(text).__name__}."
            )
        self._check_image(x)
        model, xc = self._compute_view(x)
        return model._pixel_level(xc, model._patch_level(xc, t, text, text_mask))

"""The two PixelDiT networks: class-conditional `PixelDiT` (reference
`pixeldit_c2i.PixDiT`) and text-conditional `PixelDiTT2I` (`pixeldit_t2i.PixDiT_T2I`),
plus `build`, which takes the reference's constructor arguments."""

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._blocks import BlockStack, DiTBlock, MMDiTBlock, PiTBlock
from ._compat import compile_lowered
from ._custom_types import Image, LabelLike, TimeLike
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
from .modules import (
    cast_params,
    FinalLayer,
    TimestepConditioner,
    token_wise,
    zero_linear,
)


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
    keeps it cached: about 100 for a PixelDiT, 10 s for the benchmark's mid-size config
    on a 2-core CPU, and about 250 MiB more resident than loading weights. One program
    for the whole model compiles in about 2 s and is dropped after use. Under a transformation
    (`eqx.filter_eval_shape`, `jit`, `vmap` over keys) `make` is traced inline.
    """
    if isinstance(key, jax.core.Tracer) or jax.config.jax_disable_jit:
        return make(key)
    static = []

    def arrays(key):
        dynamic, static_part = eqx.partition(make(key), eqx.is_array)
        static.append(static_part)
        return dynamic

    lowered = jax.jit(arrays).lower(key)
    if sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(lowered.out_info)) > _INIT_ONE_PROGRAM_MAX_PARAMS:
        return make(key)
    options = _INIT_CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    return eqx.combine(compile_lowered(lowered, options)(key), static[0])


def _at_least(low: int, **kwargs: int) -> None:
    """Each of `kwargs` is an int >= `low` (1, or 0 for the counts the reference allows
    to be zero)."""
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "positive" if low == 1 else "non-negative"
            raise ValueError(f"`{name}` must be a {what} integer, got {value!r}.")


def _check_rope_width(width: int, heads: int, what: str, heads_name: str) -> None:
    if width % heads:
        raise ValueError(f"`{what}`={width} must be divisible by `{heads_name}`={heads}.")
    if (width // heads) % 4:
        raise ValueError(
            f"2D rope needs a head dim divisible by 4: `{what}` / `{heads_name}` = {width} / {heads} = {width // heads}."
        )


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


def _frozen(**kwargs: Any) -> tuple:
    return tuple(kwargs.items())


def _stream_dtype(dtype: Any) -> Any:
    """The residual streams' dtype: at least float32, whatever the compute dtype.

    The blocks compute in the compute dtype (bf16 when asked) and add their updates to
    float32 streams, so that the rounding of every update does not accumulate over the
    depth; the output head reads the float32 stream. `promote_types` obeys the
    promotion mode, and strict mode has no bf16 -> f32 path, hence the context.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


class _PixelDiTBase(eqx.Module):
    """What both variants share: tokens, the pixel-level stack and the output head."""

    pixel_embedder: eqx.AbstractVar[PixelEmbedder]
    s_embedder: eqx.AbstractVar[PatchEmbedder]
    t_embedder: eqx.AbstractVar[TimestepConditioner]
    pixel_blocks: eqx.AbstractVar[BlockStack[PiTBlock]]
    final_layer: eqx.AbstractVar[FinalLayer]
    in_channels: eqx.AbstractVar[int]
    patch_size: eqx.AbstractVar[int]
    hidden_size: eqx.AbstractVar[int]
    num_groups: eqx.AbstractVar[int]
    pixel_attn_hidden_size: eqx.AbstractVar[int]
    pixel_num_groups: eqx.AbstractVar[int]
    compute_dtype: eqx.AbstractVar[Any]
    _config: eqx.AbstractVar[tuple]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (reference names) this model was built with."""
        return dict(self._config)

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

    def _pixel_level(self, x: Array, s_cond: Array) -> Array:
        """Pixel tokens through the PiT stack and the final layer, back to `(C, H, W)`."""
        _, h, w = x.shape
        hs, ws = h // self.patch_size, w // self.patch_size
        angles = rope_2d(self.pixel_attn_hidden_size // self.pixel_num_groups, hs, ws)
        out_dtype = _stream_dtype(x.dtype)
        pix = self.pixel_embedder(x, self.patch_size).astype(out_dtype)
        pix = self.pixel_blocks(pix, s_cond, angles)
        # float32 island: the output head runs in (at least) float32.
        final = cast_params(self.final_layer, out_dtype)
        return unpatchify(token_wise(final, pix.astype(out_dtype)), self.patch_size, h, w)


class PixelDiT(_PixelDiTBase):
    """Class-conditional PixelDiT: patch-level DiT blocks for semantics, pixel-level PiT
    blocks for detail, in pixel space.

    Reference: `pixeldit_c2i.PixDiT`; argument names and defaults are the reference's.
    Init as the reference: adaLN and final Linears zero, patch embedder xavier, class
    table and timestep MLP normal(0.02).

    **Arguments:**

    - `in_channels`, `patch_size`: image channels and patch side `p`.
    - `num_groups`, `hidden_size`, `patch_depth`: heads, width `D` and depth of the
      patch-level stack; `pixel_hidden_size` (`D_pix`), `pixel_depth`: the pixel level.
    - `num_classes`: labels `0..num_classes-1`; `num_classes` is the null class.
    - `use_pixel_abs_pos`: add the 2D sincos table to pixel tokens.
    - `pit_adaln_post_modulation`: the PiT blocks' post-modulation variant.
    - `dtype`: parameter dtype; `compute_dtype`: dtype of activations (e.g.
      `jnp.bfloat16`: the matmuls and activations run in it; the residual streams, norm
      statistics, adaLN modulation and gates, timestep sinusoid, rope, softmax and the
      output head stay float32). Parameters are cast per call and stored as `dtype`.
    - `checkpoint`: rematerialise each block in the backward pass (memory for compute;
      by default the blocks keep only their matmul outputs for the backward pass).
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
    in_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    num_groups: int = eqx.field(static=True)
    pixel_hidden_size: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    pixel_attn_hidden_size: int = eqx.field(static=True)
    pixel_num_groups: int = eqx.field(static=True)
    _config: tuple = eqx.field(static=True)
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
        checkpoint: bool = False,
        key: PRNGKeyArray,
    ):
        _at_least(
            1,
            in_channels=in_channels,
            num_groups=num_groups,
            hidden_size=hidden_size,
            pixel_hidden_size=pixel_hidden_size,
            pixel_depth=pixel_depth,
            patch_size=patch_size,
        )
        # As in the reference: no patch blocks, or no classes (labels: only the null
        # class 0, an unconditional model), are valid configurations.
        _at_least(0, patch_depth=patch_depth, num_classes=num_classes)
        _check_rope_width(hidden_size, num_groups, "hidden_size", "num_groups")
        self._config = _frozen(
            in_channels=in_channels,
            num_groups=num_groups,
            hidden_size=hidden_size,
            pixel_hidden_size=pixel_hidden_size,
            patch_depth=patch_depth,
            pixel_depth=pixel_depth,
            patch_size=patch_size,
            num_classes=num_classes,
            use_pixel_abs_pos=bool(use_pixel_abs_pos),
            pit_adaln_post_modulation=bool(pit_adaln_post_modulation),
            mlp_ratio=float(mlp_ratio),
        )

        def make_patch_block(k):
            block = DiTBlock(hidden_size, num_groups, mlp_ratio, dtype, key=k)
            return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln))

        def make_pixel_block(k):
            block = PiTBlock(
                pixel_hidden_size, hidden_size, patch_size, hidden_size, num_groups, mlp_ratio,
                pit_adaln_post_modulation, dtype, key=k,
            )  # fmt: skip
            return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln))

        def make_parts(key):
            kp, ks, kt, ky, kb, kx, kf = jr.split(key, 7)
            return (
                PixelEmbedder(in_channels, pixel_hidden_size, use_pixel_abs_pos, dtype, key=kp),
                PatchEmbedder(in_channels * patch_size**2, hidden_size, dtype, key=ks),
                TimestepConditioner(hidden_size, dtype=dtype, key=kt),
                ClassEmbedder(num_classes, hidden_size, dtype, key=ky),
                BlockStack(make_patch_block, patch_depth, key=kb, checkpoint=checkpoint),
                BlockStack(make_pixel_block, pixel_depth, key=kx, checkpoint=checkpoint),
                FinalLayer(pixel_hidden_size, in_channels, dtype, key=kf),
            )

        (
            self.pixel_embedder,
            self.s_embedder,
            self.t_embedder,
            self.y_embedder,
            self.patch_blocks,
            self.pixel_blocks,
            self.final_layer,
        ) = _initialise(make_parts, key)
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.pixel_hidden_size = pixel_hidden_size
        self.num_classes = num_classes
        self.pixel_attn_hidden_size = hidden_size
        self.pixel_num_groups = num_groups
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

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
        s = self.s_embedder(patchify(x, self.patch_size)).astype(_stream_dtype(x.dtype))
        s = self.patch_blocks(s, c, rope_2d(self.hidden_size // self.num_groups, hs, ws))
        return jax.nn.silu(t_emb[None, :].astype(s.dtype) + s).astype(x.dtype)

    def __call__(self, x: Image, t: TimeLike, y: LabelLike) -> Float[Array, "{self.in_channels} H W"]:
        """Velocity `(C, H, W)` for image `x` at time `t` (0 noise, 1 data), label `y`."""
        self._check_image(x)
        model, xc = self._compute_view(x)
        return model._pixel_level(xc, model._patch_level(xc, t, y))


class PixelDiTT2I(_PixelDiTBase):
    """Text-conditional PixelDiT: MMDiT patch blocks attend jointly over text and image.

    Reference: `pixeldit_t2i.PixDiT_T2I`; argument names and defaults are the
    reference's. Only the final Linear is zero-initialised. The conditioning is
    `silu(t_emb)`; text tokens are `norm(proj(text)) + y_pos_embedding[:T]`, text longer
    than `txt_max_length` is truncated to it (as the reference does).

    **Arguments:** as `PixelDiT` without `num_classes`, plus `pixel_attn_hidden_size`,
    `pixel_num_groups` (width and heads of the pixel-level attention; default the patch
    level's), `txt_embed_dim`, `txt_max_length`, `use_text_rope`, `text_rope_theta`.
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
    in_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    num_groups: int = eqx.field(static=True)
    pixel_hidden_size: int = eqx.field(static=True)
    pixel_attn_hidden_size: int = eqx.field(static=True)
    pixel_num_groups: int = eqx.field(static=True)
    txt_embed_dim: int = eqx.field(static=True)
    txt_max_length: int = eqx.field(static=True)
    use_text_rope: bool = eqx.field(static=True)
    text_rope_theta: float = eqx.field(static=True)
    _config: tuple = eqx.field(static=True)
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
        checkpoint: bool = False,
        key: PRNGKeyArray,
    ):
        attn_size = hidden_size if pixel_attn_hidden_size is None else pixel_attn_hidden_size
        pixel_heads = num_groups if pixel_num_groups is None else pixel_num_groups
        _at_least(
            1,
            in_channels=in_channels,
            num_groups=num_groups,
            hidden_size=hidden_size,
            pixel_hidden_size=pixel_hidden_size,
            pixel_attn_hidden_size=attn_size,
            pixel_num_groups=pixel_heads,
            pixel_depth=pixel_depth,
            patch_size=patch_size,
            txt_embed_dim=txt_embed_dim,
            txt_max_length=txt_max_length,
        )
        _at_least(0, patch_depth=patch_depth)  # as in the reference, no patch blocks is valid
        _check_rope_width(hidden_size, num_groups, "hidden_size", "num_groups")
        _check_rope_width(attn_size, pixel_heads, "pixel_attn_hidden_size", "pixel_num_groups")
        self._config = _frozen(
            in_channels=in_channels,
            num_groups=num_groups,
            hidden_size=hidden_size,
            pixel_hidden_size=pixel_hidden_size,
            pixel_attn_hidden_size=pixel_attn_hidden_size,
            pixel_num_groups=pixel_num_groups,
            patch_depth=patch_depth,
            pixel_depth=pixel_depth,
            patch_size=patch_size,
            txt_embed_dim=txt_embed_dim,
            txt_max_length=txt_max_length,
            use_text_rope=bool(use_text_rope),
            text_rope_theta=float(text_rope_theta),
            use_pixel_abs_pos=bool(use_pixel_abs_pos),
            pit_adaln_post_modulation=bool(pit_adaln_post_modulation),
            mlp_ratio=float(mlp_ratio),
        )

        def make_parts(key):
            kp, ks, kt, ky, kpos, kb, kx, kf = jr.split(key, 8)
            return (
                PixelEmbedder(in_channels, pixel_hidden_size, use_pixel_abs_pos, dtype, key=kp),
                PatchEmbedder(in_channels * patch_size**2, hidden_size, dtype, key=ks),
                TimestepConditioner(hidden_size, dtype=dtype, key=kt),
                TextEmbedder(txt_embed_dim, hidden_size, dtype, key=ky),
                jr.normal(kpos, (txt_max_length, hidden_size), dtype or jnp.float32),
                BlockStack(
                    lambda k: MMDiTBlock(hidden_size, num_groups, mlp_ratio, dtype, key=k),
                    patch_depth,
                    key=kb,
                    checkpoint=checkpoint,
                ),
                BlockStack(
                    lambda k: PiTBlock(
                        pixel_hidden_size, hidden_size, patch_size, attn_size, pixel_heads, mlp_ratio,
                        pit_adaln_post_modulation, dtype, key=k,
                    ),
                    pixel_depth,
                    key=kx,
                    checkpoint=checkpoint,
                ),
                FinalLayer(pixel_hidden_size, in_channels, dtype, key=kf),
            )  # fmt: skip

        (
            self.pixel_embedder,
            self.s_embedder,
            self.t_embedder,
            self.y_embedder,
            self.y_pos_embedding,
            self.patch_blocks,
            self.pixel_blocks,
            self.final_layer,
        ) = _initialise(make_parts, key)
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.pixel_hidden_size = pixel_hidden_size
        self.pixel_attn_hidden_size = attn_size
        self.pixel_num_groups = pixel_heads
        self.txt_embed_dim = txt_embed_dim
        self.txt_max_length = txt_max_length
        self.use_text_rope = bool(use_text_rope)
        self.text_rope_theta = float(text_rope_theta)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

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
        s = self.s_embedder(patchify(x, self.patch_size)).astype(stream)
        s, _ = self.patch_blocks((s, y.astype(stream)), jax.nn.silu(t_emb), rope_2d(hd, hs, ws), text_angles, text_mask)
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


VARIANTS: dict[str, type[eqx.Module]] = {"c2i": PixelDiT, "t2i": PixelDiTT2I}

_CONFIG_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", type(None): "None"}


def _annotation_options(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def _config_value_fits(annotation: Any, value: Any) -> bool:
    """Whether a config value has the plain Python type a constructor argument needs
    (a YAML `64.0` or `"64"` for an int, a `"no"` for a bool, are refused)."""
    for option in _annotation_options(annotation):
        if option not in _CONFIG_TYPE_NAMES:
            return True  # not a plain type: left to the constructor
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool | np.bool_):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
    return False


def _describe_annotation(annotation: Any) -> str:
    return " or ".join(_CONFIG_TYPE_NAMES.get(o, str(o)) for o in _annotation_options(annotation))


# Reference constructor arguments that change nothing the model computes: accepted (so
# that a reference config loads as it is) and dropped.
_REFERENCE_ONLY = {"t2i": ("num_text_blocks", "repa_encoder_index")}


def build(
    config: Mapping[str, Any] | str,
    variant: str | None = None,
    *,
    key: PRNGKeyArray | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    checkpoint: bool = False,
) -> "PixelDiT | PixelDiTT2I | PixelDiT2":
    """Build a model from the reference's constructor arguments (a released YAML's
    `init_args`) or a preset name (see `pixeldit_eqx.PRESETS`).

    `variant` (`"c2i"`, `"t2i"` or `"pixeldit2"`; a plain `str` so that a wrong one gets the
    `ValueError` below, not a type-checker error) defaults to the preset's, else
    `"c2i"`. Unknown or wrongly typed arguments raise `ValueError`; the t2i reference's
    `num_text_blocks` and `repa_encoder_index`, which change nothing the model computes,
    are accepted and ignored. `key` defaults to `jr.key(0)`.
    """
    from ._presets import resolve

    preset = config if isinstance(config, str) else None
    config, preset_variant = resolve(config)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(VARIANTS)}, got {variant!r}.")
    if variant is not None and preset_variant is not None and variant != preset_variant:
        raise ValueError(
            f"`variant`={variant!r} contradicts the preset {preset!r}, which is a {preset_variant!r} model; "
            "leave `variant` out."
        )
    variant = variant or preset_variant or "c2i"
    cls = VARIANTS[variant]
    # numpy scalars (a config read with numpy) count as the Python value they hold.
    config = {k: v.item() if isinstance(v, np.generic) else v for k, v in config.items()}
    for name in _REFERENCE_ONLY.get(variant, ()):
        if name in config:
            value = config.pop(name)
            if not _config_value_fits(int, value):
                raise ValueError(f"`config`: `{name}` must be an int, got {value!r} of type {type(value).__name__}.")
    params = inspect.signature(cls.__init__).parameters.values()
    allowed = {p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD} - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"`config`: unknown argument(s) {unknown} for variant {variant!r}; accepted: {sorted(allowed)}."
        )
    for p in params:
        if p.name in config and not _config_value_fits(p.annotation, config[p.name]):
            value = config[p.name]
            raise ValueError(
                f"`config`: `{p.name}` must be {_describe_annotation(p.annotation)}, "
                f"got {value!r} of type {type(value).__name__}."
            )
    key = jr.key(0) if key is None else key
    return cls(
        **config,
        dtype=dtype,
        compute_dtype=compute_dtype,
        checkpoint=checkpoint,
        key=key,
    )


# PixelDiT2 builds on the helpers above, so it joins the variants once they exist.
from ._pixeldit2 import PixelDiT2  # noqa: E402


VARIANTS["pixeldit2"] = PixelDiT2

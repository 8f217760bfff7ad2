"""PixelDiT2, the representation-grounded pixel diffusion transformer (reference
`pixdit_core/pixeldit2_c2i.PixelDiT2`), and its parts (`pixdit_core/modules.py`,
`pixdit_core/grounding.py`): a patch-level DiT whose per-patch condition comes from a frozen
DINOv3 looking at the input image, with in-context class tokens, predicting the clean image.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._attention import _check_heads, RotaryAttention
from ._blocks import _add, _modulate, _modulated, BlockStack, rematerialised
from ._config import _is_int, _resolve_encoder, config_attribute, PixelDiT2Config, register
from ._custom_types import Checkpoint, Image, LabelLike, TimeLike
from ._dinov3 import DINOv3, DINOv3Config, encoder_config
from ._model import _check_label, _check_time, _ImageModel, _initialise, _stream_dtype
from ._ops import keep, linear, silu_gate, zero_linear
from ._resize import resize_bicubic
from ._rope import rope_2d
from ._tokens import ClassEmbedder, PatchEmbedder, patchify, unpatchify
from .modules import cast_params, RMSNorm, TimestepConditioner


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _dropout(x: Array, rate: float | Array, key: PRNGKeyArray | None) -> Array:
    """`nn.Dropout(rate)` in training mode when `key` is given, else the identity."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return x
    keep_mask = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep_mask, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _split(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jr.split(key, n))


class FeedForward(eqx.Module):
    """SwiGLU `w2(silu(w1 x) * w3 x)`, no biases, with the reference's hidden width:
    `int(2 * hidden_dim / 3)`, rounded up to a multiple of `hidden_multiple` when > 0.

    Reference: `modules.FeedForward(dim, hidden_dim, drop, hidden_multiple)`; `drop` is the
    dropout on the gated hidden activations (training only: active when a `key` is given;
    `rate` overrides it per call).
    """

    w1: eqx.nn.Linear
    w2: eqx.nn.Linear
    w3: eqx.nn.Linear
    drop: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        hidden_multiple: int = 0,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        hidden = int(2 * hidden_dim / 3)
        if hidden_multiple > 0:
            hidden = -(-hidden // hidden_multiple) * hidden_multiple
        if dim < 1 or hidden < 1:
            raise ValueError(
                f"FeedForward: need `dim` >= 1 and a positive hidden width, got dim={dim}, hidden_dim={hidden_dim}."
            )
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"FeedForward: `drop` must lie in [0, 1), got {drop}.")
        k1, k2, k3 = jr.split(key, 3)
        self.w1 = eqx.nn.Linear(dim, hidden, use_bias=False, dtype=dtype, key=k1)
        self.w2 = eqx.nn.Linear(hidden, dim, use_bias=False, dtype=dtype, key=k2)
        self.w3 = eqx.nn.Linear(dim, hidden, use_bias=False, dtype=dtype, key=k3)
        self.drop = float(drop)

    @jax.named_scope("FeedForward")
    def __call__(
        self,
        x: Float[Array, "*batch dim"],
        *,
        key: PRNGKeyArray | None = None,
        rate: float | Float[Array, ""] | None = None,
    ) -> Float[Array, "*batch dim"]:
        gate, value = keep(linear(self.w1, x), wide=True), keep(linear(self.w3, x), wide=True)
        hidden = _dropout(silu_gate(gate, value), self.drop if rate is None else rate, key)
        return keep(linear(self.w2, hidden))


class ModulatedDiTBlock(eqx.Module):
    """DiT block with adaLN from a condition per token: `c (L, D)` (or one `c (D,)` for
    all tokens).

    Reference: `modules.ModulatedDiTBlock`: `adaLN_modulation = Sequential(SiLU, Linear(D,
    6D))`, so the SiLU is applied here (PixelDiT2 passes an already activated condition, a
    second SiLU); chunks shift, scale, gate (attention) then shift, scale, gate (SwiGLU);
    RMSNorm eps 1e-6; q/k RMSNorm per head then rope. `proj_drop` is the dropout after the
    attention projection and inside the SwiGLU (training only: when a `key` is given;
    `dropout` overrides it per call, as PixelDiT2 does for its scanned blocks);
    the reference's `attn_drop` never acts (its attention runs with `dropout_p=0`).
    """

    norm1: RMSNorm
    attn: RotaryAttention
    norm2: RMSNorm
    mlp: FeedForward
    adaln: eqx.nn.Linear
    proj_drop: float = eqx.field(static=True)

    _torch_names: ClassVar[dict[str, str]] = {"adaln": "adaLN_modulation.1"}

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mlp_hidden_multiple: int = 0,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        del attn_drop  # the reference's attention always runs with dropout_p=0
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = RMSNorm(hidden_size, dtype=dtype)
        self.attn = RotaryAttention(hidden_size, num_heads, dtype=dtype, key=k1)
        self.norm2 = RMSNorm(hidden_size, dtype=dtype)
        self.mlp = FeedForward(hidden_size, int(hidden_size * mlp_ratio), proj_drop, mlp_hidden_multiple, dtype, key=k2)
        self.adaln = eqx.nn.Linear(hidden_size, 6 * hidden_size, dtype=dtype, key=k3)
        self.proj_drop = float(proj_drop)

    @jax.named_scope("ModulatedDiTBlock")
    def __call__(
        self,
        x: Float[Array, "N D"],
        c: Float[Array, "N D"] | Float[Array, " D"],
        angles: Float[Array, "N hd2"],
        *,
        key: PRNGKeyArray | None = None,
        dropout: float | Float[Array, ""] | None = None,
    ) -> Float[Array, "N D"]:
        dtype = self.adaln.weight.dtype  # the compute dtype; x carries the stream's
        rate = self.proj_drop if dropout is None else dropout
        mod = keep(linear(self.adaln, jax.nn.silu(c.astype(dtype)), x.dtype), wide=c.ndim == 2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        k_attn, k_mlp = _split(key, 2)
        h = _modulated(self.norm1, x, shift_msa, scale_msa, dtype)
        x = _add(x, gate_msa, _dropout(self.attn(h, angles), rate, k_attn))
        h = _modulated(self.norm2, x, shift_mlp, scale_mlp, dtype)
        return _add(x, gate_mlp, self.mlp(h, key=k_mlp, rate=rate))


class PatchFinalLayer(eqx.Module):
    """Output head: `linear(RMSNorm(x) * (1 + scale) + shift)` with `(shift, scale)` from
    `Linear(silu(c))`, per token (`c (L, D)`) or shared (`c (D,)`).

    Reference: `modules.PatchFinalLayer`; the output features of a token are its `p x p`
    pixels row-major, each with its `C` channels (`(p, p, C)` order).
    """

    norm: RMSNorm
    linear: eqx.nn.Linear
    adaln: eqx.nn.Linear

    _torch_names: ClassVar[dict[str, str]] = {"adaln": "adaLN_modulation.1"}

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, dtype: Any = None, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.norm = RMSNorm(hidden_size, dtype=dtype)
        self.linear = eqx.nn.Linear(hidden_size, patch_size * patch_size * out_channels, dtype=dtype, key=k1)
        self.adaln = eqx.nn.Linear(hidden_size, 2 * hidden_size, dtype=dtype, key=k2)

    def __call__(self, x: Float[Array, "L D"], c: Float[Array, "L D"] | Float[Array, " D"]) -> Float[Array, "L out"]:
        dtype = self.adaln.weight.dtype
        shift, scale = jnp.split(linear(self.adaln, jax.nn.silu(c.astype(dtype)), x.dtype), 2, axis=-1)
        h = self.norm.apply(x)
        return linear(self.linear, _modulate(h, shift.astype(h.dtype), scale.astype(h.dtype)).astype(dtype))


class TimestepProjection(eqx.Module):
    """Encoder tokens -> condition tokens: `input_proj`, modulated DiT block(s) conditioned
    on the time alone (one `t_embedder(t)` for every token, 2D rope on the token grid),
    `output_proj`.

    Reference: `grounding.TimestepProjection(in_dim, out_dim, hidden_size, num_blocks,
    num_heads, mlp_ratio)`.
    """

    input_proj: eqx.nn.Linear
    t_embedder: TimestepConditioner
    blocks: BlockStack[ModulatedDiTBlock]
    output_proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_size: int,
        num_blocks: int = 1,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        dtype: Any = None,
        *,
        checkpoint: Checkpoint = False,
        key: PRNGKeyArray,
    ):
        hd = _check_heads(hidden_size, num_heads, "TimestepProjection")
        if hd % 4:
            raise ValueError(
                f"TimestepProjection: 2D rope needs a head dim divisible by 4, got hidden_size / num_heads = "
                f"{hidden_size} / {num_heads} = {hd}."
            )
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"TimestepProjection: `num_blocks` must be a non-negative integer, got {num_blocks!r}.")
        k1, k2, k3, k4 = jr.split(key, 4)

        def make_block(k):
            block = ModulatedDiTBlock(hidden_size, num_heads, mlp_ratio, dtype=dtype, key=k)
            return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln))

        self.input_proj = eqx.nn.Linear(in_dim, hidden_size, dtype=dtype, key=k1)
        self.t_embedder = TimestepConditioner(hidden_size, dtype=dtype, key=k2)
        self.blocks = BlockStack(make_block, num_blocks, key=k3, checkpoint=checkpoint)
        self.output_proj = eqx.nn.Linear(hidden_size, out_dim, dtype=dtype, key=k4)
        self.num_heads = num_heads

    def __call__(
        self, tokens: Float[Array, "L in_dim"], t: TimeLike, grid_hw: tuple[int, int]
    ) -> Float[Array, "L out_dim"]:
        gh, gw = grid_hw
        if tokens.shape[0] != gh * gw:
            raise ValueError(f"`tokens`: expected {gh} * {gw} = {gh * gw} tokens for `grid_hw`, got {tokens.shape[0]}.")
        _check_time(t)
        dtype = self.input_proj.weight.dtype
        x = linear(self.input_proj, tokens.astype(dtype))
        c = self.t_embedder(t).astype(dtype)
        hidden = x.shape[-1]
        x = self.blocks(x, c, rope_2d(hidden // self.num_heads, gh, gw))
        return linear(self.output_proj, x)


class GroundingConditioner(eqx.Module):
    """The grounding condition: the image, mapped to ImageNet normalisation and resized
    (bicubic) so the frozen DINOv3 sees one patch per target patch, then the encoder's patch
    tokens through a `TimestepProjection`.

    Reference: `grounding.GroundingConditioner`; argument names are the reference's.
    `encoder_name` is a preset name (`"dinov3_vits16"`, `"dinov3_vitb16"`,
    `"dinov3_vitl16"`) or a mapping like the fixtures' `encoder` entries; the fixtures'
    separate `encoder` mapping is accepted too. `pretrained_encoder` is accepted and ignored
    (weights come from a state dict). The encoder runs without gradient, as under the
    reference's `torch.no_grad()`.

    **Arguments:**

    - `encoder_name`: the frozen encoder, a preset name, a mapping or a `DINOv3Config`.
    - `hidden_size`: the width `D` of the condition tokens.
    - `target_patch_size`: the patch side `p` of the model the tokens condition: the
      image is resized so that each encoder patch covers one target patch.
    - `proj_num_blocks`, `proj_num_heads`: blocks and heads of the `TimestepProjection`.
    - `pretrained_encoder`: accepted and ignored.
    - `encoder`: the fixtures' separate encoder mapping, used in place of `encoder_name`'s.
    - `dtype`: the parameters' dtype (default float32).
    - `checkpoint`: what each projection block keeps for the backward pass (`False`,
      `"lean"` or `True`, as `PixelDiT`'s).
    - `key`: a PRNG key for the initialisation (the encoder's weights come from a state dict).

    ```python
    cond = GroundingConditioner("dinov3_vits16", hidden_size=1280, target_patch_size=16, key=key)
    tokens = jax.vmap(cond)(x, t)  # x (B, 3, 256, 256) in [-1, 1] -> (B, 256, 1280)
    ```
    """

    encoder: DINOv3
    dino_proj: TimestepProjection
    target_patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        encoder_name: "str | Mapping[str, Any] | DINOv3Config",
        hidden_size: int,
        target_patch_size: int,
        proj_num_blocks: int = 1,
        proj_num_heads: int = 16,
        pretrained_encoder: bool = True,
        encoder: Mapping[str, Any] | None = None,
        *,
        dtype: Any = None,
        checkpoint: Checkpoint = False,
        key: PRNGKeyArray,
    ):
        del pretrained_encoder  # weights come from a state dict
        if not isinstance(target_patch_size, int) or isinstance(target_patch_size, bool) or target_patch_size < 1:
            raise ValueError(f"`target_patch_size` must be a positive integer, got {target_patch_size!r}.")
        spec = encoder_config(_resolve_encoder(encoder_name, encoder, "encoder_name"))
        k1, k2 = jr.split(key)
        self.encoder = DINOv3(spec, dtype=dtype, key=k1)
        self.dino_proj = TimestepProjection(
            spec.embed_dim,
            hidden_size,
            hidden_size,
            proj_num_blocks,
            proj_num_heads,
            dtype=dtype,
            checkpoint=checkpoint,
            key=k2,
        )
        self.target_patch_size = target_patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The condition's token grid `(H // target_patch_size, W // target_patch_size)`."""
        gh, gw = height // self.target_patch_size, width // self.target_patch_size
        if gh < 1 or gw < 1:
            raise ValueError(
                f"`x`: the image ({height}, {width}) is smaller than `target_patch_size`={self.target_patch_size}."
            )
        return gh, gw

    def preprocess(self, x: Image) -> Float[Array, "3 h w"]:
        """The encoder's input: `((x + 1) / 2 - mean) / std` (ImageNet), bicubic-resized to
        `grid * encoder_patch` when that differs from `(H, W)` (a 1-channel image
        broadcasts to the three channels, as in the reference)."""
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"`x`: expected one image (1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`x`: expected a floating-point image, got dtype {x.dtype}.")
        _, height, width = x.shape
        gh, gw = self.grid(height, width)
        p = self.encoder.patch_size
        mean = jnp.asarray(_IMAGENET_MEAN, jnp.float32).reshape(3, 1, 1).astype(x.dtype)
        std = jnp.asarray(_IMAGENET_STD, jnp.float32).reshape(3, 1, 1).astype(x.dtype)
        x = ((x + 1.0) * 0.5 - mean) / std
        return resize_bicubic(x, (gh * p, gw * p))

    def encode(self, x: Image) -> Float[Array, "L {self.encoder.config.embed_dim}"]:
        """The frozen encoder's patch tokens for image `x`, one per target patch, row-major."""
        return jax.lax.stop_gradient(self.encoder.patch_tokens(self.preprocess(x)))

    def __call__(self, x: Image, t: TimeLike) -> Float[Array, "L D"]:
        """The grounding tokens `(H/p * W/p, hidden_size)` for image `x` at time `t`."""
        grid_hw = self.grid(x.shape[-2], x.shape[-1]) if x.ndim == 3 else (0, 0)
        return self.dino_proj(self.encode(x), t, grid_hw)


def _run_blocks(
    stack: BlockStack[ModulatedDiTBlock],
    lo: int,
    hi: int,
    x: Array,
    c: Array,
    angles: Array,
    keys: Array | None,
    rates: Array | None,
) -> Array:
    """Blocks `lo..hi-1` of `stack` as one `lax.scan`; in training mode (`keys`, `rates`:
    one dropout key and rate per block) with dropout.

    The same scan and backward-pass policy as `BlockStack.__call__`, on a slice of the
    stacked layers, with per-layer keys and rates.
    """
    if hi <= lo:
        return x
    params, static = eqx.partition(stack.blocks, eqx.is_array)
    params = jax.tree.map(lambda a: a[lo:hi], params)

    def body(x, layer):
        layer_params, key, rate = layer
        return eqx.combine(layer_params, static)(x, c, angles, key=key, dropout=rate), None

    body = rematerialised(body, stack.checkpoint)
    if keys is not None and rates is not None:  # training: per-block keys and dropout rates
        x, _ = jax.lax.scan(body, x, (params, keys[lo:hi], rates[lo:hi]))
    else:
        x, _ = jax.lax.scan(body, x, (params, None, None))
    return x


@register
class PixelDiT2(_ImageModel):
    """PixelDiT2: a patch-level DiT in pixel space, each patch conditioned on
    `silu(grounding + t_emb + y_emb)` where the grounding tokens come from a frozen DINOv3
    looking at the input image; `in_context_len` class tokens join the sequence at block
    `in_context_start`. It predicts the clean image (x-prediction).

    Reference: `pixeldit2_c2i.PixelDiT2`; argument names and defaults are the reference's,
    `model.config` holds them (`PixelDiT2Config`). `grounding_encoder` is a preset name
    (`"dinov3_vits16"`, `"dinov3_vitb16"`, `"dinov3_vitl16"`) or a mapping (the fixtures'
    `encoder` entries: timm name + `kwargs` size overrides + `feature_dim` + `patch_size`); a
    separate `encoder` mapping is accepted as in the fixtures' manifest; `pretrained_encoder`
    is accepted and ignored (weights come from a state dict).

    **Arguments:**

    - `in_channels`, `patch_size`: image channels (3, or 1 broadcast to the encoder's 3)
      and patch side `p`.
    - `hidden_size`, `num_heads`, `depth`: width `D`, heads and number of the DiT blocks.
    - `num_classes`: labels `0..num_classes-1`; `num_classes` is the null class.
    - `in_context_len`, `in_context_start`: how many class tokens join the sequence, and
      before which block.
    - `attn_dropout`: accepted as the reference's (its attention never drops);
      `proj_dropout`: dropout in the middle half of the blocks, in training mode (a `key`
      given to the call).
    - `mlp_hidden_multiple`: round the SwiGLU hidden width up to a multiple of it (0: no).
    - `grounding_encoder`, `grounding_proj_blocks`, `grounding_proj_heads`: the frozen
      encoder and the blocks and heads (default `num_heads`) of the grounding projection.
    - `single_silu_cond`: no SiLU on the summed condition (the blocks' adaLN applies one).
    - `pretrained_encoder` (ignored), `encoder`: as above.
    - `dtype`: the parameters' dtype; `compute_dtype`: the activations' (e.g.
      `jnp.bfloat16`; the residual stream, norm statistics, rope and softmax stay float32).
    - `checkpoint`: what each block keeps for the backward pass (`False`, `"lean"` or
      `True`, as `PixelDiT`'s).
    - `key`: a PRNG key for the initialisation.

    One example per call; `jax.vmap` for batches (also over `skip_grounding`):

    ```python
    x_pred = jax.vmap(model)(x, t, y)  # (B, 3, H, W), (B,), (B,) -> (B, 3, H, W)
    x_pred = jax.vmap(lambda x, t, y, s: model(x, t, y, skip_grounding=s))(x, t, y, mask)
    ```
    """

    t_embedder: TimestepConditioner
    y_embedder: ClassEmbedder
    s_embedder: PatchEmbedder
    in_context_posemb: Float[Array, "n D"] | None
    patch_blocks: BlockStack[ModulatedDiTBlock]
    final_layer: PatchFinalLayer
    dino_conditioner: GroundingConditioner
    config: PixelDiT2Config = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)

    variant: ClassVar[str] = "pixeldit2"
    # The reference stores the in-context position embedding as (1, n, D).
    _torch_leading_one: ClassVar[tuple[str, ...]] = ("in_context_posemb",)

    def __init__(
        self,
        in_channels: int = 3,
        hidden_size: int = 1280,
        num_heads: int = 16,
        depth: int = 32,
        patch_size: int = 16,
        num_classes: int = 1000,
        in_context_len: int = 32,
        in_context_start: int = 8,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        mlp_hidden_multiple: int = 0,
        grounding_encoder: "str | Mapping[str, Any] | DINOv3Config" = "dinov3_vits16",
        grounding_proj_blocks: int = 1,
        grounding_proj_heads: int | None = None,
        single_silu_cond: bool = False,
        pretrained_encoder: bool = True,
        encoder: Mapping[str, Any] | None = None,
        *,
        dtype: Any = None,
        compute_dtype: Any = None,
        checkpoint: Checkpoint = False,
        key: PRNGKeyArray,
    ):
        del pretrained_encoder  # weights come from a state dict
        grounding_encoder = _resolve_encoder(grounding_encoder, encoder, "grounding_encoder")
        self.config = config = PixelDiT2Config.of(locals())
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        d = config.hidden_size

        def make_block(k):
            block = ModulatedDiTBlock(d, config.num_heads, 4.0, 0.0, 0.0, config.mlp_hidden_multiple, dtype, key=k)
            return eqx.tree_at(lambda b: b.adaln, block, zero_linear(block.adaln))

        def make_parts(key):
            kt, ky, ks, kc, kb, kf, kg = jr.split(key, 7)
            blocks = eqx.filter_vmap(make_block)(jr.split(kb, config.depth))
            final = PatchFinalLayer(d, config.patch_size, config.in_channels, dtype, key=kf)
            final = eqx.tree_at(
                lambda f: (f.linear, f.adaln), final, (zero_linear(final.linear), zero_linear(final.adaln))
            )
            posemb = None
            if config.in_context_len:
                posemb = 0.02 * jr.normal(kc, (config.in_context_len, d), dtype or jnp.float32)
            return (
                TimestepConditioner(d, dtype=dtype, key=kt),
                ClassEmbedder(config.num_classes, d, dtype, key=ky),
                PatchEmbedder(config.in_channels * config.patch_size**2, d, dtype, key=ks),
                posemb,
                BlockStack(blocks=blocks, depth=config.depth, checkpoint=checkpoint),
                final,
                GroundingConditioner(
                    config.grounding_encoder,
                    d,
                    config.patch_size,
                    config.grounding_proj_blocks,
                    config.proj_heads,
                    dtype=dtype,
                    checkpoint=checkpoint,
                    key=kg,
                ),
            )

        (
            self.t_embedder,
            self.y_embedder,
            self.s_embedder,
            self.in_context_posemb,
            self.patch_blocks,
            self.final_layer,
            self.dino_conditioner,
        ) = _initialise(make_parts, key)

    # The reference's attributes, read from the config.
    num_heads = config_attribute("num_heads")
    depth = config_attribute("depth")
    num_classes = config_attribute("num_classes", "Labels `0..num_classes-1`; `num_classes` is the null label.")
    in_context_len = config_attribute("in_context_len")
    in_context_start = config_attribute("in_context_start")

    def condition(
        self, x: Image, t: TimeLike, y: LabelLike, *, skip_grounding: bool | Bool[Array, ""] = False
    ) -> Float[Array, "L {self.hidden_size}"]:
        """The per-patch condition `c` the blocks and the final layer read:
        `silu(grounding + t_emb + y_emb)` (no SiLU with `single_silu_cond`), or with
        `skip_grounding` `silu(t_emb + y_emb)` for every patch."""
        self._check_image(x)
        model, xc = self._compute_view(x)
        return model._condition(xc, t, y, skip_grounding)[0]

    def _condition(self, x: Array, t: TimeLike, y: LabelLike, skip_grounding: Any) -> tuple[Array, Array]:
        """`(c (L, D), y_emb (D,))`."""
        hs, ws = self._check_image(x)
        _check_time(t)
        y = _check_label(y, self.num_classes)
        if not isinstance(skip_grounding, bool):
            skip_grounding = jnp.asarray(skip_grounding)
            if skip_grounding.shape != () or skip_grounding.dtype != jnp.bool_:
                raise ValueError(
                    f"`skip_grounding`: expected a bool or a boolean scalar (vmap over it for per-example masks), "
                    f"got shape {tuple(skip_grounding.shape)} and dtype {skip_grounding.dtype}."
                )
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y)
        activate = (lambda c: c) if self.config.single_silu_cond else jax.nn.silu
        null_c = jnp.broadcast_to(activate(t_emb + y_emb)[None, :], (hs * ws, t_emb.shape[0]))
        if skip_grounding is True:
            return null_c, y_emb
        with jax.named_scope("grounding"):
            grounding = self.dino_conditioner(x, t)
        c = activate(grounding + t_emb[None, :] + y_emb[None, :])
        if skip_grounding is not False:
            c = jnp.where(skip_grounding, null_c, c)
        return c, y_emb

    def _forward(
        self,
        x: Array,
        t: TimeLike,
        y: LabelLike,
        skip_grounding: Any,
        feature_depth: int | None,
        key: PRNGKeyArray | None,
        run_head: bool = True,
    ) -> tuple[Array | None, Array | None]:
        """`(x_pred (C, H, W) or None, patch tokens after block feature_depth or None)`."""
        c, y_emb = self._condition(x, t, y, skip_grounding)
        _, h, w = x.shape
        hs, ws = h // self.patch_size, w // self.patch_size
        cfg = self.config
        stream = _stream_dtype(x.dtype)
        with jax.named_scope("patch_embed"):
            s = self.s_embedder(patchify(x, self.patch_size)).astype(stream)
        angles = rope_2d(cfg.hidden_size // cfg.num_heads, hs, ws)
        keys = rates = None
        if key is not None:
            keys = jr.split(key, cfg.depth)
            # As the reference: dropout only in the blocks depth//4 <= i < 3 * (depth//4).
            index, quarter = jnp.arange(cfg.depth), cfg.depth // 4
            inside = (index >= quarter) & (index < 3 * quarter)
            rates = jnp.where(inside, jnp.float32(cfg.proj_dropout), jnp.float32(0.0))
        n = cfg.in_context_len
        start = cfg.in_context_start if n else cfg.depth
        stop = cfg.depth if run_head or feature_depth is None else feature_depth
        bounds = sorted({0, start, stop} | ({feature_depth} if feature_depth is not None else set()))
        bounds = [b for b in bounds if b <= stop]
        features = s if feature_depth == 0 else None
        c_all, angles_all = c, angles  # with the in-context tokens, from block `in_context_start` on
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if lo == start and self.in_context_posemb is not None:  # the class tokens join here
                context = y_emb[None, :] + self.in_context_posemb.astype(y_emb.dtype)
                s = jnp.concatenate([context.astype(stream), s])
                c_all = jnp.concatenate([jnp.broadcast_to(jnp.mean(c, axis=0), (n, c.shape[1])), c])
                angles_all = jnp.concatenate([jnp.zeros((n, angles.shape[1]), angles.dtype), angles])
            with jax.named_scope("patch_blocks"):
                if lo >= start:
                    s = _run_blocks(self.patch_blocks, lo, hi, s, c_all, angles_all, keys, rates)
                else:
                    s = _run_blocks(self.patch_blocks, lo, hi, s, c, angles, keys, rates)
            if hi == feature_depth:
                features = s[n:] if hi > start else s
        if not run_head:
            return None, features
        if cfg.depth > start:
            s = s[n:]
        out_dtype = _stream_dtype(x.dtype)
        with jax.named_scope("final_layer"):
            final = cast_params(self.final_layer, out_dtype)
            out = final(s.astype(out_dtype), c.astype(out_dtype))
        out = unpatchify(out.reshape(hs * ws, self.patch_size**2, cfg.in_channels), self.patch_size, h, w)
        return out, features

    def _check_depth(self, depth: Any) -> int:
        if not _is_int(depth) or not 0 <= depth <= self.depth:
            raise ValueError(f"`depth` must be an integer in [0, {self.depth}] (blocks run), got {depth!r}.")
        return depth

    def __call__(
        self,
        x: Image,
        t: TimeLike,
        y: LabelLike,
        *,
        skip_grounding: bool | Bool[Array, ""] = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "{self.in_channels} H W"]:
        """The predicted clean image `(C, H, W)` for `x` at time `t` (0 noise, 1 data) and
        label `y` (`num_classes` = null). `skip_grounding` True conditions on time and label
        only (the reference's unconditional branch uses it with the null label). `key`
        switches on training-mode dropout (`proj_dropout`); None is the reference's eval mode.
        """
        self._check_image(x)
        model, xc = self._compute_view(x)
        out, _ = model._forward(xc, t, y, skip_grounding, None, key)
        return out

    def with_features(
        self,
        x: Image,
        t: TimeLike,
        y: LabelLike,
        *,
        depth: int,
        skip_grounding: bool | Bool[Array, ""] = False,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "{self.in_channels} H W"], Float[Array, "L {self.hidden_size}"]]:
        """`(x_pred, features)` from one forward pass: `features` are the patch tokens after
        the first `depth` blocks (the reference trainer's REPA hook on `patch_blocks[depth -
        1]`, in-context tokens stripped), float32."""
        self._check_image(x)
        depth = self._check_depth(depth)
        model, xc = self._compute_view(x)
        return model._forward(xc, t, y, skip_grounding, depth, key)

    def features(
        self,
        x: Image,
        t: TimeLike,
        y: LabelLike,
        *,
        depth: int,
        skip_grounding: bool | Bool[Array, ""] = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "L {self.hidden_size}"]:
        """The patch tokens after the first `depth` blocks (in-context tokens stripped),
        running only those blocks."""
        self._check_image(x)
        depth = self._check_depth(depth)
        model, xc = self._compute_view(x)
        return model._forward(xc, t, y, skip_grounding, depth, key, run_head=False)[1]

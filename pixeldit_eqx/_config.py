"""The models' settings, one frozen dataclass per model family (`PixelDiTConfig`,
`PixelDiTT2IConfig`, `PixelDiT2Config`: the reference's constructor arguments, names and
defaults, validated once), and `build`, which makes a model from a config, the reference's
constructor arguments (a released YAML's `init_args`) or a preset name.

The models import this module and register themselves (`register`), so that `build` finds
them without importing upwards.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ._custom_types import Checkpoint
from ._dinov3 import DINOV3_PRESETS, DINOv3Config, encoder_config
from ._presets import resolve


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", type(None): "None"}


def _options(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def _fits(annotation: Any, value: Any) -> bool:
    """Whether `value` has the plain Python type `annotation` asks for (a YAML `64.0` or
    `"64"` for an int, a `"no"` for a bool, are refused)."""
    for option in _options(annotation):
        if option not in _TYPE_NAMES:
            return True  # not a plain type: left to the config's own checks
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and _is_int(value):
            return True
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
    return False


def _type_error(name: str, annotation: Any, value: Any) -> str:
    wanted = " or ".join(_TYPE_NAMES.get(o, str(o)) for o in _options(annotation))
    return f"`{name}` must be {wanted}, got {value!r} of type {type(value).__name__}."


def _positive(default: int | None) -> Any:
    """A field holding an integer >= 1 (None passes: a default taken from another field)."""
    return dataclasses.field(default=default, metadata={"at_least": 1})


def _non_negative(default: int) -> Any:
    """A field holding an integer >= 0 (a count the reference allows to be zero)."""
    return dataclasses.field(default=default, metadata={"at_least": 0})


def _check_rope_width(width: int, heads: int, what: str, heads_name: str) -> None:
    if width % heads:
        raise ValueError(f"`{what}`={width} must be divisible by `{heads_name}`={heads}.")
    if (width // heads) % 4:
        raise ValueError(
            f"2D rope needs a head dim divisible by 4: `{what}` / `{heads_name}` = {width} / {heads} = {width // heads}."
        )


_C = TypeVar("_C", bound="_Config")


class _Config:
    """What every config shares: plain Python values of the annotated types, counts in
    range, `to_dict`, and the reading of a reference config (`from_arguments`)."""

    #: `"c2i"`, `"t2i"` or `"pixeldit2"`: the model family, as `build` names it.
    variant: ClassVar[str]
    #: Reference constructor arguments that change nothing the model computes: accepted by
    #: `from_arguments` (name -> type) and dropped.
    _dropped: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _plain(cls, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """`values` (by field name) as plain Python values of the fields' types: a numpy
        scalar counts as the value it holds, an int for a float field becomes a float; a
        value of another type raises `ValueError` (its message begins with `where`)."""
        plain = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name in values:
                value = values[field.name]
                value = value.item() if isinstance(value, np.generic) else value
                if not _fits(field.type, value):
                    raise ValueError(where + _type_error(field.name, field.type, value))
                plain[field.name] = float(value) if field.type is float else value
        return plain

    def __post_init__(self) -> None:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name, value in self._plain(values).items():
            object.__setattr__(self, name, value)
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            low, value = field.metadata.get("at_least"), getattr(self, field.name)
            if low is not None and value is not None and value < low:
                what = "positive" if low == 1 else "non-negative"
                raise ValueError(f"`{field.name}` must be a {what} integer, got {value!r}.")
        self._check()

    def _check(self) -> None:
        """The checks beyond types and ranges."""

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python values: the reference's constructor arguments
        (`pixeldit_eqx.build(config.to_dict(), config.variant)` rebuilds the model)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def of(cls: type[_C], arguments: Mapping[str, Any]) -> _C:
        """The config of a model constructor's arguments (its `locals()`): those named
        as the fields."""
        return cls(**{field.name: arguments[field.name] for field in dataclasses.fields(cls)})  # type: ignore[arg-type]

    @classmethod
    def from_arguments(cls: type[_C], arguments: Mapping[str, Any]) -> _C:
        """The config of the reference's constructor arguments; unknown or wrongly typed
        arguments raise `ValueError` naming the `config`."""
        arguments = dict(arguments)
        for name, annotation in cls._dropped.items():
            if name in arguments:
                value = arguments.pop(name)
                value = value.item() if isinstance(value, np.generic) else value
                if not _fits(annotation, value):
                    raise ValueError(f"`config`: {_type_error(name, annotation, value)}")
        allowed = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(arguments) - allowed)
        if unknown:
            accepted = sorted(allowed | set(cls._dropped))
            raise ValueError(
                f"`config`: unknown argument(s) {unknown} for variant {cls.variant!r}; accepted: {accepted}."
            )
        # Checked before the dataclass is made: its `__init__` may be type-checked at run time.
        return cls(**(arguments | cls._plain(arguments, "`config`: ")))


@dataclasses.dataclass(frozen=True)
class PixelDiTConfig(_Config):
    """`PixelDiT`'s settings: the constructor arguments of the reference's
    `pixeldit_c2i.PixDiT`, names and defaults, validated once (see `PixelDiT` for their
    meaning). As in the reference, no patch blocks, or no classes (an unconditional model,
    labels only the null class 0), are valid."""

    in_channels: int = _positive(4)
    num_groups: int = _positive(12)
    hidden_size: int = _positive(1152)
    pixel_hidden_size: int = _positive(64)
    patch_depth: int = _non_negative(18)
    pixel_depth: int = _positive(4)
    patch_size: int = _positive(2)
    num_classes: int = _non_negative(1000)
    use_pixel_abs_pos: bool = True
    pit_adaln_post_modulation: bool = False
    mlp_ratio: float = 4.0

    variant: ClassVar[str] = "c2i"

    @property
    def pixel_attn_size(self) -> int:
        """Width of the pixel-level attention: the patch level's."""
        return self.hidden_size

    @property
    def pixel_heads(self) -> int:
        """Heads of the pixel-level attention: the patch level's."""
        return self.num_groups

    def _check(self) -> None:
        _check_rope_width(self.hidden_size, self.num_groups, "hidden_size", "num_groups")
        _check_pixel_width(self)


def _check_pixel_width(config: "PixelDiTConfig | PixelDiTT2IConfig") -> None:
    """The pixel tokens' 2D sincos table needs a width divisible by 4 (as `PixelEmbedder`)."""
    if config.use_pixel_abs_pos and config.pixel_hidden_size % 4:
        raise ValueError(
            f"`pixel_hidden_size` must be divisible by 4 for the sincos table, got {config.pixel_hidden_size}."
        )


@dataclasses.dataclass(frozen=True)
class PixelDiTT2IConfig(_Config):
    """`PixelDiTT2I`'s settings: the constructor arguments of the reference's
    `pixeldit_t2i.PixDiT_T2I`, names and defaults, validated once (see `PixelDiTT2I`).
    `pixel_attn_hidden_size` and `pixel_num_groups` keep None when given None (the patch
    level's width and heads: `pixel_attn_size`, `pixel_heads`). The reference's
    `num_text_blocks` and `repa_encoder_index` change nothing the model computes:
    `from_arguments` (and so `build`) accepts and drops them."""

    in_channels: int = _positive(3)
    num_groups: int = _positive(16)
    hidden_size: int = _positive(1152)
    pixel_hidden_size: int = _positive(64)
    pixel_attn_hidden_size: int | None = _positive(None)
    pixel_num_groups: int | None = _positive(None)
    patch_depth: int = _non_negative(26)
    pixel_depth: int = _positive(2)
    patch_size: int = _positive(16)
    txt_embed_dim: int = _positive(4096)
    txt_max_length: int = _positive(1024)
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    use_pixel_abs_pos: bool = True
    pit_adaln_post_modulation: bool = False
    mlp_ratio: float = 4.0

    variant: ClassVar[str] = "t2i"
    _dropped: ClassVar[dict[str, Any]] = {"num_text_blocks": int, "repa_encoder_index": int}

    @property
    def pixel_attn_size(self) -> int:
        """Width of the pixel-level attention (`pixel_attn_hidden_size`, default `hidden_size`)."""
        return self.hidden_size if self.pixel_attn_hidden_size is None else self.pixel_attn_hidden_size

    @property
    def pixel_heads(self) -> int:
        """Heads of the pixel-level attention (`pixel_num_groups`, default `num_groups`)."""
        return self.num_groups if self.pixel_num_groups is None else self.pixel_num_groups

    def _check(self) -> None:
        _check_rope_width(self.hidden_size, self.num_groups, "hidden_size", "num_groups")
        _check_rope_width(self.pixel_attn_size, self.pixel_heads, "pixel_attn_hidden_size", "pixel_num_groups")
        _check_pixel_width(self)


def _resolve_encoder(spec: Any, encoder: Any, what: str) -> "str | DINOv3Config":
    """The grounding encoder from a preset name / mapping `spec` and the fixtures' separate
    `encoder` mapping (which, when given, defines the encoder `spec` names)."""
    if encoder is None:
        if isinstance(spec, str) and spec in DINOV3_PRESETS:
            return spec
        return encoder_config(spec)
    config = encoder_config(encoder)
    if isinstance(spec, str) and spec in DINOV3_PRESETS and encoder_config(spec) != config:
        raise ValueError(f"`{what}`={spec!r} names a preset, but `encoder` describes another encoder: {config}.")
    if not isinstance(spec, str) and encoder_config(spec) != config:
        raise ValueError(f"`{what}` and `encoder` describe two different encoders: give one.")
    name = encoder.get("spec_name") if isinstance(encoder, Mapping) else None
    if isinstance(spec, str) and spec not in DINOV3_PRESETS and name is not None and name != spec:
        raise ValueError(f"`{what}`={spec!r} does not match the `encoder` mapping's `spec_name`={name!r}.")
    return config


@dataclasses.dataclass(frozen=True)
class PixelDiT2Config(_Config):
    """PixelDiT2's constructor arguments (reference names and defaults), validated once.

    `grounding_encoder` holds a preset name or, for any other encoder, its
    `DINOv3Config` (a mapping given here is converted to one). The reference's
    `pretrained_encoder` changes nothing here (weights come from a state dict):
    `from_arguments` (and so `build`) accepts and drops it, and reads the fixtures'
    separate `encoder` mapping into `grounding_encoder`.
    """

    in_channels: int = _positive(3)
    hidden_size: int = _positive(1280)
    num_heads: int = _positive(16)
    depth: int = _positive(32)
    patch_size: int = _positive(16)
    num_classes: int = _non_negative(1000)
    in_context_len: int = _non_negative(32)
    in_context_start: int = 8
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    mlp_hidden_multiple: int = _non_negative(0)
    grounding_encoder: "str | DINOv3Config" = "dinov3_vits16"
    grounding_proj_blocks: int = _non_negative(1)
    grounding_proj_heads: int | None = _positive(None)
    single_silu_cond: bool = False

    variant: ClassVar[str] = "pixeldit2"
    _dropped: ClassVar[dict[str, Any]] = {"pretrained_encoder": bool}

    def _check(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(
                f"`in_channels` must be 3 (or 1, broadcast to the encoder's 3 ImageNet-normalised channels), "
                f"got {self.in_channels}."
            )
        # As the reference: checked whether or not there are in-context tokens.
        if not _is_int(self.in_context_start) or not 0 <= self.in_context_start < self.depth:
            raise ValueError(f"`in_context_start` must lie in [0, {self.depth - 1}], got {self.in_context_start!r}.")
        for name in ("attn_dropout", "proj_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
        for width_heads, name in ((self.num_heads, "num_heads"), (self.proj_heads, "grounding_proj_heads")):
            if self.hidden_size % width_heads or (self.hidden_size // width_heads) % 4:
                raise ValueError(
                    f"`hidden_size`={self.hidden_size} must be divisible by `{name}`={width_heads} into a head dim "
                    f"divisible by 4 (2D rope)."
                )
        object.__setattr__(
            self, "grounding_encoder", _resolve_encoder(self.grounding_encoder, None, "grounding_encoder")
        )

    @property
    def proj_heads(self) -> int:
        """Heads of the grounding projection (`grounding_proj_heads`, default `num_heads`)."""
        return self.num_heads if self.grounding_proj_heads is None else self.grounding_proj_heads

    @property
    def encoder(self) -> DINOv3Config:
        """The grounding encoder's sizes."""
        return encoder_config(self.grounding_encoder)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "PixelDiT2Config":
        """As `_Config.from_arguments`, with the fixtures' `encoder` mapping read into
        `grounding_encoder`."""
        arguments = dict(arguments)
        encoder = arguments.pop("encoder", None)
        if "grounding_encoder" in arguments or encoder is not None:
            spec = arguments.get("grounding_encoder", cls.grounding_encoder)
            arguments["grounding_encoder"] = _resolve_encoder(spec, encoder, "grounding_encoder")
        return super().from_arguments(arguments)


Config = PixelDiTConfig | PixelDiTT2IConfig | PixelDiT2Config

#: Variant -> its config class.
CONFIGS: dict[str, type[Config]] = {c.variant: c for c in (PixelDiTConfig, PixelDiTT2IConfig, PixelDiT2Config)}
#: Variant -> its model class, filled by `register` as the model modules are imported.
MODELS: dict[str, type] = {}
_ModelType = TypeVar("_ModelType", bound=type)


def register(model: _ModelType) -> _ModelType:
    """Class decorator: `build` makes `model` for its `variant`."""
    MODELS[model.variant] = model  # type: ignore[attr-defined]
    return model


def config_attribute(name: str, doc: str | None = None) -> Any:
    """A model's read-only attribute that reads `model.config.<name>` (the reference's
    attribute names, kept readable)."""
    return property(lambda self: getattr(self.config, name), doc=doc or f"`config.{name}`.")


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in CONFIGS:
        raise ValueError(f"`variant` must be one of {sorted(CONFIGS)}, got {variant!r}.")


def build(
    config: "Mapping[str, Any] | str | Config",
    variant: str | None = None,
    *,
    key: PRNGKeyArray | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    checkpoint: Checkpoint = False,
) -> Any:
    """Build a model from the reference's constructor arguments (a released YAML's
    `init_args`), a preset name (see `pixeldit_eqx.PRESETS`) or a config object
    (`PixelDiTConfig`, `PixelDiTT2IConfig`, `PixelDiT2Config`, e.g. `model.config`).

    `variant` (`"c2i"`, `"t2i"` or `"pixeldit2"`; a plain `str` so that a wrong one gets the
    `ValueError` below, not a type-checker error) defaults to the preset's or the config
    object's, else `"c2i"`. Unknown or wrongly typed arguments raise `ValueError`; the t2i
    reference's `num_text_blocks` and `repa_encoder_index`, which change nothing the model
    computes, are accepted and ignored. `key` defaults to `jr.key(0)`.
    """
    if isinstance(config, _Config):
        _check_variant(variant)
        if variant is not None and variant != config.variant:
            raise ValueError(
                f"`variant`={variant!r} contradicts the config, a {type(config).__name__} ({config.variant!r}); "
                "leave `variant` out."
            )
        settings = config
    else:
        preset = config if isinstance(config, str) else None
        arguments, preset_variant = resolve(config)
        _check_variant(variant)
        if variant is not None and preset_variant is not None and variant != preset_variant:
            raise ValueError(
                f"`variant`={variant!r} contradicts the preset {preset!r}, which is a {preset_variant!r} model; "
                "leave `variant` out."
            )
        settings = CONFIGS[variant or preset_variant or "c2i"].from_arguments(arguments)
    return MODELS[settings.variant](
        **settings.to_dict(),
        dtype=dtype,
        compute_dtype=compute_dtype,
        checkpoint=checkpoint,
        key=jr.key(0) if key is None else key,
    )

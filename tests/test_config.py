"""The model configs (`PixelDiTConfig`, `PixelDiTT2IConfig`, `PixelDiT2Config`): frozen,
validated once, `model.config`, round trips through `to_dict` and `build`, and model files
written before the configs existed."""

import dataclasses
import inspect
import io
import json
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import train

from .helpers import init, SMALL_C2I, SMALL_T2I, TINY


MODEL_FILES = pathlib.Path(__file__).parent / "fixtures" / "model_files"

C2I = TINY
SMALL = {"c2i": SMALL_C2I, "t2i": SMALL_T2I | dict(pixel_attn_hidden_size=8, pixel_num_groups=1)}


def _configs():
    return {"c2i": px.PixelDiTConfig, "t2i": px.PixelDiTT2IConfig, "pixeldit2": px.PixelDiT2Config}


def _leaves(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_model_config_is_the_frozen_validated_dataclass(variant):
    model = eqx.filter_eval_shape(lambda: px.build(SMALL[variant], variant))
    config = model.config
    assert type(config) is _configs()[variant] and config.variant == variant
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 32  # type: ignore[misc]
    assert hash(config) == hash(dataclasses.replace(config)) and config == dataclasses.replace(config)
    # Plain Python values: what a model file's JSON header holds.
    plain = config.to_dict()
    assert json.loads(json.dumps(plain)) == plain
    assert plain == {k: getattr(config, k) for k in plain} and set(SMALL[variant].items()) <= set(plain.items())
    # The reference's attributes stay readable, read from the config.
    assert (model.hidden_size, model.num_groups, model.patch_size, model.in_channels) == (16, 2, 2, 1)
    expected_pixel_attention = (8, 1) if variant == "t2i" else (16, 2)
    assert (model.pixel_attn_hidden_size, model.pixel_num_groups) == expected_pixel_attention
    # The config is static: part of the tree structure, not a leaf.
    assert all(not isinstance(leaf, type(config)) for leaf in jax.tree.leaves(model))
    other = eqx.filter_eval_shape(lambda: px.build(SMALL[variant] | {"mlp_ratio": 2.0}, variant))
    assert jax.tree.structure(other) != jax.tree.structure(model)


@pytest.mark.parametrize("variant", ["c2i", pytest.param("t2i", marks=pytest.mark.default_only)])
def test_a_config_round_trips_through_to_dict_and_build(variant):
    key = jr.key(3)
    model = px.build(SMALL[variant], variant, key=key)
    config = model.config
    from_config = px.build(config, key=key)  # the variant comes with the config
    assert from_config.config == config and type(from_config) is type(model)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(from_config), _leaves(model), strict=True))
    from_dict = eqx.filter_eval_shape(lambda: px.build(config.to_dict(), variant))
    direct = eqx.filter_eval_shape(lambda: type(model)(**config.to_dict(), key=key))
    for other in (from_dict, direct):
        assert other.config == config and jax.tree.structure(other) == jax.tree.structure(model)
    other = "t2i" if variant == "c2i" else "c2i"
    with pytest.raises(ValueError) as info:
        px.build(config, other)
    assert str(info.value) == (
        f"`variant`={other!r} contradicts the config, a {type(config).__name__} ({variant!r}); leave `variant` out."
    )
    # A constructor's defaults are its config's (both the reference's).
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    signature = inspect.signature(type(model).__init__).parameters
    assert {name: signature[name].default for name in defaults} == defaults


def test_configs_validate_once_when_made_directly():
    # Plain Python values of the fields' types (a numpy scalar, an int for a float, as read from a file).
    read = px.PixelDiTT2IConfig.from_arguments(dict(hidden_size=np.int64(64), num_groups=4, mlp_ratio=2))
    assert (type(read.hidden_size), type(read.mlp_ratio), read.mlp_ratio) == (int, float, 2.0)
    t2i = px.PixelDiTT2IConfig(hidden_size=64, num_groups=4)
    assert (t2i.pixel_attn_hidden_size, t2i.pixel_attn_size, t2i.pixel_heads) == (None, 64, 4)
    cases = [
        (px.PixelDiTConfig, dict(patch_size=0), "`patch_size` must be a positive integer, got 0."),
        (px.PixelDiTConfig, dict(num_classes=-1), "`num_classes` must be a non-negative integer, got -1."),
        (
            px.PixelDiTConfig,
            dict(hidden_size=30, num_groups=4),
            "`hidden_size`=30 must be divisible by `num_groups`=4.",
        ),
        (
            px.PixelDiTConfig,
            dict(pixel_hidden_size=6),
            "`pixel_hidden_size` must be divisible by 4 for the sincos table, got 6.",
        ),
        (
            px.PixelDiTT2IConfig,
            dict(hidden_size=64, num_groups=4, pixel_attn_hidden_size=24, pixel_num_groups=4),
            "2D rope needs a head dim divisible by 4: `pixel_attn_hidden_size` / `pixel_num_groups` = 24 / 4 = 6.",
        ),
        (px.PixelDiTT2IConfig, dict(pixel_num_groups=0), "`pixel_num_groups` must be a positive integer, got 0."),
        (px.PixelDiT2Config, dict(in_context_start=32), "`in_context_start` must lie in [0, 31], got 32."),
    ]
    for cls, change, message in cases:
        with pytest.raises(ValueError) as info:
            cls(**change)
        assert str(info.value) == message
    # A config made without sincos table may have any pixel width.
    assert px.PixelDiTConfig(pixel_hidden_size=6, use_pixel_abs_pos=False).pixel_hidden_size == 6


def test_build_reads_dicts_as_before_through_the_config_fields():
    with pytest.raises(ValueError) as info:
        px.build(SMALL["c2i"] | {"hidden_size": 16.0}, "c2i")
    assert str(info.value) == "`config`: `hidden_size` must be an int, got 16.0 of type float."
    with pytest.raises(ValueError) as info:
        px.build(SMALL["c2i"] | {"txt_embed_dim": 8}, "c2i")
    accepted = sorted(f.name for f in dataclasses.fields(px.PixelDiTConfig))
    assert str(info.value) == (
        f"`config`: unknown argument(s) ['txt_embed_dim'] for variant 'c2i'; accepted: {accepted}."
    )
    with pytest.raises(
        ValueError, match=re.escape("`config`: `pretrained_encoder` must be a bool, got 1 of type int.")
    ):
        px.build({"pretrained_encoder": 1}, "pixeldit2")
    # The reference-only arguments are dropped: the same config as without them.
    with_extras = px.PixelDiTT2IConfig.from_arguments(SMALL["t2i"] | {"num_text_blocks": 2, "repa_encoder_index": 1})
    assert with_extras == px.PixelDiTT2IConfig.from_arguments(SMALL["t2i"])


def test_every_preset_is_a_valid_config():
    for name, preset in px.PRESETS.items():
        config = _configs()[preset["variant"]].from_arguments(preset["config"])
        assert config.variant == preset["variant"], name
        assert {k: v for k, v in config.to_dict().items() if k in preset["config"]} == preset["config"], name


def test_the_pixeldit2_config_reads_the_manifest_encoder_and_round_trips():
    config = px.PixelDiT2Config.from_arguments(init("model_pixeldit2"))
    assert isinstance(config.grounding_encoder, px.DINOv3Config) and config.encoder.embed_dim == 32
    assert px.PixelDiT2Config.from_arguments(json.loads(json.dumps(config.to_dict()))) == config
    model = eqx.filter_eval_shape(lambda: px.build(config))
    assert model.config == config and type(model) is px.PixelDiT2


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_model_files_written_before_the_configs_load(variant):
    """The fixture files hold a dict `config` header, as `model.config` was then; their
    parameters are the initial ones for `jr.key(0)` as that version drew them."""
    path = MODEL_FILES / f"model_file_{variant}.eqx"
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    loaded = train.load_model(path)
    assert type(loaded).variant == variant and loaded.config.to_dict() == header["config"]
    assert loaded.config == _configs()[variant](**SMALL[variant])
    assert loaded.compute_dtype == (jnp.bfloat16 if variant == "t2i" else None)
    # The same parameters as then for the same key (to float32 round-off: the init program
    # is compiled, and another XLA may contract a multiply-add differently).
    fresh = px.build(SMALL[variant], variant, key=jr.key(0), compute_dtype=loaded.compute_dtype)
    assert jax.tree.structure(eqx.filter(fresh, eqx.is_array)) == jax.tree.structure(eqx.filter(loaded, eqx.is_array))
    for a, b in zip(_leaves(fresh), _leaves(loaded), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Written again, the header is the same: the config is still a dict of constructor arguments.
    again = train.load_model(_rewritten(loaded))
    assert again.config == loaded.config


def _rewritten(model):
    buffer = io.BytesIO()
    train.save_model(buffer, model)
    buffer.seek(0)
    return buffer


def test_pixeldit2_model_files_round_trip():
    model = px.build(init("model_pixeldit2"), "pixeldit2", key=jr.key(1))
    buffer = _rewritten(model)
    header = json.loads(buffer.getvalue().split(b"\n", 1)[0])
    assert header["variant"] == "pixeldit2" and header["config"] == model.config.to_dict()
    loaded = train.load_model(buffer)
    assert type(loaded) is px.PixelDiT2 and loaded.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(loaded), _leaves(model), strict=True))
    with pytest.raises(ValueError, match="expected a PixelDiT, PixelDiTT2I or PixelDiT2"):
        train.save_model(io.BytesIO(), model.dino_conditioner)

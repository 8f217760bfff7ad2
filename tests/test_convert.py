"""Reading and writing the reference weights: state dicts, safetensors, torch checkpoint files
(without torch), key prefixes, and the released configs' keys and shapes."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pixeldit_eqx as px

from .helpers import FIXTURES, load_weights, MANIFEST


@pytest.mark.parametrize("case", ["model_c2i", "model_t2i"])
def test_state_dict_round_trip_of_models_is_exact(case):
    sd = load_weights(case)
    out = px.state_dict(px.load_reference(sd, MANIFEST[case]["init"], "c2i" if case == "model_c2i" else "t2i"))
    assert sorted(out) == sorted(sd)
    for key, value in sd.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        np.testing.assert_array_equal(out[key], value)


def test_safetensors_writer_round_trip(tmp_path, c2i_reference):
    model = c2i_reference
    px.save_safetensors(tmp_path / "m.safetensors", model)
    again = px.load_reference(tmp_path / "m.safetensors", MANIFEST["model_c2i"]["init"])
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_files_load_without_torch():
    init = MANIFEST["model_c2i"]["init"]
    sd = load_weights("model_c2i")

    lightning = px.state_dict(px.load_reference(FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt", init))
    for key, value in sd.items():
        np.testing.assert_array_equal(lightning[key], value)  # ema_denoiser.* by default

    raw = px.state_dict(
        px.load_reference(
            FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt",
            init,
            prefix="denoiser.",
        )
    )
    for key, value in sd.items():
        np.testing.assert_array_equal(raw[key], value + 1.0)

    views = px.state_dict(px.load_reference(FIXTURES / "checkpoints" / "model_c2i_views.pt", init))
    for key, value in sd.items():
        np.testing.assert_array_equal(views[key], value)

    bf16 = px.load_reference(FIXTURES / "checkpoints" / "model_c2i_bf16.pt", init, dtype=jnp.bfloat16)
    exported = px.state_dict(bf16)
    for key, value in sd.items():
        assert exported[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[key], value.astype(ml_dtypes.bfloat16))


def test_weights_under_any_prefix_are_found():
    """No `prefix` given: the prefix under which most of the model's keys sit is taken,
    whatever it is, and keys outside it (a training-only head) are ignored."""
    init = MANIFEST["model_t2i"]["init"]
    sd = load_weights("model_t2i")
    extra = {"_repa_projector.0.weight": np.zeros((8, 4), np.float32)}
    for prefix in ("core.", "net.module.", ""):
        ckpt = {prefix + k: v for k, v in sd.items()} | (extra if prefix else {})  # no prefix: all keys count
        loaded = px.state_dict(px.load_reference(ckpt, init, "t2i"))
        assert loaded.keys() == sd.keys()
        for key, value in sd.items():
            np.testing.assert_array_equal(loaded[key], value)
    # The most complete copy wins over a partial one.
    partial = {"a." + k: v for k, v in list(sd.items())[:5]}
    loaded = px.state_dict(px.load_reference({**partial, **{"b." + k: v + 1 for k, v in sd.items()}}, init, "t2i"))
    for key, value in sd.items():
        np.testing.assert_array_equal(loaded[key], value + 1)


@pytest.mark.parametrize("name", ["pixeldit_xl_c2i", "pixeldit_t2i_1024"])
def test_released_configs_export_reference_keys_and_shapes(name):
    released = json.loads((FIXTURES / "released_shapes.json").read_text())[name]
    skeleton = eqx.filter_eval_shape(lambda: px.build(released["init"], released["variant"]))
    shapes = {k: list(v.shape) for k, v in px.state_dict(skeleton).items()}
    assert shapes == released["state_dict_shapes"]
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(skeleton))
    assert n_params == released["num_params"]
    # and the loader accepts exactly those keys and shapes (all zeros: nothing allocated but these)
    if name == "pixeldit_xl_c2i":
        tiny = {k: np.broadcast_to(np.float32(0.0), v) for k, v in released["state_dict_shapes"].items()}
        loaded = eqx.filter_eval_shape(lambda: px.load_reference(tiny, released["init"], released["variant"]))
        assert jax.tree.structure(loaded) == jax.tree.structure(skeleton)


def test_presets_build_lazily_and_match_released():
    released = json.loads((FIXTURES / "released_shapes.json").read_text())
    for preset, name in [
        ("pixeldit-xl-c2i-256", "pixeldit_xl_c2i"),
        ("pixeldit-xl-c2i-512", "pixeldit_xl_c2i"),
        ("pixeldit-t2i-1024", "pixeldit_t2i_1024"),
    ]:
        skeleton = eqx.filter_eval_shape(lambda: px.build(preset))
        assert type(skeleton).variant == released[name]["variant"]
        assert {k: list(v.shape) for k, v in px.state_dict(skeleton).items()} == released[name]["state_dict_shapes"]

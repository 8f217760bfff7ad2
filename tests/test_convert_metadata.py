"""Files that describe themselves and loaders that infer: `save_safetensors` stores the
config and variant, `load_reference` reads them back, infers the variant from the config's
argument names or the weight names, and says what the weights look like when they do not fit."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _infer

from .helpers import FIXTURES, init, load_weights, MANIFEST


pytest.importorskip("safetensors", reason="save_safetensors needs the `safetensors` extra (the `test` extra has it)")

C2I = MANIFEST["model_c2i"]["init"]
T2I = MANIFEST["model_t2i"]["init"]
LIGHTNING = FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt"


def _arrays(model):
    return {k: np.asarray(v) for k, v in px.state_dict(model).items()}


def _same(a, b):
    x, y = _arrays(a), _arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return f.metadata()


def _config(model):
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


@pytest.mark.parametrize(
    ("weights", "config", "variant", "cls"),
    [
        (FIXTURES / "model_c2i.safetensors", C2I, "c2i", "PixelDiT"),
        (FIXTURES / "model_t2i.safetensors", T2I, "t2i", "PixelDiTT2I"),
        ("pixeldit2", None, "pixeldit2", "PixelDiT2"),
    ],
)
def test_a_saved_model_loads_without_its_config(tmp_path, weights, config, variant, cls):
    if weights == "pixeldit2":
        weights, config = load_weights("model_pixeldit2"), init("model_pixeldit2")
    # No `variant`: read from the config's argument names (t2i's text, PixelDiT2's depth/heads).
    model = px.load_reference(weights, config)
    assert type(model).__name__ == cls
    path = tmp_path / "model.safetensors"
    px.save_safetensors(path, model)
    metadata = _metadata(path)
    assert metadata["pixeldit_eqx.variant"] == variant
    assert json.loads(metadata["pixeldit_eqx.config"]) == json.loads(json.dumps(_config(model)))
    assert len(metadata["pixeldit_eqx.sha256"]) == 64
    loaded = px.load_reference(path)
    assert type(loaded).__name__ == cls and _config(loaded) == _config(model) and _same(loaded, model)


def test_an_explicit_config_wins_over_the_stored_one(tmp_path):
    path = tmp_path / "c2i.safetensors"
    px.save_safetensors(path, px.load_reference(FIXTURES / "model_c2i.safetensors", C2I))
    assert json.loads(_metadata(path)["pixeldit_eqx.config"])["use_pixel_abs_pos"] is True
    # `use_pixel_abs_pos` leaves no trace in the weights: the caller's value is the one built.
    model = px.load_reference(path, {**C2I, "use_pixel_abs_pos": False})
    assert model.config.use_pixel_abs_pos is False
    # ...and the weights are checked against it as always.
    with pytest.raises(px.StateDictError, match=r"does not fit PixelDiT \(\d+ problem\(s\)\)"):
        px.load_reference(path, {**C2I, "hidden_size": 32})


def test_weights_without_a_config_name_what_to_pass():
    for source in (FIXTURES / "model_c2i.safetensors", LIGHTNING, load_weights("model_c2i")):
        with pytest.raises(ValueError) as info:
            px.load_reference(source)
        message = str(info.value)
        assert type(info.value) is ValueError and message.startswith("`config`: the weights carry no config")
        assert "pass `config=`, the reference constructor arguments" in message and "'pixeldit-xl-c2i-256'" in message


def test_a_state_dict_saved_with_a_config_is_checked_and_loads_alone(tmp_path):
    weights = load_weights("model_t2i")
    path = tmp_path / "t2i.safetensors"
    px.save_safetensors(path, weights, config=T2I)  # the variant from the config's names
    assert _metadata(path)["pixeldit_eqx.variant"] == "t2i"
    model = px.load_reference(path)
    assert isinstance(model, px.PixelDiTT2I) and _same(model, px.load_reference(weights, T2I, "t2i"))
    # A config the weights do not fit: the error, and no file.
    with pytest.raises(px.StateDictError, match="the weights look like a t2i PixelDiT: hidden_size=64"):
        px.save_safetensors(tmp_path / "bad.safetensors", weights, config={**T2I, "txt_embed_dim": 16})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="`config`/`variant`: a model carries its own"):
        px.save_safetensors(tmp_path / "x.safetensors", model, config=T2I)
    with pytest.raises(ValueError, match="`variant`: store it with its `config`"):
        px.save_safetensors(tmp_path / "x.safetensors", weights, variant="t2i")


def test_stored_metadata_that_is_not_a_config_is_a_format_error(tmp_path):
    from safetensors.numpy import save_file

    for stored, message in (("{not json", "is not JSON"), ("[1, 2]", "must hold a JSON object, got list")):
        path = tmp_path / "odd.safetensors"
        save_file(load_weights("model_c2i"), str(path), metadata={"pixeldit_eqx.config": stored})
        with pytest.raises(px.CheckpointFormatError, match=message):
            px.load_reference(path)


def test_the_variant_is_inferred_from_config_names_then_weight_names():
    # t2i weights and config, no variant: a PixelDiTT2I (the default c2i refused t2i arguments).
    assert isinstance(px.load_reference(FIXTURES / "model_t2i.safetensors", T2I), px.PixelDiTT2I)
    assert _infer.variant_of_config(C2I) == "c2i"
    assert _infer.variant_of_config(T2I) == "t2i"
    assert _infer.variant_of_config(init("model_pixeldit2")) == "pixeldit2"
    assert _infer.variant_of_config({"hidden_size": 64, "patch_size": 4}) is None  # shared names only
    assert _infer.variant_of_config({**C2I, "depth": 3}) is None  # a mix
    # Weight names, under any prefix (a Lightning checkpoint's).
    assert _infer.variant_of_weights(load_weights("model_c2i")) == "c2i"
    assert _infer.variant_of_weights(f"ema_denoiser.{k}" for k in load_weights("model_t2i")) == "t2i"
    assert _infer.variant_of_weights(load_weights("model_pixeldit2")) == "pixeldit2"
    assert _infer.variant_of_weights(["encoder.layers.0.weight"]) is None
    # A config whose names tell nothing: the weight names decide (here, the config then fails
    # on the t2i arguments it lacks, as a t2i model, not as an unknown-argument c2i).
    with pytest.raises(ValueError, match="does not fit PixelDiTT2I"):
        px.load_reference(FIXTURES / "model_t2i.safetensors", {k: T2I[k] for k in ("hidden_size", "patch_size")})


def test_a_preset_fixes_its_variant():
    with pytest.raises(ValueError, match="contradicts the preset 'pixeldit-xl-c2i-256'"):
        px.load_reference(LIGHTNING, "pixeldit-xl-c2i-256", "t2i")


def test_a_wrong_preset_says_what_the_weights_look_like_then_a_short_list(tmp_path):
    with pytest.raises(px.StateDictError) as info:
        px.load_reference(LIGHTNING, "pixeldit-xl-c2i-256")
    message, problems = str(info.value), info.value.problems
    skeleton = eqx.filter_eval_shape(px.build, "pixeldit-xl-c2i-256", key=jax.random.key(0))
    want = {k: v.shape for k, v in px.state_dict(skeleton).items()}
    got = load_weights("model_c2i")
    assert len(problems) == len(set(want) ^ set(got)) + sum(
        want[k] != got[k].shape for k in set(want) & set(got)
    )  # 391: every one of them, in `problems`
    lines = message.splitlines()
    assert lines[0] == f"state dict does not fit PixelDiT ({len(problems)} problem(s)); nothing was loaded:"
    assert lines[1] == (
        "  the weights look like a c2i PixelDiT: hidden_size=64, in_channels=3, patch_size=4, "
        "pixel_hidden_size=8, patch_depth=2, pixel_depth=2, num_classes=10, num_groups=4"
    )
    assert lines[2].startswith("  322 missing, 69 misshaped or not finite key(s); the first of each")
    assert len(lines) <= 12 and len(message) < 1500  # was 391 lines, 30,000 characters
    shown = [line.strip() for line in lines[3:] if not line.strip().startswith("...")]
    assert shown and all(line in problems for line in shown)


def test_few_problems_are_all_listed():
    weights = dict(load_weights("model_c2i"))
    del weights["final_layer.linear.bias"]
    with pytest.raises(px.StateDictError) as info:
        px.load_reference(weights, C2I)
    assert str(info.value).splitlines()[1:] == [
        "  the weights look like a c2i PixelDiT: hidden_size=64, in_channels=3, patch_size=4, pixel_hidden_size=8, "
        "patch_depth=2, pixel_depth=2, num_classes=10, num_groups=4",
        "  missing key 'final_layer.linear.bias' (expected shape (3,))",
    ]


def test_what_the_weights_look_like_reads_every_family():
    assert _infer.infer_config(load_weights("model_c2i")) == ("c2i", C2I)
    variant, config = _infer.infer_config(load_weights("model_t2i"))
    assert variant == "t2i" and config == {k: v for k, v in T2I.items() if k != "use_text_rope"}  # traceless
    variant, config, problem = _infer.read_config(load_weights("model_pixeldit2"))
    manifest = init("model_pixeldit2")
    assert variant == "pixeldit2"
    traced = [k for k in config if k in manifest and k != "in_context_start"]  # the start leaves no trace
    assert len(traced) == 9 and {k: config[k] for k in traced} == {k: manifest[k] for k in traced}
    assert config["mlp_hidden_multiple"] == 0 and config["in_context_start"] == 3  # depth 4: depth - 1
    assert problem.startswith("the grounding encoder (32 wide, 2 blocks) is none of")  # a test-sized encoder
    assert _infer.describe({"a.weight": np.zeros(2)}) == "the weights are 1 tensors of no PixelDiT model"
    partial = {k: v for k, v in load_weights("model_c2i").items() if k != "pixel_embedder.proj.weight"}
    assert _infer.describe(partial) == (
        "the weights look like a c2i PixelDiT: hidden_size=64 (then a weight that fixes the config is missing "
        "or misshaped: no weight 'pixel_embedder.proj.weight')"
    )

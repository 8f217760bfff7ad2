"""The `pixeldit-eqx` command line, run in process (`pixeldit_eqx._cli.main`) on tiny
models and the reference fixture checkpoints, and once as a process."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _digits, runtime

from .helpers import FIXTURES, FIXTURES2, init, load_weights, MANIFEST, SMALL_C2I


pytest.importorskip("typer", reason="the command line needs the `cli` extra (the `test` extra installs it)")

CKPT = FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt"
BF16 = FIXTURES / "checkpoints" / "model_c2i_bf16.pt"
TINY = SMALL_C2I | dict(patch_size=4, num_classes=3)


def cli(capsys, *args):
    """`(exit status, stdout, stderr)` of `pixeldit-eqx *args`."""
    from pixeldit_eqx._cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pixeldit-eqx"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny c2i model file (train.save_model) with random weights, none of them zero."""
    import equinox as eqx
    import jax.random as jr

    skeleton = eqx.filter_eval_shape(px.build, TINY, "c2i", key=jr.key(0))  # nothing compiled
    rng = np.random.default_rng(3)
    weights = {k: 0.3 * rng.standard_normal(v.shape, np.float32) for k, v in px.state_dict(skeleton).items()}
    path = tmp_path_factory.mktemp("model") / "tiny.eqx"
    px.train.save_model(path, px.load_state_dict(skeleton, weights))
    return path


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        ([], ["sample", "convert", "info", "train-digits"]),
        (
            ["sample"],
            ["--weights", "--preset", "--classes", "--per-class", "--steps", "--method", "--guidance", "hf://"],
        ),
        (["convert"], ["SOURCE", "TARGET", "--ema", "--no-ema", "--preset"]),
        (["info"], ["FILE", "--json"]),
        (["train-digits"], ["--quick", "--steps", "--out"]),
    ],
)
def test_help_on_every_command(capsys, command, fragments):
    code, out, err = cli(capsys, *command, "--help")
    assert code == 0 and not err
    for fragment in fragments:
        assert fragment in out


def test_convert_keeps_the_ema_weights_and_reports_what_it_dropped(capsys, tmp_path):
    from safetensors.numpy import load_file

    want = load_weights("model_c2i")
    code, out, err = cli(capsys, "convert", CKPT, tmp_path / "ema.safetensors")
    assert code == 0 and not err
    assert (
        f"kept: {len(want)} tensors, {sum(v.size for v in want.values()):,} parameters (float32): the EMA weights"
        in out
    )
    assert "dropped: denoiser.* (70 tensors), callbacks, epoch, global_step, hyper_parameters, optimizer_states" in out
    got = load_file(tmp_path / "ema.safetensors")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    code, out, _ = cli(capsys, "convert", CKPT, tmp_path / "raw.safetensors", "--no-ema")
    assert code == 0 and "under 'denoiser.'" in out and "ema_denoiser.* (70 tensors)" in out
    raw = load_file(tmp_path / "raw.safetensors")
    assert all(np.array_equal(raw[k], want[k] + 1.0) for k in want)  # the fixture's raw weights are EMA + 1


def test_convert_without_ema_weights_refuses_ema_and_writes_nothing(capsys, tmp_path):
    code, out, err = cli(capsys, "convert", BF16, tmp_path / "x.safetensors", "--ema")
    assert code == 1 and not out
    one_error_line(err, "error: `--ema`: the file has no EMA weights")
    assert not list(tmp_path.iterdir())


def test_info_on_a_torch_checkpoint(capsys):
    code, out, err = cli(capsys, "info", CKPT, "--json")
    assert code == 0 and not err
    report = json.loads(out)
    weights = load_weights("model_c2i")
    assert report["variant"] == "c2i" and report["ema"] is True and report["weights_prefix"] == "ema_denoiser."
    assert report["config"] == MANIFEST["model_c2i"]["init"]
    assert report["parameters"] == sum(v.size for v in weights.values())
    assert report["dtype"] == "float32" and report["problems"] == [] and report["presets"] == []

    code, out, _ = cli(capsys, "info", BF16)
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
    assert lines["dtype"] == "bfloat16" and lines["ema"] == "no" and lines["problems"] == "none"
    assert "hidden_size=64" in lines["config"] and "num_classes=10" in lines["config"]


def test_info_reports_the_problems_it_finds(capsys, tmp_path):
    from safetensors.numpy import save_file

    weights = dict(load_weights("model_c2i"))
    weights.pop("final_layer.linear.bias")
    weights["s_embedder.proj.bias"] = np.full_like(weights["s_embedder.proj.bias"], np.nan)
    save_file(weights, tmp_path / "bad.safetensors")
    code, out, _ = cli(capsys, "info", tmp_path / "bad.safetensors", "--json")
    assert code == 0
    problems = json.loads(out)["problems"]
    assert problems == [
        "missing key 'final_layer.linear.bias' (expected shape (3,))",
        "key 's_embedder.proj.bias': has non-finite values (nan/inf)",
    ]


def test_info_on_a_model_file(capsys, model_file):
    code, out, err = cli(capsys, "info", model_file, "--json")
    assert code == 0 and not err
    report = json.loads(out)
    assert report["variant"] == "c2i" and TINY.items() <= report["config"].items() and report["dtype"] == "float32"

    model = px.train.load_model(model_file)
    assert report["parameters"] == sum(v.size for v in px.state_dict(model).values())
    assert report["problems"] == []


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def test_sample_a_model_file_in_batches(capsys, tmp_path, model_file):
    args = ["sample", "--weights", model_file, "--classes", "2,0", "--per-class", "3", "--steps", "3"]
    args += ["--guidance", "2.0", "--resolution", "8", "--seed", "5"]
    code, out, err = cli(capsys, *args, "--batch-size", "4", "--out", tmp_path / "a.png")
    assert code == 0, err
    assert "2 classes x 3 samples, 8x8" in out
    assert "6/6" in err and "image" in err  # the progress bar over batches (4 + a padded 2)
    mode, a = _png(tmp_path / "a.png")
    assert mode == "L" and a.shape == (2 * 10 + 2, 3 * 10 + 2)
    cells = [a[2 + 10 * r : 10 + 10 * r, 2 + 10 * c : 10 + 10 * c] for r in range(2) for c in range(3)]
    assert len({c.tobytes() for c in cells}) == 6  # six different samples

    code, _, _ = cli(capsys, *args, "--batch-size", "6", "--out", tmp_path / "b.png", "--no-progress")
    _, b = _png(tmp_path / "b.png")
    # Image i's noise depends on i and the seed, not on the batch it was drawn in.
    assert code == 0 and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("args", "status", "fragments"),
    [
        (["sample", "--weights", "hf://nvidia/x.ckpt"], 1, ["`--weights`: expected a Hugging Face file id"]),
        (["sample", "--weights", "s3://bucket/x.ckpt"], 1, ["`--weights`: s3:// ids are not supported"]),
        (["sample", "--weights", "missing.ckpt"], 1, ["`--weights`: no such file: 'missing.ckpt'"]),
        (["sample", "--weights", CKPT, "--resolution", "16"], 1, ["`--preset`: model_c2i_lightning.ckpt holds"]),
        (["sample", "--weights", CKPT, "--preset", "pixeldit-xl-c2i-256"], 1, ["does not fit PixelDiT", "problem(s)"]),
        (["sample", "--weights", CKPT, "--preset", "nope"], 1, ["`--preset`: unknown preset 'nope'"]),
        (["sample", "--weights", CKPT, "--method", "rk4"], 1, ["`--method` must be one of"]),
        (["sample", "--frobnicate"], 2, ["No such option: --frobnicate"]),
        (["info", FIXTURES / "manifest.json"], 1, ["not a file pixeldit-eqx reads"]),
        (["convert", CKPT], 2, ["Missing argument 'TARGET'"]),
        (["train-digits", "--steps", "x"], 2, ["train-digits: error: argument --steps: invalid int value"]),
    ],
)
def test_errors_are_one_line_and_a_nonzero_status(capsys, args, status, fragments):
    code, _, err = cli(capsys, *args)
    assert code == status
    one_error_line(err, *fragments)


def test_train_digits_runs_the_digits_job(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(_digits, "main", lambda argv, prog: calls.append((argv, prog)))
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: calls.append("tuned"))
    code, _, _ = cli(capsys, "train-digits", "--quick", "--steps", "3", "--out", "x.png")
    assert code == 0
    assert calls == ["tuned", (["--quick", "--steps", "3", "--out", "x.png"], "pixeldit-eqx train-digits")]


def test_as_a_process(tmp_path):
    """`python -m pixeldit_eqx`: the same command line, and one line on stderr for an error."""
    ok = subprocess.run(
        [sys.executable, "-m", "pixeldit_eqx", "info", str(BF16)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0 and "variant: c2i" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pixeldit_eqx", "sample", "--weights", str(tmp_path / "none.ckpt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr


@pytest.mark.parametrize(
    ("name", "presets"),
    [("pixeldit_xl_c2i", ["pixeldit-xl-c2i-256", "pixeldit-xl-c2i-512"]), ("pixeldit_t2i_1024", ["pixeldit-t2i-1024"])],
)
def test_info_reads_the_config_of_the_released_networks(name, presets):
    """`info`'s config and presets for the released files, from their key names and shapes
    (`released_shapes.json`; zero-strided arrays stand in for the weights)."""
    from pixeldit_eqx._cli import _files

    released = json.loads((FIXTURES / "released_shapes.json").read_text())[name]
    weights = {k: np.broadcast_to(np.float32(0), s) for k, s in released["state_dict_shapes"].items()}
    variant, config = _files.infer_config(weights)
    assert variant == released["variant"]
    # The text rope settings leave no trace in the weights (the released ones are the defaults).
    traceless = ("use_text_rope", "text_rope_theta")
    assert config == {k: v for k, v in released["init"].items() if k not in traceless}
    assert _files.mismatches(weights, _files.skeleton_shapes(config, variant)) == []
    assert _files.fitting_presets(variant, config, weights) == presets


@pytest.fixture(scope="module")
def pixeldit2_file(tmp_path_factory):
    """The PixelDiT2 fixture network as `save_safetensors` writes it (config in the metadata)."""

    path = tmp_path_factory.mktemp("pixeldit2") / "pixeldit2.safetensors"
    px.save_safetensors(path, px.load_reference(load_weights("model_pixeldit2"), init("model_pixeldit2")))
    return path


def test_convert_stores_the_config_and_info_reports_it(capsys, tmp_path):
    out = tmp_path / "c2i.safetensors"
    code, stdout, _ = cli(capsys, "convert", CKPT, out)
    assert code == 0 and "config: stored, a c2i config read from the weight names and shapes" in stdout
    model = px.load_reference(out)  # no config: the file carries it
    assert (
        isinstance(model, px.PixelDiT)
        and MANIFEST["model_c2i"]["init"].items() <= dataclasses.asdict(model.config).items()
    )
    code, stdout, _ = cli(capsys, "info", out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["config_from"] == "the file's metadata" and report["variant"] == "c2i"
    assert report["config"] == MANIFEST["model_c2i"]["init"] and report["problems"] == []
    # A preset the weights do not fit: one line, and nothing written.
    code, stdout, err = cli(capsys, "convert", CKPT, tmp_path / "xl.safetensors", "--preset", "pixeldit-xl-c2i-256")
    assert code == 1 and not (tmp_path / "xl.safetensors").exists()
    one_error_line(
        err, "does not fit PixelDiT (391 problem(s))", "the weights look like a c2i PixelDiT: hidden_size=64"
    )


def test_info_on_a_pixeldit2_file(capsys, pixeldit2_file):

    code, out, err = cli(capsys, "info", pixeldit2_file, "--json")
    report = json.loads(out)
    assert code == 0 and not err
    assert report["variant"] == "pixeldit2" and report["config_from"] == "the file's metadata"
    want = {k: v for k, v in init("model_pixeldit2").items() if k not in ("encoder", "pretrained_encoder")}
    assert {k: report["config"][k] for k in want if k != "grounding_encoder"} == {
        k: v for k, v in want.items() if k != "grounding_encoder"
    }
    assert report["config"]["grounding_encoder"]["embed_dim"] == 32 and report["problems"] == []
    assert report["parameters"] == 317_400


def test_sample_a_pixeldit2_file(capsys, tmp_path, pixeldit2_file):
    args = ["sample", "--weights", pixeldit2_file, "--classes", "3,7", "--per-class", "1", "--steps", "2"]
    code, out, err = cli(capsys, *args, "--method", "euler", "--resolution", "16", "--out", tmp_path / "p2.png")
    assert code == 0, err
    assert "2 classes x 1 samples, 16x16" in out and "2/2" in err  # the progress bar
    mode, a = _png(tmp_path / "p2.png")
    assert mode == "RGB" and a.shape == (2 * 18 + 2, 18 + 2, 3)
    code, _, err = cli(capsys, *args, "--method", "flowdpm", "--resolution", "16")
    assert code == 1
    one_error_line(err, "`--method`: a PixelDiT2 samples with heun or euler, got 'flowdpm'")


def test_sample_takes_a_pixeldit2_preset_s_settings(capsys, tmp_path, monkeypatch, pixeldit2_file):
    """`--preset pixeldit2-h16-256`: its released sampler settings reach PixelDiT2's sampler
    (the network and sampler are stand-ins here: the released network is 1B parameters)."""
    import jax.numpy as jnp

    from pixeldit_eqx._cli import _app

    tiny = px.load_reference(load_weights("model_pixeldit2"), init("model_pixeldit2"))
    loaded, calls = [], []
    monkeypatch.setattr(_app, "load_reference", lambda path, preset, **kw: loaded.append((preset, kw)) or tiny)

    def fake_sample(model, noise, y, **options):
        calls.append(options)
        return jnp.tanh(noise)

    monkeypatch.setattr(_app, "sample_any", fake_sample)
    args = ["sample", "--weights", pixeldit2_file, "--preset", "pixeldit2-h16-256", "--classes", "1"]
    encoder = FIXTURES.parent / "pixeldit2" / "dinov3_encoder_tiny.safetensors"
    code, out, err = cli(capsys, *args, "--per-class", "1", "--encoder-weights", encoder, "--out", tmp_path / "p.png")
    assert code == 0, err
    assert loaded == [("pixeldit2-h16-256", {"encoder_weights": encoder})]
    assert "1 classes x 1 samples, 256x256" in out
    assert calls == [
        dict(
            num_steps=50,
            method="heun",
            guidance=2.4,
            guidance_interval=(0.125, 0.9),
            shift=1.0,
            noise_scale=1.0,
            t_eps=0.05,
        )
    ]


def test_info_reads_the_config_of_the_released_pixeldit2_networks():
    """`info`'s config and presets for the released PixelDiT2 files, from their key names
    and shapes (zero-strided arrays stand in for the weights)."""
    from pixeldit_eqx._cli import _files

    released = json.loads((FIXTURES2 / "released_shapes.json").read_text())
    for name, preset in (("pixeldit2_h16_in256", "pixeldit2-h16-256"), ("pixeldit2_h16_in512", "pixeldit2-h16-512")):
        entry = released[name]
        shapes = dict(entry["state_dict_shapes_without_encoder"])
        shapes.update(entry["state_dict_shapes_encoder"])  # under `dino_conditioner.encoder.`
        weights = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        variant, config = _files.infer_config(weights)
        # What leaves no trace in the weights: the class-token start, the dropouts, the SiLU layout.
        traceless = ("in_context_start", "attn_dropout", "proj_dropout", "single_silu_cond", "pretrained_encoder")
        assert variant == "pixeldit2"
        assert config == {k: v for k, v in entry["init"].items() if k not in traceless}
        assert _files.fitting_presets(variant, config, weights) == [preset]

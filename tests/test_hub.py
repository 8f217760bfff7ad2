"""Weights by name: `hf://owner/repo[@revision]/file` ids through `huggingface_hub`, fully
offline: a Hugging Face cache folder is built from the fixture checkpoints, and
`HF_HUB_CACHE`/`HF_HUB_OFFLINE=1` point the loaders at it (no network)."""

import shutil
import sys

import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx._hub import hub_download

from .helpers import FIXTURES, FIXTURES2, init, load_weights, MANIFEST


C2I = MANIFEST["model_c2i"]["init"]
MAIN = "a" * 40
V1 = "b" * 40
CKPT = "imagenet256_pixeldit_xl_epoch320.ckpt"


def _put(cache, repo_id, commit, files, refs=()):
    """`files` (name in the repo -> local file) as the snapshot `commit` of `repo_id`, in
    huggingface_hub's cache layout; `refs` name the commit (`main`, a branch, a tag)."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    for name, source in files.items():
        target = folder / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for ref in refs:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding the fixture checkpoints under released names."""
    pytest.importorskip("huggingface_hub", reason="hf:// ids need the `hub` extra (the `test` extra installs it)")
    cache = tmp_path / "hf-cache"
    _put(
        cache, "nvidia/PixelDiT-ImageNet", MAIN, {CKPT: FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt"}, ["main"]
    )
    _put(cache, "nvidia/PixelDiT-ImageNet", V1, {CKPT: FIXTURES / "checkpoints" / "model_c2i_bf16.pt"}, ["v1"])
    _put(
        cache,
        "nvidia/PixelDiT2-ImageNet",
        MAIN,
        {"model.safetensors": FIXTURES2 / "model_pixeldit2.safetensors"},
        ["main"],
    )
    _put(
        cache, "timm/dinov3-tiny", MAIN, {"model.safetensors": FIXTURES2 / "dinov3_encoder_tiny.safetensors"}, ["main"]
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _arrays(model):
    return {k: np.asarray(v) for k, v in px.state_dict(model).items()}


def test_load_reference_by_hub_id(hub):
    model = px.load_reference(f"hf://nvidia/PixelDiT-ImageNet/{CKPT}", C2I)
    want = load_weights("model_c2i")  # the fixture checkpoint's EMA weights
    got = _arrays(model)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_revision_picks_the_snapshot(hub):
    main = hub_download(f"hf://nvidia/PixelDiT-ImageNet/{CKPT}")
    by_commit = hub_download(f"hf://nvidia/PixelDiT-ImageNet@{MAIN}/{CKPT}")
    v1 = hub_download(f"hf://nvidia/PixelDiT-ImageNet@v1/{CKPT}")
    assert main == by_commit and f"/snapshots/{MAIN}/" in main and f"/snapshots/{V1}/" in v1
    bf16 = px.load_reference(f"hf://nvidia/PixelDiT-ImageNet@v1/{CKPT}", C2I)
    assert bf16.s_embedder.proj.weight.dtype == np.float32  # the bf16 file, cast to the model's dtype
    from_path = px.load_reference(FIXTURES / "checkpoints" / "model_c2i_bf16.pt", C2I)
    np.testing.assert_array_equal(bf16.s_embedder.proj.weight, from_path.s_embedder.proj.weight)


def test_pixeldit2_and_its_encoder_by_hub_id(hub):
    config = init("model_pixeldit2")
    whole = px.load_reference("hf://nvidia/PixelDiT2-ImageNet/model.safetensors", config)
    assert isinstance(whole, px.PixelDiT2)  # the variant from the config's names
    net = {k: v for k, v in load_weights("model_pixeldit2").items() if not k.startswith("dino_conditioner.encoder.")}
    model = px.load_reference(net, config, encoder_weights="hf://timm/dinov3-tiny/model.safetensors")
    local = px.load_reference(net, config, encoder_weights=FIXTURES2 / "dinov3_encoder_tiny.safetensors")
    a, b = _arrays(model), _arrays(local)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    encoder = [k for k in a if k.startswith("dino_conditioner.encoder.")]
    assert encoder and not all(np.array_equal(a[k], _arrays(whole)[k]) for k in encoder)  # the other file's


@pytest.mark.parametrize(
    ("spec", "error", "fragments"),
    [
        ("hf://nvidia/PixelDiT-ImageNet/missing.ckpt", FileNotFoundError, ["cannot get", "HF_HUB_OFFLINE is set"]),
        ("hf://nvidia/PixelDiT-ImageNet@v9/" + CKPT, FileNotFoundError, ["cannot get", "@v9"]),
        ("hf://nvidia/Unknown/x.ckpt", FileNotFoundError, ["cannot get 'hf://nvidia/Unknown/x.ckpt'"]),
        ("hf://nvidia/x.ckpt", ValueError, ["expected a Hugging Face file id", "hf://owner/repo/path/in/repo"]),
        ("hf://nvidia/PixelDiT-ImageNet/../x.ckpt", ValueError, ["expected a Hugging Face file id"]),
    ],
)
def test_what_cannot_be_had_offline_is_named(hub, spec, error, fragments):
    with pytest.raises(error) as info:
        px.load_reference(spec, C2I)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_without_huggingface_hub_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what an install without it gives
    with pytest.raises(ImportError, match=r"needs the optional package `huggingface_hub`.*pixeldit-eqx\[hub\]"):
        px.load_reference(f"hf://nvidia/PixelDiT-ImageNet/{CKPT}", C2I)


def test_the_command_line_takes_hub_ids(hub, capsys, tmp_path):
    pytest.importorskip("typer", reason="the command line needs the `cli` extra (the `test` extra installs it)")
    import json

    from pixeldit_eqx._cli import main

    assert main(["info", f"hf://nvidia/PixelDiT-ImageNet/{CKPT}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variant"] == "c2i" and report["config"] == C2I and report["problems"] == []
    out = tmp_path / "x.safetensors"
    assert main(["convert", f"hf://nvidia/PixelDiT-ImageNet@v1/{CKPT}", str(out)]) == 0
    assert "config: stored" in capsys.readouterr().out
    assert isinstance(px.load_reference(out), px.PixelDiT)  # the config came along
    assert main(["sample", "--weights", "hf://nvidia/PixelDiT-ImageNet/none.ckpt", "--resolution", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pixeldit-eqx: error: `--weights`: cannot get")

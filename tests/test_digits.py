"""The digits quick start (`examples/digits.py`): a smoke test and the slow quality bar."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "digits.py"
SUMMARY_KEYS = {
    "train_seconds",
    "sample_accuracy",
    "classifier_heldout_accuracy",
    "frechet_distance",
    "frechet_distance_real_vs_real",
    "steps",
    "seed",
}

pytest.importorskip("sklearn")
pytest.importorskip("PIL")


def _load_script():
    spec = importlib.util.spec_from_file_location("digits_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["pixeldit", "pixeldit2"])
def test_quick_run(tmp_path, capsys, model):
    """`--quick`, in process (so under the suite's strict promotion and shape checks)."""
    digits = _load_script()
    png, npz = tmp_path / "grid", tmp_path / "samples.npz"
    argv = ["--quick", "--steps", "3", "--out", str(png), "--save-samples", str(npz), "--no-progress"]
    digits.main([*argv, "--model", model])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 3 and summary["seed"] == 0 and summary["model"] == model
    assert 0.0 <= summary["sample_accuracy"] <= 1.0
    assert summary["classifier_heldout_accuracy"] > 0.9
    assert summary["frechet_distance"] >= 0.0 and summary["frechet_distance_real_vs_real"] >= 0.0
    assert (png / "digits_samples.png").is_file()  # a directory gets the default name

    saved = np.load(npz)
    images, labels = saved["images"], saved["labels"]
    res = summary["resolution"]
    assert images.shape == (len(labels), 1, res, res) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 16.0
    assert labels.shape == (100,)
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 10))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixeldit", "pixeldit2"])
def test_default_run_reaches_the_bar(tmp_path, model):
    """The main job with its defaults, as a user runs it: accuracy >= 0.95 and a PNG."""
    png = tmp_path / "digits.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", model, "--out", str(png), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert SUMMARY_KEYS <= set(summary)
    assert summary["sample_accuracy"] >= 0.95, summary
    assert summary["model"] == model
    assert png.is_file()

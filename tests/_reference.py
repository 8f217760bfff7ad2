"""Reference fixtures: golden inputs, weights and outputs from the PyTorch reference."""

import json
import pathlib

import numpy as np


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "reference"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def load_case(name: str) -> dict[str, np.ndarray]:
    """The inputs/outputs `.npz` of a reference fixture case."""
    return dict(np.load(FIXTURES / f"{name}.npz"))


def load_weights(name: str) -> dict[str, np.ndarray]:
    """The reference `state_dict()` of a fixture case."""
    from safetensors.numpy import load_file

    return load_file(FIXTURES / f"{name}.safetensors")


def rel_err(port, ref) -> float:
    """`max|port - ref| / max|ref|` over the whole output (the fixtures' metric)."""
    port, ref = np.asarray(port, np.float64), np.asarray(ref, np.float64)
    assert port.shape == ref.shape, (port.shape, ref.shape)
    return float(np.abs(port - ref).max() / np.abs(ref).max())

"""Test configuration: strict dtype and rank promotion, fixtures for keys and reference data.

jaxtyping's import hook (with beartype) is switched on for the whole `pixeldit_eqx`
package by `--jaxtyping-packages` in pyproject.toml, so the package is imported lazily
here: never at module level, or the hook would miss it.
"""

import json
import pathlib

import jax
import numpy as np
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)


@pytest.fixture(scope="session")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


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

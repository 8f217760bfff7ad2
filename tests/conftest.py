"""Test configuration: strict dtype and rank promotion, fixtures for keys, the reference
models and the small models that several files use.

jaxtyping's import hook (with beartype) is switched on for the whole `pixeldit_eqx`
package by `--jaxtyping-packages` in pyproject.toml. The plugin installs it before conftest
files and test modules are imported, so test files import the package at their top
(`test_shape_checks.py` keeps that true).

Models are immutable pytrees: a session-scoped model is loaded (or built) once per test
process and shared by every test that reads it.
"""

import jax
import pytest

import pixeldit_eqx as px

from .helpers import FIXTURES, init, load_weights, MANIFEST


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)


@pytest.fixture(scope="session")
def c2i_reference() -> px.PixelDiT:
    """The c2i reference fixture model (`fixtures/reference/model_c2i.safetensors`)."""
    return px.load_reference(FIXTURES / "model_c2i.safetensors", MANIFEST["model_c2i"]["init"], "c2i")


@pytest.fixture(scope="session")
def t2i_reference() -> px.PixelDiTT2I:
    """The t2i reference fixture model (`fixtures/reference/model_t2i.safetensors`)."""
    return px.load_reference(FIXTURES / "model_t2i.safetensors", MANIFEST["model_t2i"]["init"], "t2i")


@pytest.fixture(scope="session")
def pixeldit2_reference() -> px.PixelDiT2:
    """The PixelDiT2 reference fixture model (`fixtures/pixeldit2/model_pixeldit2.safetensors`)."""
    return px.load_reference(load_weights("model_pixeldit2"), init("model_pixeldit2"), "pixeldit2")

"""Test configuration: strict dtype and rank promotion, fixtures for keys and reference data.

jaxtyping's import hook (with beartype) is switched on for the whole `pixeldit_eqx`
package by `--jaxtyping-packages` in pyproject.toml. The plugin installs it before conftest
files and test modules are imported, so test files import the package at their top
(`test_shape_checks.py` keeps that true).
"""

import jax
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)

"""The suite's shape checks reach the package as the test files import it (at their top)."""

import jax.numpy as jnp
import jaxtyping
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import flow


def test_a_public_function_imported_at_the_top_is_shape_checked():
    with pytest.raises(jaxtyping.TypeCheckError):
        px.patchify(jnp.zeros((4, 4), jnp.float32), 2)  # (C, H, W) expected


def test_a_submodule_imported_at_the_top_is_shape_checked():
    with pytest.raises(jaxtyping.TypeCheckError):
        flow.time_shift(jnp.zeros(3, jnp.int32), 1.0)  # a float `t` expected

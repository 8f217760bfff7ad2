"""Rotary position tables (`rope_1d`, `rope_2d`) and `apply_rope` against the reference fixtures."""

import jax
import jax.numpy as jnp
import numpy as np

import pixeldit_eqx as px

from .helpers import load_case, rel_err


def _complex(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def test_rope_tables():
    assert rel_err(_complex(px.rope_2d(16, 3, 5)), load_case("rope_2d")["out_freqs_cis"]) <= 1e-5
    assert rel_err(_complex(px.rope_1d(16, 7)), load_case("rope_1d_text")["out_freqs_cis"]) <= 1e-5


def test_rope_2d_of_a_single_row_and_column():
    angles = np.asarray(px.rope_2d(8, 1, 1))
    assert angles.shape == (1, 4) and np.all(angles == 0)
    angles = np.asarray(px.rope_2d(8, 1, 3))  # y positions all 0 (grid of one)
    assert np.all(angles[:, 1::2] == 0) and angles[-1, 0] == 16.0


def test_apply_rope():
    data = load_case("apply_rotary_emb")
    angles = np.arctan2(data["in_freqs_cis"][..., 1], data["in_freqs_cis"][..., 0])
    rotate = jax.vmap(px.apply_rope, in_axes=(0, None))
    assert rel_err(rotate(jnp.asarray(data["in_q"]), jnp.asarray(angles)), data["out_q"]) <= 1e-5
    assert rel_err(rotate(jnp.asarray(data["in_k"]), jnp.asarray(angles)), data["out_k"]) <= 1e-5


def test_rope_preserves_norm_and_keeps_dtype(getkey):
    q = jax.random.normal(getkey(), (15, 2, 16)).astype(jnp.bfloat16)
    out = px.apply_rope(q, px.rope_2d(16, 3, 5))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        jnp.linalg.norm(out.astype(jnp.float32), axis=-1),
        jnp.linalg.norm(q.astype(jnp.float32), axis=-1),
        rtol=2e-2,
    )

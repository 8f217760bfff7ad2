"""Patch and pixel token embedders and `patchify`/`unpatchify` against the reference fixtures."""

import jax
import jax.numpy as jnp
import numpy as np

import pixeldit_eqx as px

from .helpers import load_case, load_weights, rel_err


def test_patch_embedder(getkey):
    embed = px.load_state_dict(px.PatchEmbedder(48, 32, key=getkey()), load_weights("patch_token_embedder"))
    data = load_case("patch_token_embedder")
    assert rel_err(jax.vmap(embed)(jnp.asarray(data["in_0"])), data["out"]) <= 1e-5


def test_pixel_embedder(getkey):
    embed = px.load_state_dict(px.PixelEmbedder(3, 8, key=getkey()), load_weights("pixel_token_embedder"))
    data = load_case("pixel_token_embedder")
    out = jax.vmap(lambda x: embed(x, 2))(jnp.asarray(data["in_x"]))  # (B, L, p2, D_pix)
    assert rel_err(out.reshape(-1, 4, 8), data["out"]) <= 1e-5


def test_patchify_matches_unfold_order():
    x = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 6)
    patches = px.patchify(x, 2)
    assert patches.shape == (6, 8)
    # patch (row 0, col 1): channel-major (C, p_row, p_col)
    np.testing.assert_array_equal(patches[1], np.asarray(x[:, 0:2, 2:4]).reshape(-1))
    pixels = patches.reshape(6, 2, 4).transpose(0, 2, 1)  # (L, p2, C)
    np.testing.assert_array_equal(px.unpatchify(pixels, 2, 4, 6), x)

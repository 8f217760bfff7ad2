"""`RotaryAttention` against the reference fixture."""

import jax
import jax.numpy as jnp
import numpy as np

import pixeldit_eqx as px

from .helpers import load_case, load_weights, rel_err


def test_rotary_attention(getkey):
    attn = px.load_state_dict(px.RotaryAttention(32, 4, key=getkey()), load_weights("rotary_attention"))
    data = load_case("rotary_attention")
    angles = np.arctan2(data["in_pos"][..., 1], data["in_pos"][..., 0])
    out = jax.vmap(attn, in_axes=(0, None))(jnp.asarray(data["in_0"]), jnp.asarray(angles))
    assert rel_err(out, data["out"]) <= 1e-5

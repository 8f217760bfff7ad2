"""The transformer blocks (`DiTBlock`, `MMDiTBlock`, `PiTBlock`) against the reference fixtures, and
`BlockStack`, the scanned stack of blocks."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import pixeldit_eqx as px
from pixeldit_eqx._blocks import check_checkpoint

from .helpers import jaxpr_eqns, load_case, load_weights, MANIFEST, rel_err


def test_dit_block(getkey):
    block = px.load_state_dict(px.DiTBlock(32, 4, key=getkey()), load_weights("dit_block"))
    data = load_case("dit_block")
    out = jax.vmap(block, in_axes=(0, 0, None))(
        jnp.asarray(data["in_x"]), jnp.asarray(data["in_c"][:, 0]), px.rope_2d(8, 3, 5)
    )
    assert rel_err(out, data["out"]) <= 1e-5


def test_mmdit_block(getkey):
    block = px.load_state_dict(px.MMDiTBlock(32, 4, key=getkey()), load_weights("mmdit_block"))
    data = load_case("mmdit_block")

    def run(x, y, c):
        return block((x, y), c, px.rope_2d(8, 3, 5), px.rope_1d(8, 6))

    out_x, out_y = jax.vmap(run)(
        jnp.asarray(data["in_x"]),
        jnp.asarray(data["in_y"]),
        jnp.asarray(data["in_c"][:, 0]),
    )
    assert rel_err(out_x, data["out_x"]) <= 1e-5
    assert rel_err(out_y, data["out_y"]) <= 1e-5


@pytest.mark.parametrize("case", ["pit_block_pre", "pit_block_post"])
def test_pit_block(case, getkey):
    post = MANIFEST[case]["init"]["adaln_post_modulation"]
    block = px.PiTBlock(8, 32, 2, 32, 4, post_modulation=post, key=getkey())
    block = px.load_state_dict(block, load_weights(case))
    data = load_case(case)
    x = jnp.asarray(data["in_x"]).reshape(2, 15, 4, 8)
    s = jnp.asarray(data["in_s_cond"]).reshape(2, 15, 32)
    out = jax.vmap(block, in_axes=(0, 0, None))(x, s, px.rope_2d(8, 3, 5))
    assert rel_err(out.reshape(30, 4, 8), data["out"]) <= 1e-5


@pytest.mark.parametrize("post", [False, True])
def test_pit_block_adaln_gradient_is_assembled_by_concatenation(post, getkey):
    """The per-pixel adaLN takes each chunk's rows of its weight with `lax.split`, so the
    weight's gradient is one concatenation of the chunks' gradients, not a zero pad per
    chunk summed (which XLA:CPU ran element by element, a bf16 rounding per term under
    bf16 compute). Checked against forward mode, which never transposes the split."""
    block = px.PiTBlock(8, 40, 2, 48, 4, post_modulation=post, key=getkey())
    block = eqx.tree_at(lambda b: b.adaln.weight, block, jax.random.normal(getkey(), block.adaln.weight.shape))
    x, s_cond = jax.random.normal(getkey(), (5, 4, 8)), jax.random.normal(getkey(), (5, 40))
    angles = px.rope_2d(12, 1, 5)

    def loss(weight, dtype):
        b = px.cast_params(eqx.tree_at(lambda b: b.adaln.weight, block, weight), dtype)
        return jnp.sum(jnp.sin(b(x, s_cond.astype(dtype), angles)))

    weight = block.adaln.weight
    for dtype in (jnp.float32, jnp.bfloat16):
        names = [
            e.primitive.name for e in jaxpr_eqns(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(weight, dtype).jaxpr)
        ]
        assert "pad" not in names and "concatenate" in names
    grad = jax.grad(loss)(weight, jnp.float32)
    direction = jax.random.normal(getkey(), weight.shape)
    _, tangent = jax.jvp(lambda w: loss(w, jnp.float32), (weight,), (direction,))
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(tangent), rtol=1e-5)


def test_scanned_stack_equals_blocks_one_by_one(c2i_reference):
    model = c2i_reference
    data = load_case("model_c2i")
    x, t, y = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    s = model.s_embedder(px.patchify(x, model.patch_size))
    c = jax.nn.silu(model.t_embedder(t) + model.y_embedder(y))
    angles = px.rope_2d(16, 4, 4)
    scanned = model.patch_blocks(s, c, angles)
    looped = s
    for i in range(model.patch_blocks.depth):
        looped = model.patch_blocks.layer(i)(looped, c, angles)
    np.testing.assert_allclose(scanned, looped, rtol=1e-6, atol=1e-6)
    restacked = px.BlockStack.from_layers([model.patch_blocks.layer(i) for i in range(model.patch_blocks.depth)])
    np.testing.assert_array_equal(restacked(s, c, angles), scanned)
    empty = px.BlockStack(lambda k: model.patch_blocks.layer(0), 0, key=jax.random.key(0))
    assert empty.depth == 0 and empty(s, c, angles) is s
    with pytest.raises(ValueError, match="`layers` is empty"):
        px.BlockStack.from_layers([])
    with pytest.raises(ValueError, match="`depth` must be >= 0, got -1"):
        px.BlockStack(lambda k: model.patch_blocks.layer(0), -1, key=jax.random.key(0))
    for bad in ("full", 1, None):
        with pytest.raises(
            ValueError, match=re.escape(f'`checkpoint` must be False, "lean" or True, got checkpoint={bad!r}.')
        ):
            check_checkpoint(bad)
    # Under the test suite's type checking the annotation refuses first; without it, the ValueError.
    with pytest.raises((ValueError, TypeCheckError), match="checkpoint"):
        px.BlockStack(lambda k: model.patch_blocks.layer(0), 1, key=jax.random.key(0), checkpoint="full")
    with pytest.raises((ValueError, TypeCheckError), match="checkpoint"):
        px.PixelDiT(
            patch_size=4, num_groups=2, hidden_size=32, pixel_hidden_size=8, checkpoint=1, key=jax.random.key(0)
        )

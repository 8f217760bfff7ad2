"""No table is baked into a program as a constant: the lowered program of a model has
the same size at 64x64 and at 512x512 (a baked 512x512 sincos table alone would be
megabytes of StableHLO text)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import pixeldit_eqx as px


CONFIGS = {
    "c2i": dict(
        in_channels=3, patch_size=16, hidden_size=32, num_groups=2, patch_depth=1, pixel_depth=1,
        pixel_hidden_size=8, num_classes=10,
    ),
    "t2i": dict(
        in_channels=3, patch_size=16, hidden_size=32, num_groups=2, patch_depth=1, pixel_depth=1,
        pixel_hidden_size=8, pixel_attn_hidden_size=16, txt_embed_dim=12, txt_max_length=8,
    ),
}  # fmt: skip


def _program_bytes(variant: str, side: int, backward: bool) -> int:
    config = CONFIGS[variant]
    model = eqx.filter_eval_shape(lambda: px.build(config, variant, key=jax.random.key(0)))
    params, static = eqx.partition(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))
    x = jax.ShapeDtypeStruct((1, 3, side, side), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    if variant == "c2i":
        cond = jax.ShapeDtypeStruct((1,), jnp.int32)
    else:
        cond = jax.ShapeDtypeStruct((1, 5, config["txt_embed_dim"]), jnp.float32)

    def forward(params, x, t, cond):
        return jax.vmap(eqx.combine(params, static))(x, t, cond)

    fn = forward
    if backward:
        fn = jax.grad(lambda params, x, t, cond: jnp.mean(forward(params, x, t, cond) ** 2))
    return len(jax.jit(fn).lower(params, x, t, cond).as_text())


@pytest.mark.parametrize("variant", sorted(CONFIGS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_program_size_does_not_grow_with_the_image(variant, backward):
    small = _program_bytes(variant, 64, backward)
    large = _program_bytes(variant, 512, backward)  # 64x more pixels
    # Only the digits of the shapes written in the text differ (about 2% here); a
    # baked 512x512 table would add megabytes.
    assert large <= 1.05 * small, (small, large)
    assert large < 400_000

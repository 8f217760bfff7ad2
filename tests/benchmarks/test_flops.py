"""The benchmark's analytic FLOP count, against hand-derived totals and against the
matmuls that the traced programs of the model really contain."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from pixeldit_eqx import _dots
from tests.benchmarks.bench import MID
from tests.benchmarks.flops import pixeldit_flops


@pytest.mark.parametrize(
    "hw, forward, forward_backward",
    [(64, 10_293_870_592, 30_827_085_824), (128, 44_277_170_176, 132_616_552_448)],
)
def test_mid_config_totals(hw, forward, forward_backward):
    # Per example at 64x64 (L = 64 patches of 64 pixels): matmuls linear in L,
    # 19,503,104 * L; attention 8,192 * L^2 (6 DiT + 2 PiT blocks, 4 L^2 D each);
    # conditioning 4,980,736 (timestep MLP + 6 adaLN). Times batch 8.
    n = pixeldit_flops(MID, "c2i", hw, hw, batch=8)
    tokens = (hw // 8) ** 2
    assert n["forward"] == 8 * (19_503_104 * tokens + 8_192 * tokens**2 + 4_980_736)
    assert n["forward"] == forward
    assert n["forward_backward"] == forward_backward
    assert n["forward_backward"] == n["forward"] + n["backward"]


def _dot_flops(jaxpr: jex_core.Jaxpr, mult: int = 1) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", *_dots.NAMES):
            # `dense` binds the matmul primitives of `pixeldit_eqx._dots` (no batch axes)
            dims = eqn.params.get("dimension_numbers")
            lhs_contract = dims[0][0] if dims is not None else eqn.params["contract"][0]
            lhs = eqn.invars[0].aval.shape
            k = int(np.prod([lhs[i] for i in lhs_contract]))
            total += mult * 2 * k * int(np.prod(eqn.outvars[0].aval.shape))
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex_core.Jaxpr):
                    total += _dot_flops(sub, inner)
    return total


def _unrolled(stack, carry, *args):
    """A BlockStack run as a plain loop: no rematerialisation, so the traced backward
    pass holds exactly the model's matmuls."""
    for i in range(stack.depth):
        carry = stack.layer(i)(carry, *args)
    return carry


CASES = {
    "c2i": dict(
        in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2,
        pixel_depth=2, pixel_hidden_size=8, num_classes=10,
    ),
    "c2i-post": dict(
        in_channels=3, patch_size=2, hidden_size=16, num_groups=2, patch_depth=1,
        pixel_depth=1, pixel_hidden_size=4, num_classes=5, pit_adaln_post_modulation=True,
        mlp_ratio=2.0,
    ),
    "t2i": dict(
        in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2,
        pixel_depth=1, pixel_hidden_size=8, pixel_attn_hidden_size=16, pixel_num_groups=2,
        txt_embed_dim=12, txt_max_length=6,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_count_matches_traced_matmuls(name, monkeypatch):
    import pixeldit_eqx as px

    monkeypatch.setattr(px.BlockStack, "__call__", _unrolled)
    config = CASES[name]
    variant = "t2i" if name == "t2i" else "c2i"
    batch, height, width, text_len = 2, 8, 12, 9  # text longer than txt_max_length
    # Shapes only: tracing needs no parameter values (and no initialiser compiles).
    model = eqx.filter_eval_shape(lambda: px.build(config, variant, key=jax.random.key(0)))
    params, static = eqx.partition(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))
    x = jnp.zeros((batch, 3, height, width))
    t = jnp.full((batch,), 0.5)
    if variant == "c2i":
        cond = jnp.zeros((batch,), jnp.int32)
    else:
        cond = jnp.zeros((batch, text_len, config["txt_embed_dim"]))

    def forward(p):
        return jax.vmap(eqx.combine(p, static))(x, t, cond)

    def loss(p):
        return jnp.mean(forward(p) ** 2)

    expected = pixeldit_flops(config, variant, height, width, batch, text_len=text_len)
    # The pixel embedder's Linear (C = 3 inputs) runs as elementwise multiply-adds, not
    # as a matmul: counted as model work, absent from the traced matmuls (its forward
    # and its weight gradient; its input needs none).
    embed = 2 * batch * height * width * 3 * config["pixel_hidden_size"]
    assert _dot_flops(jax.make_jaxpr(forward)(params).jaxpr) == expected["forward"] - embed
    traced = _dot_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    assert traced == expected["forward_backward"] - 2 * embed

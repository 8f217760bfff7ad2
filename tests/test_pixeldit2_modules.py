"""PixelDiT2's parts: reference parity (modules to 1e-5), the torch-exact bicubic resize,
the frozen DINOv3 encoder, and input validation."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx._dinov3 import encoder_config
from pixeldit_eqx._pixeldit2 import FeedForward, ModulatedDiTBlock, PatchFinalLayer, TimestepProjection

from .helpers import init, load_case, load_weights, MANIFEST2, rel_err, vmapped


# ---------------------------------------------------------------------------------------
# Bicubic resize: against an independent numpy (float64) statement of PyTorch's algorithm
# ---------------------------------------------------------------------------------------


def _torch_bicubic_matrix(in_size: int, out_size: int, scale: float | None) -> np.ndarray:
    """`(out, in)` interpolation matrix of `F.interpolate(mode="bicubic",
    align_corners=False)` along one axis: Keys a = -0.75, clamped taps, no antialias; the
    source coordinate in float32 as PyTorch's kernel computes it, the rest in float64."""
    a = -0.75
    ratio = np.float32(in_size / out_size if scale is None else 1.0 / scale)
    matrix = np.zeros((out_size, in_size))
    for dst in range(out_size):
        src = ratio * np.float32(dst + 0.5) - np.float32(0.5)
        base = min(int(np.floor(src)), in_size - 1)
        t = min(max(float(src) - base, 0.0), 1.0)
        for tap in range(-1, 3):
            d = abs(t - tap)
            w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            matrix[dst, min(max(base + tap, 0), in_size - 1)] += w
    return matrix


@pytest.mark.parametrize(
    "shape, size",
    [
        ((3, 8, 8), (16, 16)),  # up x2
        ((2, 5, 7), (13, 4)),  # up in H, down in W, non-integer ratios
        ((1, 32, 48), (9, 10)),  # strong downsampling: no antialias
        ((3, 4, 6), (4, 18)),  # one axis unchanged
    ],
)
def test_resize_bicubic_matches_torch_algorithm(shape, size, getkey):
    x = jax.random.normal(getkey(), shape)
    out = px.resize_bicubic(x, size)
    wh = _torch_bicubic_matrix(shape[1], size[0], None)
    ww = _torch_bicubic_matrix(shape[2], size[1], None)
    ref = np.einsum("oh,chw,pw->cop", wh, np.asarray(x, np.float64), ww)
    assert out.shape == (shape[0], *size)
    assert rel_err(out, ref) <= 1e-6


def test_resize_bicubic_scale_factor_maps_by_the_factor(getkey):
    x = jax.random.normal(getkey(), (2, 4, 4))
    sh, sw = 5.1 / 4, 7.1 / 4  # the REPA teacher's `(n + 0.1) / g` factors
    out = px.resize_bicubic(x, scale_factor=(sh, sw))
    assert out.shape == (2, 5, 7)
    ref = np.einsum(
        "oh,chw,pw->cop",
        _torch_bicubic_matrix(4, 5, sh),
        np.asarray(x, np.float64),
        _torch_bicubic_matrix(4, 7, sw),
    )
    assert rel_err(out, ref) <= 1e-6
    # ... which is not the same as mapping by the ratio of the sizes
    assert rel_err(px.resize_bicubic(x, (5, 7)), ref) > 1e-4


def test_resize_bicubic_same_size_is_identity_and_bad_arguments_raise(getkey):
    x = jax.random.normal(getkey(), (3, 6, 5))
    assert px.resize_bicubic(x, (6, 5)) is x
    with pytest.raises(ValueError, match="exactly one"):
        px.resize_bicubic(x)
    with pytest.raises(ValueError, match="size"):
        px.resize_bicubic(x, (0, 5))
    with pytest.raises(ValueError, match="scale_factor"):
        px.resize_bicubic(x, scale_factor=(0.01, 1.0))


# ---------------------------------------------------------------------------------------
# Reference parity of the modules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["feedforward_multiple", "feedforward_multiple0"])
def test_feedforward_parity(case, getkey):
    ff = px.load_state_dict(FeedForward(**init(case), key=getkey()), load_weights(case))
    expected_hidden = {"feedforward_multiple": 128, "feedforward_multiple0": 106}[case]
    assert ff.w1.weight.shape == (expected_hidden, 40)
    data = load_case(case)
    assert rel_err(vmapped(ff, jnp.asarray(data["in_x"])), data["out"]) <= 1e-5


def _block(getkey):
    block = ModulatedDiTBlock(**init("modulated_dit_block"), key=getkey())
    return px.load_state_dict(block, load_weights("modulated_dit_block"))


def _angles_of(table: np.ndarray) -> np.ndarray:
    """Rope angles from a complex table stored as `(..., (real, imag))`."""
    return np.arctan2(table[..., 1], table[..., 0])


def _swap(block, angles, x, c):
    return block(x, c, angles)


def test_modulated_dit_block_parity(getkey):
    block = _block(getkey)
    data = load_case("modulated_dit_block")
    angles = px.rope_2d(16, 4, 4)
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    assert rel_err(table, data["in_pos"]) <= 1e-6
    x, c = jnp.asarray(data["in_x"]), jnp.asarray(data["in_c"])
    out = vmapped(eqx.Partial(_swap, block, angles), x, c)
    assert rel_err(out, data["out"]) <= 1e-5


def test_modulated_dit_block_context_parity(getkey):
    block = _block(getkey)
    data = load_case("modulated_dit_block_context")
    # the context tokens' rope rows are 1+0j (angle 0), their condition the mean patch condition
    angles = jnp.concatenate([jnp.zeros((4, 8)), px.rope_2d(16, 4, 4)])
    assert rel_err(np.stack([np.cos(angles), np.sin(angles)], -1), data["in_pos"]) <= 1e-6
    c_patch = data["mid_c_patch"]
    c = np.concatenate([np.repeat(c_patch.mean(1, keepdims=True), 4, axis=1), c_patch], axis=1)
    assert rel_err(c, data["in_c"]) <= 1e-6
    x, c = jnp.asarray(data["in_x"]), jnp.asarray(data["in_c"])
    out = vmapped(eqx.Partial(_swap, block, angles), x, c)
    assert rel_err(out, data["out"]) <= 1e-5


def test_patch_final_layer_parity(getkey):
    layer = px.load_state_dict(
        PatchFinalLayer(**init("patch_final_layer"), key=getkey()), load_weights("patch_final_layer")
    )
    data = load_case("patch_final_layer")
    x = jnp.asarray(data["in_x"])
    assert rel_err(vmapped(layer, x, jnp.asarray(data["in_c"])), data["out"]) <= 1e-5
    assert rel_err(vmapped(layer, x, jnp.asarray(data["in_c2d"])), data["out_c2d"]) <= 1e-5


def test_timestep_projection_parity(getkey):
    proj = TimestepProjection(**init("timestep_projection"), key=getkey())
    proj = px.load_state_dict(proj, load_weights("timestep_projection"))
    data = load_case("timestep_projection")
    t = jnp.asarray(data["in_t"])
    out = vmapped(eqx.Partial(proj, grid_hw=(4, 4)), jnp.asarray(data["in_tokens"]), t)
    assert rel_err(out, data["out"]) <= 1e-5
    out = vmapped(eqx.Partial(proj, grid_hw=(3, 5)), jnp.asarray(data["in_tokens_nonsquare"]), t)
    assert rel_err(out, data["out_nonsquare"]) <= 1e-5
    with pytest.raises(ValueError, match="grid_hw"):
        proj(jnp.asarray(data["in_tokens"][0]), t[0], (3, 5))


def _tiny_encoder(getkey):
    encoder = px.DINOv3(init("dinov3_encoder_tiny")["encoder"], key=getkey())
    return px.load_state_dict(encoder, load_weights("dinov3_encoder_tiny"))


def test_dinov3_encoder_parity_and_rope_table(getkey):
    encoder = _tiny_encoder(getkey)
    assert encoder.num_prefix_tokens == 5
    data = load_case("dinov3_encoder_tiny")
    for hw, grid in (("32x32", (2, 2)), ("32x48", (2, 3))):
        x = jnp.asarray(data[f"in_x_{hw}"])
        assert rel_err(vmapped(encoder, x), data[f"out_features_{hw}"]) <= 1e-5
        assert rel_err(vmapped(encoder.patch_tokens, x), data[f"out_patch_tokens_{hw}"]) <= 1e-5
        assert rel_err(encoder.rope_table(*grid), data[f"mid_rope_{grid[0]}x{grid[1]}"]) <= 1e-5


@pytest.mark.parametrize("case", ["grounding_conditioner_same_grid", "grounding_conditioner_resize"])
def test_grounding_conditioner_parity(case, getkey):
    # the manifest's constructor arguments as they are (name + the encoder mapping)
    cond = px.GroundingConditioner(**init(case), key=getkey())
    cond = px.load_state_dict(cond, load_weights(case))
    data = load_case(case)
    x, t = jnp.asarray(data["in_x"]), jnp.asarray(data["in_t"])
    assert rel_err(vmapped(cond.preprocess, x), data["mid_encoder_input"]) <= 1e-5
    assert rel_err(vmapped(cond.encode, x), data["mid_tokens"]) <= 1e-5
    out = vmapped(cond, x, t)
    assert rel_err(out, data["out"]) <= 1e-5
    # the mapping alone as `encoder_name` builds the same conditioner
    args = init(case)
    args["encoder_name"] = args.pop("encoder")
    same = px.load_state_dict(px.GroundingConditioner(**args, key=getkey()), load_weights(case))
    np.testing.assert_array_equal(vmapped(same, x, t), out)


@pytest.mark.default_only
def test_grounding_conditioner_resizes_down_too(getkey):
    """A target patch larger than the encoder's: the encoder input is bicubic-downsampled."""
    args = init("grounding_conditioner_same_grid")
    args["target_patch_size"] = 32
    cond = px.load_state_dict(
        px.GroundingConditioner(**args, key=getkey()), load_weights("grounding_conditioner_same_grid")
    )
    x = jax.random.uniform(getkey(), (3, 64, 96), minval=-1, maxval=1)
    enc_in = cond.preprocess(x)
    assert enc_in.shape == (3, 32, 48)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    normed = ((np.asarray(x, np.float64) + 1) / 2 - mean) / std
    ref = np.einsum("oh,chw,pw->cop", _torch_bicubic_matrix(64, 32, None), normed, _torch_bicubic_matrix(96, 48, None))
    assert rel_err(enc_in, ref) <= 1e-5
    assert eqx.filter_eval_shape(cond, x, jnp.float32(0.3)).shape == (2 * 3, 32)


# ---------------------------------------------------------------------------------------
# The frozen encoder
# ---------------------------------------------------------------------------------------


def test_dinov3_is_frozen_by_construction(getkey):
    encoder = _tiny_encoder(getkey)
    spec = px.trainable(encoder)
    assert not any(jax.tree.leaves(spec))
    params, _ = eqx.partition(encoder, spec)
    assert jax.tree.leaves(params) == []
    x = jax.random.normal(getkey(), (3, 32, 32))

    def loss(enc):
        return jnp.sum(enc(x) ** 2)

    grads = eqx.filter_grad(loss)(encoder)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # the conditioner's trainable projection has gradients; its encoder has none
    cond = px.GroundingConditioner(**init("grounding_conditioner_same_grid"), key=getkey())
    spec = px.trainable(cond)
    assert not any(jax.tree.leaves(spec.encoder))
    assert spec.dino_proj.input_proj.weight and spec.dino_proj.blocks.blocks.attn.qkv.weight


def test_dinov3_presets_and_mapping_parsing():
    assert dataclasses.astuple(encoder_config("dinov3_vits16"))[:3] == (384, 12, 6)
    assert dataclasses.astuple(encoder_config("dinov3_vitb16"))[:3] == (768, 12, 12)
    assert dataclasses.astuple(encoder_config("dinov3_vitl16"))[:3] == (1024, 24, 16)
    assert encoder_config("vit_base_patch16_dinov3_qkvb.lvd1689m") == encoder_config("dinov3_vitb16")
    tiny = encoder_config(MANIFEST2["dinov3_encoder_tiny"]["init"]["encoder"])
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.patch_size) == (32, 2, 2, 16)
    assert encoder_config(dataclasses.asdict(tiny)) == tiny  # plain fields round-trip
    with pytest.raises(ValueError, match="unknown grounding encoder"):
        encoder_config("dinov2_vitb14")
    with pytest.raises(ValueError, match="feature_dim"):
        encoder_config({"timm.create_model": "vit_small_patch16_dinov3_qkvb", "feature_dim": 768})
    with pytest.raises(ValueError, match="unsupported timm kwargs"):
        encoder_config({"timm.create_model": "vit_small_patch16_dinov3_qkvb", "kwargs": {"qkv_bias": False}})
    with pytest.raises(ValueError, match="head dim"):
        encoder_config({"embed_dim": 36, "depth": 1, "num_heads": 6})


def test_bad_inputs_raise(getkey):
    encoder = _tiny_encoder(getkey)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        encoder(jnp.zeros((3, 24, 32)))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        encoder(jnp.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="drop"):
        FeedForward(8, 32, drop=1.0, key=getkey())
    cond = px.GroundingConditioner(**init("grounding_conditioner_same_grid"), key=getkey())
    with pytest.raises(ValueError, match="smaller than `target_patch_size`"):
        cond(jnp.zeros((3, 8, 8)), 0.5)
    with pytest.raises(ValueError, match=r"\(1 or 3, H, W\)"):
        cond(jnp.zeros((4, 32, 32)), 0.5)
    with pytest.raises(ValueError, match="spec_name"):
        args = init("grounding_conditioner_same_grid")
        px.GroundingConditioner(**{**args, "encoder_name": "another_name"}, key=getkey())
    with pytest.raises(ValueError, match="names a preset"):
        px.GroundingConditioner(
            **{**init("grounding_conditioner_same_grid"), "encoder_name": "dinov3_vits16"}, key=getkey()
        )

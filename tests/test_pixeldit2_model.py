"""PixelDiT2: reference parity (models to 1e-4), loading (manifest configs, Lightning
checkpoints, a separate encoder file), released shapes, presets, config and general cases."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px

from .helpers import fast_jit, FIXTURES2, init, load_case, load_weights, rel_err, RELEASED2


ENCODER = "dino_conditioner.encoder."


@functools.cache
def _model(**overrides):
    """The fixture network (its manifest `init` as it is, plus `overrides`) with the reference weights."""
    weights = load_weights("model_pixeldit2")
    if overrides.get("in_context_len", 1) == 0:
        weights = {k: v for k, v in weights.items() if k != "in_context_posemb"}
    return px.load_reference(weights, {**init("model_pixeldit2"), **overrides}, "pixeldit2")


@eqx.filter_jit
def _forward(model, x, t, y, skip):
    """`model` over a batch, `skip` a per-example mask (a vmapped `skip_grounding`) or a bool."""
    if isinstance(skip, bool):
        return jax.vmap(lambda x, t, y: model(x, t, y, skip_grounding=skip))(x, t, y)
    return jax.vmap(lambda x, t, y, s: model(x, t, y, skip_grounding=s))(x, t, y, skip)


def _inputs(data, x="in_x"):
    return jnp.asarray(data[x]), jnp.asarray(data["in_t"]), jnp.asarray(data["in_y"])


# ---------------------------------------------------------------------------------------
# Reference parity
# ---------------------------------------------------------------------------------------


@eqx.filter_jit
def _parity_outputs(model, x, t, y, mask):
    """Every output and intermediate the fixture records, as one program."""
    per_example = jax.vmap(
        lambda x, t, y, s: (model(x, t, y, skip_grounding=s), model.condition(x, t, y, skip_grounding=s))
    )
    grounded = jax.vmap(lambda x, t, y: (model(x, t, y), model.condition(x, t, y)))
    skipped = jax.vmap(
        lambda x, t, y: (model(x, t, y, skip_grounding=True), model.condition(x, t, y, skip_grounding=True))
    )
    return {
        "out": grounded(x, t, y)[0],
        "mid_c": grounded(x, t, y)[1],
        "out_skip_grounding": skipped(x, t, y)[0],
        "mid_c_skip_grounding": skipped(x, t, y)[1],
        "out_skip_grounding_mask": per_example(x, t, y, mask)[0],
        "mid_c_skip_grounding_mask": per_example(x, t, y, mask)[1],
        "mid_t_emb": jax.vmap(model.t_embedder)(t),
        "mid_grounding": jax.vmap(model.dino_conditioner)(x, t),
        # the patch tokens entering the final layer = the features after the last block
        "mid_s_final": jax.vmap(lambda x, t, y: model.features(x, t, y, depth=model.depth))(x, t, y),
    }


def test_model_parity_and_intermediates():
    data = load_case("model_pixeldit2")
    x, t, y = _inputs(data)
    mask = jnp.asarray(data["in_skip_grounding_mask"])
    assert mask.tolist() == [True, False]
    outputs = _parity_outputs(_model(), x, t, y, mask)
    for name, value in outputs.items():
        assert rel_err(value, data[name]) <= 1e-4, name
    # vmap over `skip_grounding` = the per-example calls with a Python bool
    masked, on, off = outputs["out_skip_grounding_mask"], outputs["out_skip_grounding"], outputs["out"]
    np.testing.assert_allclose(masked[0], on[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(masked[1], off[1], rtol=0, atol=1e-5)
    assert rel_err(on[1], off[1]) > 1e-3  # and the grounding does matter


def test_checkpoint_settings_give_the_same_gradients():
    """`checkpoint="lean"` (the SwiGLU hidden layers and per-token modulation recomputed
    too) and `True` (whole blocks rematerialised) against the default: the same
    gradients of the fixture network."""
    x, t, y = _inputs(load_case("model_pixeldit2"))
    weights = load_weights("model_pixeldit2")

    def grads(model):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(params):
            return jnp.mean(jax.vmap(eqx.combine(params, static))(x, t, y) ** 2)

        return fast_jit(jax.grad(loss))(params)

    default, *others = (
        grads(px.load_reference(weights, init("model_pixeldit2"), "pixeldit2", checkpoint=ckpt))
        for ckpt in (False, "lean", True)
    )
    for other in others:
        for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(other), strict=True):
            assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(a).max()), 1e-30)


@eqx.filter_jit
def _variant_outputs(model, x, t, y, mask):
    one = jax.vmap(lambda x, t, y, s: model(x, t, y, skip_grounding=s))
    return {
        "out": jax.vmap(model)(x, t, y),
        "skip": jax.vmap(lambda x, t, y: model(x, t, y, skip_grounding=True))(x, t, y),
        "mask": one(x, t, y, mask),
        "c": jax.vmap(model.condition)(x, t, y),
        "grounding": jax.vmap(model.dino_conditioner)(x, t),
    }


def test_model_variants_parity():
    data = load_case("model_pixeldit2_variants")
    x, t, y = _inputs(data)
    no_context = eqx.filter_jit(lambda m, x, t, y: jax.vmap(m)(x, t, y))
    assert rel_err(no_context(_model(in_context_len=0), x, t, y), data["out_no_context"]) <= 1e-4
    mask = jnp.asarray(data["in_skip_grounding_mask_nonsquare"])
    single = _variant_outputs(_model(single_silu_cond=True), x, t, y, mask)
    assert rel_err(single["out"], data["out_single_silu"]) <= 1e-4
    assert rel_err(single["skip"], data["out_single_silu_skip_grounding"]) <= 1e-4
    assert rel_err(single["c"], data["mid_c_single_silu"]) <= 1e-4
    nonsquare = _variant_outputs(_model(), jnp.asarray(data["in_x_nonsquare"]), t, y, mask)
    assert rel_err(nonsquare["out"], data["out_nonsquare"]) <= 1e-4
    assert rel_err(nonsquare["grounding"], data["mid_grounding_nonsquare"]) <= 1e-4
    assert rel_err(nonsquare["mask"], data["out_nonsquare_skip_grounding_mask"]) <= 1e-4


# ---------------------------------------------------------------------------------------
# The general cases: a block-by-block statement of the reference's forward
# ---------------------------------------------------------------------------------------


def _reference_forward(model, x, t, y, feature_depth):
    """`PixelDiT2.forward` for one example, written out with the model's own parts and a
    Python loop over the blocks (context inserted before block `in_context_start`); also
    the trainer's REPA features after block `feature_depth` (context stripped)."""
    cfg = model.config
    p = cfg.patch_size
    hs, ws = x.shape[1] // p, x.shape[2] // p
    t_emb, y_emb = model.t_embedder(t), model.y_embedder(y)
    c = model.dino_conditioner(x, t) + t_emb[None, :] + y_emb[None, :]
    c = c if cfg.single_silu_cond else jax.nn.silu(c)
    s = model.s_embedder(px.patchify(x, p))
    angles = px.rope_2d(cfg.hidden_size // cfg.num_heads, hs, ws)
    n = cfg.in_context_len
    c_ext = jnp.concatenate([jnp.repeat(c.mean(0, keepdims=True), n, axis=0), c])
    angles_ext = jnp.concatenate([jnp.zeros((n, angles.shape[1])), angles])
    inserted = False
    for i in range(cfg.depth):
        if n and i == cfg.in_context_start:
            s = jnp.concatenate([y_emb[None, :] + model.in_context_posemb, s])
            inserted = True
        block = model.patch_blocks.layer(i)
        s = block(s, c_ext, angles_ext) if inserted else block(s, c, angles)
        if i + 1 == feature_depth:
            features = s[n:] if inserted else s
    s = s[n:] if inserted else s
    out = model.final_layer(s, c).reshape(hs * ws, p * p, cfg.in_channels)
    return px.unpatchify(out, p, x.shape[1], x.shape[2]), features


@fast_jit
def _randomised_model(config, key):
    """A small PixelDiT2 with every parameter random (the zero-initialised ones too, so
    that every path shows in the output), built as one program."""
    k_model, k_noise = jax.random.split(key)
    model = px.PixelDiT2(**config, key=k_model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(k_noise, len(leaves))
    leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@fast_jit
def _general_outputs(model, x, t, y):
    """The model's output and its features after the first block with context tokens, and
    the block-by-block statement of both, as one program."""
    depth = model.in_context_start + 1
    out, with_feats = jax.vmap(lambda x, t, y: model.with_features(x, t, y, depth=depth))(x, t, y)
    ref, ref_feats = jax.vmap(lambda x, t, y: _reference_forward(model, x, t, y, depth))(x, t, y)
    return out, ref, with_feats, ref_feats


@pytest.mark.parametrize(
    "config",
    [
        # in-context tokens from block 0, patch 4, SwiGLU hidden rounded to 16, single SiLU
        dict(patch_size=4, in_context_len=3, in_context_start=0, mlp_hidden_multiple=16, single_silu_cond=True),
        # the last block only, 1-channel images (broadcast to the encoder's three channels)
        dict(in_channels=1, patch_size=8, in_context_len=2, in_context_start=2, grounding_proj_heads=2),
    ],
)
def test_general_configs_match_the_block_by_block_forward(config, getkey):
    encoder = dict(embed_dim=16, depth=1, num_heads=2)
    base = dict(hidden_size=32, num_heads=4, depth=3, num_classes=5, grounding_encoder=encoder)
    model = _randomised_model({**base, **config}, getkey())
    c = model.in_channels
    x = jax.random.normal(getkey(), (2, c, 16, 24))
    t, y = jnp.asarray([0.2, 0.7]), jnp.asarray([1, 5])
    out, ref, feats, ref_feats = _general_outputs(model, x, t, y)
    assert out.shape == (2, c, 16, 24)
    assert rel_err(out, ref) <= 1e-5
    # the REPA features after the first block with context tokens (stripped of them)
    assert feats.shape == (2, 16 * 24 // model.patch_size**2, 32)
    assert rel_err(feats, ref_feats) <= 1e-5


def test_dropout_only_with_a_key(getkey):
    model = _model(proj_dropout=0.5)  # depth 4: blocks 1 and 2 drop
    data = load_case("model_pixeldit2")
    x, t, y = (a[0] for a in _inputs(data))
    run = eqx.filter_jit(lambda m, k: m(x, t, y, key=k))
    assert rel_err(run(model, None), data["out"][0]) <= 1e-4  # no key: the reference's eval mode
    key = getkey()
    train_out = run(model, key)
    assert rel_err(train_out, data["out"][0]) > 1e-3
    np.testing.assert_array_equal(train_out, run(model, key))


def test_encoder_is_frozen_inside_the_model():
    model = _model()
    spec = px.trainable(model)
    assert not any(jax.tree.leaves(spec.dino_conditioner.encoder))
    assert spec.dino_conditioner.dino_proj.output_proj.weight and spec.s_embedder.proj.weight
    x, t, y = (a[0] for a in _inputs(load_case("model_pixeldit2")))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(x, t, y) ** 2)))(model)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads.dino_conditioner.encoder))
    assert float(jnp.abs(grads.dino_conditioner.dino_proj.output_proj.weight).max()) > 0


# ---------------------------------------------------------------------------------------
# Loading, export, released shapes, presets
# ---------------------------------------------------------------------------------------


def _same_arrays(a, b) -> bool:
    sa, sb = px.state_dict(a), px.state_dict(b)
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_load_reference_from_files_and_lightning_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    model = _model()
    config = init("model_pixeldit2")  # as the manifest records it, encoder mapping included
    from_file = px.load_reference(FIXTURES2 / "model_pixeldit2.safetensors", config, "pixeldit2")
    assert _same_arrays(from_file, model)
    # a Lightning checkpoint without the encoder: EMA weights by default, the encoder from its own file
    weights = load_weights("model_pixeldit2")
    net = {k: v for k, v in weights.items() if not k.startswith(ENCODER)}
    timm = {k[len(ENCODER) :]: v for k, v in weights.items() if k.startswith(ENCODER)}
    timm["rope.periods"] = np.ones(4, np.float32)  # timm's non-persistent buffers, if a file has them
    timm["blocks.0.attn.k_bias"] = np.zeros(32, np.float32)
    save_file(timm, tmp_path / "dinov3.safetensors")
    ckpt = {"state_dict": {**{f"ema_denoiser.{k}": v for k, v in net.items()}}}
    ckpt["state_dict"].update({f"denoiser.{k}": v + 1 for k, v in net.items()})
    loaded = px.load_reference(ckpt, config, "pixeldit2", encoder_weights=tmp_path / "dinov3.safetensors")
    assert _same_arrays(loaded, model)
    raw = px.load_reference(ckpt, config, "pixeldit2", prefix="denoiser.", encoder_weights=timm)
    np.testing.assert_array_equal(raw.s_embedder.proj.bias, model.s_embedder.proj.bias + 1)
    # without the encoder: every missing encoder key is listed, and no misleading variant hint
    with pytest.raises(px.StateDictError, match="missing key 'dino_conditioner.encoder.") as err:
        px.load_reference(ckpt, config, "pixeldit2")
    assert "hint" not in str(err.value)
    assert "missing key 'dino_conditioner.encoder.cls_token' (expected shape (1, 1, 32))" in err.value.problems
    bad = dict(timm, **{"blocks.0.attn.k_bias": np.ones(32, np.float32)})
    with pytest.raises(px.StateDictError, match="k_bias"):
        px.load_reference(ckpt, config, "pixeldit2", encoder_weights=bad)
    with pytest.raises(ValueError, match="encoder_weights"):
        px.load_reference({}, "pixeldit-xl-c2i-256", encoder_weights=timm)


def test_state_dict_round_trip(getkey):
    model = _model()
    exported = px.state_dict(model)
    assert exported.keys() == load_weights("model_pixeldit2").keys()
    assert exported["in_context_posemb"].shape == (1, 4, 48)
    fresh = px.PixelDiT2(**init("model_pixeldit2"), key=getkey())
    assert not _same_arrays(fresh, model)
    assert _same_arrays(px.load_state_dict(fresh, exported), model)


@pytest.mark.parametrize(
    "name", ["pixeldit2_h16_in256", "pixeldit2_h16_in512", "pixeldit2_b16_preset", "pixeldit2_h32_preset"]
)
def test_released_configs_build_with_the_released_keys_and_shapes(name):
    released = RELEASED2[name]
    skeleton = eqx.filter_eval_shape(lambda: px.build(released["init"], "pixeldit2"))
    shapes = {k: list(v.shape) for k, v in px.state_dict(skeleton).items()}
    assert shapes == {**released["state_dict_shapes_without_encoder"], **released["state_dict_shapes_encoder"]}
    count = sum(int(np.prod(v)) for v in shapes.values())
    encoder = sum(int(np.prod(v)) for k, v in shapes.items() if k.startswith(ENCODER))
    assert (count, encoder) == (released["num_params"], released["num_params_encoder"])
    if name == "pixeldit2_h16_in256":
        assert (count, encoder) == (1_007_789_728, 21_596_160)
        # the loader takes exactly those keys (zeros: nothing allocated but broadcasts)
        zeros = {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}
        loaded = eqx.filter_eval_shape(lambda: px.load_reference(zeros, released["init"], "pixeldit2"))
        assert jax.tree.structure(loaded) == jax.tree.structure(skeleton)


def test_presets_carry_the_released_configs_and_sampling():
    for preset, name in (("pixeldit2-h16-256", "pixeldit2_h16_in256"), ("pixeldit2-h16-512", "pixeldit2_h16_in512")):
        skeleton = eqx.filter_eval_shape(lambda: px.build(preset))
        released = {k: v for k, v in RELEASED2[name]["init"].items() if k != "pretrained_encoder"}
        assert skeleton.config.to_dict() == released
        assert px.PRESETS[preset]["variant"] == "pixeldit2"
    assert px.PRESETS["pixeldit2-h16-256"]["sampling"] == dict(
        num_steps=50, method="heun", guidance=2.4, guidance_interval=(0.125, 0.9), noise_scale=1.0, t_eps=0.05
    )
    assert px.PRESETS["pixeldit2-h16-512"]["sampling"] == dict(
        num_steps=50, method="heun", guidance=2.1, guidance_interval=(0.1, 0.925), noise_scale=2.0, t_eps=0.05
    )


# ---------------------------------------------------------------------------------------
# Config and validation
# ---------------------------------------------------------------------------------------


def test_config_is_static_validated_and_rebuilds():
    model = _model()
    config = model.config
    assert isinstance(config, px.PixelDiT2Config) and hash(config) == hash(dataclasses.replace(config))
    assert (model.num_classes, model.patch_size, model.in_context_len, model.in_context_start) == (10, 8, 4, 2)
    assert isinstance(config.grounding_encoder, px.DINOv3Config) and config.encoder.embed_dim == 32
    rebuilt = eqx.filter_eval_shape(lambda: px.build(config.to_dict(), "pixeldit2"))
    assert rebuilt.config == config
    bad = [
        (dict(in_context_start=4), "in_context_start"),  # depth 4: must lie in [0, 3]
        (dict(in_context_start=-1, in_context_len=0), "in_context_start"),  # checked even without context
        (dict(num_heads=5), "num_heads"),
        (dict(grounding_proj_heads=8), "grounding_proj_heads"),  # head dim 6: not divisible by 4
        (dict(in_channels=4), "in_channels"),
        (dict(proj_dropout=1.0), "proj_dropout"),
        (dict(grounding_encoder="dinov2_vitb14", encoder=None), "unknown grounding encoder"),
        (dict(grounding_encoder="dinov3_vitb16"), "names a preset"),  # contradicts the `encoder` mapping
    ]
    for overrides, match in bad:
        with pytest.raises(ValueError, match=match):
            px.PixelDiT2(**{**init("model_pixeldit2"), **overrides}, key=jax.random.key(0))


def test_bad_inputs_raise():
    model = _model()
    x = jnp.zeros((3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((1, 32, 32)), 0.5, 1)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(jnp.zeros((3, 32, 36)), 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        model.features(x, 0.5, 1, depth=5)

"""PixelDiT2 training (`pixeldit_eqx.train.pixeldit2_*`): dropout modes, the flow-matching
loss at given draws, REPA with the DINOv2 teacher, all against the reference trainer."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import pixeldit_eqx as px
from pixeldit_eqx import train

from .helpers import fast_jit, FIXTURES2, MANIFEST2, rel_err


TEACHER_PREFIX = "repa_encoder.encoder."


@pytest.fixture(scope="module")
def net(pixeldit2_reference):
    return pixeldit2_reference


def _teacher() -> px.DINOv2:
    sizes = MANIFEST2["trainer_grounded_repa"]["init"]["repa_encoder"]["timm.create_model"]
    teacher = eqx.filter_eval_shape(
        px.DINOv2,
        "dinov2_vitb14",
        embed_dim=sizes["embed_dim"],
        depth=sizes["depth"],
        num_heads=sizes["num_heads"],
        img_size=sizes["img_size"],
        key=jax.random.key(1),
    )
    weights = load_file(FIXTURES2 / "trainer_grounded_repa.safetensors")
    return px.load_state_dict(
        teacher, {k[len(TEACHER_PREFIX) :]: v for k, v in weights.items() if k.startswith(TEACHER_PREFIX)}
    )


@pytest.fixture(scope="module")
def repa(net):
    init = MANIFEST2["trainer_grounded_repa"]["init"]
    model = train.PixelDiT2REPA(
        net,
        _teacher(),
        align_layer=init["repa_align_layer"],
        weight=init["repa_weight"],
        proj_hidden_dim=init["proj_hidden_dim"],
        key=jax.random.key(2),
    )
    weights = load_file(FIXTURES2 / "trainer_grounded_repa.safetensors")
    proj = px.load_state_dict(model.proj, {k[5:]: v for k, v in weights.items() if k.startswith("proj.")})
    return eqx.tree_at(lambda m: m.proj, model, proj)


def _draws(case: str):
    """The reference trainer's draws turned into this package's explicit arguments."""
    ref = np.load(FIXTURES2 / f"{case}.npz")
    init = MANIFEST2[case]["init"]
    u_joint = ref["draw_joint_uniform"] if "draw_joint_uniform" in ref.files else None
    class_drop, grounding_drop = train.pixeldit2_dropout(
        jnp.asarray(ref["draw_class_uniform"]),
        jnp.asarray(ref["draw_grounding_uniform"]),
        None if u_joint is None else jnp.asarray(u_joint),
        null_condition_p=init["null_condition_p"],
        grounding_drop_mode=init["grounding_drop_mode"],
        grounding_drop_p=init["grounding_drop_p"],
        grounding_joint_drop_p=init["grounding_joint_drop_p"],
    )
    t = jax.nn.sigmoid(jnp.asarray(ref["draw_t_normal"]) * init["p_std"] + init["p_mean"])
    noise = jnp.asarray(ref["draw_noise_normal"]) * init["noise_scale"]
    return ref, init, class_drop, grounding_drop, t, noise


# ----------------------------------------------------------------- dropout


@pytest.mark.parametrize("case", ["trainer_grounded_fm", "trainer_grounded_repa"])
def test_dropout_masks_match_the_reference(case):
    ref, _, class_drop, grounding_drop, t, _ = _draws(case)
    assert np.array_equal(np.asarray(class_drop), ref["mid_class_drop"])
    assert np.array_equal(np.asarray(grounding_drop), ref["mid_grounding_drop"])
    assert rel_err(t, ref["mid_t"]) < 1e-6


def test_dropout_modes():
    u_class = jnp.asarray([0.05, 0.5, 0.9, 0.2], dtype=jnp.float32)
    u_ground = jnp.asarray([0.9, 0.1, 0.9, 0.9], dtype=jnp.float32)
    u_joint = jnp.asarray([0.9, 0.9, 0.01, 0.9], dtype=jnp.float32)
    c, g = train.pixeldit2_dropout(u_class, u_ground, u_joint, null_condition_p=0.3, grounding_drop_mode="coupled")
    assert np.asarray(c).tolist() == [True, False, False, True] and np.array_equal(c, g)
    # Coupled mode ignores the joint probability, as the reference does.
    c, g = train.pixeldit2_dropout(
        u_class, u_ground, u_joint, null_condition_p=0.3, grounding_drop_mode="coupled", grounding_joint_drop_p=0.5
    )
    assert np.asarray(c).tolist() == [True, False, False, True] and np.array_equal(c, g)
    c, g = train.pixeldit2_dropout(u_class, u_ground, u_joint, null_condition_p=0.3)  # grounding p defaults to 0.3
    assert np.asarray(c).tolist() == [True, False, False, True]
    assert np.asarray(g).tolist() == [False, True, False, False]
    c, g = train.pixeldit2_dropout(
        u_class, u_ground, u_joint, null_condition_p=0.3, grounding_drop_p=0.05, grounding_joint_drop_p=0.02
    )
    assert np.asarray(c).tolist() == [True, False, True, True]
    assert np.asarray(g).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="grounding_drop_mode"):
        train.pixeldit2_dropout(u_class, u_ground, u_joint, grounding_drop_mode="joint")


# ----------------------------------------------------------------- losses at the reference's draws


def test_example_loss_matches_the_reference_trainer(net):
    ref, init, class_drop, grounding_drop, t, noise = _draws("trainer_grounded_fm")

    @jax.jit
    def losses(x, y, t, noise, drop_label, drop_grounding):
        def one(x, y, t, noise, drop_label, drop_grounding):
            return train.pixeldit2_example_loss(
                net, x, y, t=t, noise=noise, drop_label=drop_label, drop_grounding=drop_grounding, t_eps=init["t_eps"]
            )

        return jax.vmap(one)(x, y, t, noise, drop_label, drop_grounding)

    per_example = losses(jnp.asarray(ref["in_x"]), jnp.asarray(ref["in_y"]), t, noise, class_drop, grounding_drop)
    assert ref["mid_clamped"].any()  # one sample sits in the t_eps clamp
    assert per_example.shape == (3,)
    assert rel_err(jnp.mean(per_example), ref["out_fm_loss"]) < 1e-4
    assert rel_err(jnp.mean(per_example), ref["out_loss"]) < 1e-4


def test_repa_matches_the_reference_trainer(repa):
    ref, init, class_drop, grounding_drop, t, noise = _draws("trainer_grounded_repa")
    x = jnp.asarray(ref["in_x"])
    y = jnp.where(class_drop, 10, jnp.asarray(ref["in_y"]))
    assert np.array_equal(np.asarray(y), ref["mid_y"])
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    assert rel_err(x_t, ref["mid_x_t"]) < 1e-6

    # One program: the block features (context tokens stripped), their projection, the
    # teacher's view and features (its own test checks it on the reference input), and the
    # per-example losses, averaged as the reference averages the batch.
    @jax.jit
    def run(x, y_in, x_t, t, noise, class_drop, grounding_drop):
        def features(x_t, t, y, skip):
            return repa.model.with_features(x_t, t, y, depth=repa.align_layer, skip_grounding=skip)

        def one(x, y, t, noise, drop_label, drop_grounding):
            return train.pixeldit2_example_losses(
                repa, x, y, t=t, noise=noise, drop_label=drop_label, drop_grounding=drop_grounding, t_eps=init["t_eps"]
            )

        x_pred, tokens = jax.vmap(features)(x_t, t, jnp.where(class_drop, 10, y_in), grounding_drop)
        return dict(
            x_pred=x_pred,
            tokens=tokens,
            src=jax.vmap(jax.vmap(repa.proj))(tokens),
            teacher_input=jax.vmap(repa.teacher_input)(x),
            dst=jax.vmap(repa.teacher_features)(x),
            losses=jax.vmap(one)(x, y_in, t, noise, class_drop, grounding_drop),
        )

    out = run(x, jnp.asarray(ref["in_y"]), x_t, t, noise, class_drop, grounding_drop)
    context = repa.model.in_context_len
    assert rel_err(out["x_pred"], ref["out_x_pred"]) < 1e-4
    assert rel_err(out["tokens"], ref["mid_src_feature"][:, context:]) < 1e-4
    assert rel_err(out["src"], ref["mid_src"]) < 1e-4
    assert rel_err(out["teacher_input"], ref["mid_teacher_input"]) < 1e-5
    assert out["dst"].dtype == jnp.bfloat16
    assert rel_err(out["dst"].astype(jnp.float32), ref["out_teacher_features"]) < 1e-2  # one bf16 ulp at most
    losses = out["losses"]
    assert rel_err(jnp.mean(losses["fm_loss"]), ref["out_fm_loss"]) < 1e-4
    assert rel_err(jnp.mean(losses["cos_loss"]), ref["out_cos_loss"]) < 1e-4
    assert rel_err(jnp.mean(losses["loss"]), ref["out_loss"]) < 1e-4


def test_dinov2_teacher_matches_timm():
    """Resampled position embedding (3x3 -> 4x4, scale factor (4 + 0.1) / 3) and features."""
    ref = np.load(FIXTURES2 / "trainer_grounded_repa.npz")
    teacher = _teacher()
    pos = teacher.position_embedding((4, 4)).at[0].add(teacher.cls_token[0, 0])
    assert rel_err(pos, ref["mid_teacher_pos_zeros"][0]) < 1e-5
    tokens = jax.vmap(teacher)(jnp.asarray(ref["mid_teacher_input"]))
    assert rel_err(tokens, ref["mid_teacher_features_fp32"]) < 1e-5
    # At the training grid the table is used as it is.
    assert np.array_equal(np.asarray(teacher.position_embedding((3, 3))), np.asarray(teacher.pos_embed[0]))
    # Deviation: non-square grids resample each axis with its own factor (the reference
    # swaps the two factors and fails).
    wide = teacher.position_embedding((4, 5))
    assert wide.shape == (1 + 20, 24)
    tokens = jax.vmap(teacher)(jnp.zeros((1, 3, 56, 70)))
    assert tokens.shape == (1, 20, 24) and bool(jnp.all(jnp.isfinite(tokens)))


def test_cosine_loss_rounds_the_teacher_side_as_torch_does():
    ref = np.load(FIXTURES2 / "trainer_grounded_repa.npz")
    src = jnp.asarray(ref["mid_src"])
    dst = jnp.asarray(ref["out_teacher_features"]).astype(jnp.bfloat16)
    bf16 = jnp.mean(jax.vmap(train.cosine_loss)(src, dst))
    fp32 = jnp.mean(jax.vmap(train.cosine_loss)(src, dst.astype(jnp.float32)))
    assert abs(float(bf16) - float(ref["out_cos_loss"])) < 2e-6
    assert abs(float(fp32) - float(ref["mid_cos_loss_dst_fp32"])) < 2e-6
    assert abs(float(bf16) - float(fp32)) > 1e-5  # the rounding is visible, and reproduced


# ----------------------------------------------------------------- the trained pytree


def test_teacher_is_frozen_and_proj_trains(repa):
    spec = px.trainable(repa)
    assert not any(jax.tree.leaves(spec.teacher))
    assert all(jax.tree.leaves(spec.proj))
    assert not any(jax.tree.leaves(spec.model.dino_conditioner.encoder))
    assert any(jax.tree.leaves(spec.model.patch_blocks))
    # The reference's keys for the head (`proj.0.*`, `proj.2.*`, `proj.4.*`).
    assert set(px.state_dict(repa.proj)) == {f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}


def test_batch_loss_trains_with_make_train_step(getkey):
    """One REPA step: the head and the network move, the teacher and the encoder do not."""
    options = dict(grounding_drop_mode="coupled", null_condition_p=0.5, p_mean=1.0, p_std=1.5, noise_scale=2.0)
    init = dict(MANIFEST2["model_pixeldit2"]["init"], depth=2, in_context_start=1)
    model = px.PixelDiT2(**init, key=getkey())
    model = train.PixelDiT2REPA(model, _teacher(), align_layer=2, weight=0.5, key=getkey())
    optimizer = train.default_optimizer(1e-3)
    state = train.init_train_state(model, optimizer, key=getkey())
    step = fast_jit(train.make_train_step(functools.partial(train.pixeldit2_loss, **options), optimizer))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    y = jnp.asarray([1, 7], dtype=jnp.int32)
    new, metrics = step(state, (x, y))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert not np.array_equal(np.asarray(new.model.proj.linear0.weight), np.asarray(model.proj.linear0.weight))
    moved = new.model.model.final_layer.linear.weight  # zero-initialised, first to move
    assert not np.array_equal(np.asarray(moved), np.asarray(model.model.final_layer.linear.weight))
    assert np.array_equal(np.asarray(new.model.teacher.pos_embed), np.asarray(model.teacher.pos_embed))
    encoder = lambda m: jax.tree.leaves(eqx.filter(m.model.dino_conditioner.encoder, eqx.is_array))  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(encoder(new.model), encoder(model)))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(null_condition_p=1.5), "null_condition_p"), (dict(grounding_drop_mode="joint"), "grounding_drop_mode")],
)
def test_batch_loss_validates(net, kwargs, message):
    x = jnp.zeros((2, 3, 16, 16))
    with pytest.raises(ValueError, match=message):
        train.pixeldit2_loss(net, (x, jnp.zeros((2,), jnp.int32)), jax.random.key(0), **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [(("dinov2_vitg14",), {}, "model_name"), ((), dict(embed_dim=30, num_heads=4, depth=1), "embed_dim")],
)
def test_dinov2_validates(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        px.DINOv2(*args, **kwargs, key=jax.random.key(0))

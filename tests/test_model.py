"""The whole PixelDiT: rope, attention, tokens, blocks and both models against the
reference fixtures; checkpoints, exports, scanned stacks and call-time behaviour."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .helpers import FIXTURES, load_case, load_weights, MANIFEST, rel_err


def _complex(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _model(case):
    import pixeldit_eqx as px

    variant = "c2i" if case == "model_c2i" else "t2i"
    return px.load_reference(FIXTURES / f"{case}.safetensors", MANIFEST[case]["init"], variant)


# --- Rope and attention ---------------------------------------------------------------


def test_rope_tables():
    import pixeldit_eqx as px

    assert rel_err(_complex(px.rope_2d(16, 3, 5)), load_case("rope_2d")["out_freqs_cis"]) <= 1e-5
    assert rel_err(_complex(px.rope_1d(16, 7)), load_case("rope_1d_text")["out_freqs_cis"]) <= 1e-5


def test_rope_2d_of_a_single_row_and_column():
    import pixeldit_eqx as px

    angles = np.asarray(px.rope_2d(8, 1, 1))
    assert angles.shape == (1, 4) and np.all(angles == 0)
    angles = np.asarray(px.rope_2d(8, 1, 3))  # y positions all 0 (grid of one)
    assert np.all(angles[:, 1::2] == 0) and angles[-1, 0] == 16.0


def test_apply_rope():
    import pixeldit_eqx as px

    data = load_case("apply_rotary_emb")
    angles = np.arctan2(data["in_freqs_cis"][..., 1], data["in_freqs_cis"][..., 0])
    rotate = jax.vmap(px.apply_rope, in_axes=(0, None))
    assert rel_err(rotate(jnp.asarray(data["in_q"]), jnp.asarray(angles)), data["out_q"]) <= 1e-5
    assert rel_err(rotate(jnp.asarray(data["in_k"]), jnp.asarray(angles)), data["out_k"]) <= 1e-5


def test_rope_preserves_norm_and_keeps_dtype(getkey):
    import pixeldit_eqx as px

    q = jax.random.normal(getkey(), (15, 2, 16)).astype(jnp.bfloat16)
    out = px.apply_rope(q, px.rope_2d(16, 3, 5))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        jnp.linalg.norm(out.astype(jnp.float32), axis=-1),
        jnp.linalg.norm(q.astype(jnp.float32), axis=-1),
        rtol=2e-2,
    )


def test_rotary_attention(getkey):
    import pixeldit_eqx as px

    attn = px.load_state_dict(px.RotaryAttention(32, 4, key=getkey()), load_weights("rotary_attention"))
    data = load_case("rotary_attention")
    angles = np.arctan2(data["in_pos"][..., 1], data["in_pos"][..., 0])
    out = jax.vmap(attn, in_axes=(0, None))(jnp.asarray(data["in_0"]), jnp.asarray(angles))
    assert rel_err(out, data["out"]) <= 1e-5


# --- Tokens ---------------------------------------------------------------------------


def test_patch_embedder(getkey):
    import pixeldit_eqx as px

    embed = px.load_state_dict(px.PatchEmbedder(48, 32, key=getkey()), load_weights("patch_token_embedder"))
    data = load_case("patch_token_embedder")
    assert rel_err(jax.vmap(embed)(jnp.asarray(data["in_0"])), data["out"]) <= 1e-5


def test_pixel_embedder(getkey):
    import pixeldit_eqx as px

    embed = px.load_state_dict(px.PixelEmbedder(3, 8, key=getkey()), load_weights("pixel_token_embedder"))
    data = load_case("pixel_token_embedder")
    out = jax.vmap(lambda x: embed(x, 2))(jnp.asarray(data["in_x"]))  # (B, L, p2, D_pix)
    assert rel_err(out.reshape(-1, 4, 8), data["out"]) <= 1e-5


def test_patchify_matches_unfold_order():
    import pixeldit_eqx as px

    x = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 6)
    patches = px.patchify(x, 2)
    assert patches.shape == (6, 8)
    # patch (row 0, col 1): channel-major (C, p_row, p_col)
    np.testing.assert_array_equal(patches[1], np.asarray(x[:, 0:2, 2:4]).reshape(-1))
    pixels = patches.reshape(6, 2, 4).transpose(0, 2, 1)  # (L, p2, C)
    np.testing.assert_array_equal(px.unpatchify(pixels, 2, 4, 6), x)


# --- Blocks ---------------------------------------------------------------------------


def test_dit_block(getkey):
    import pixeldit_eqx as px

    block = px.load_state_dict(px.DiTBlock(32, 4, key=getkey()), load_weights("dit_block"))
    data = load_case("dit_block")
    out = jax.vmap(block, in_axes=(0, 0, None))(
        jnp.asarray(data["in_x"]), jnp.asarray(data["in_c"][:, 0]), px.rope_2d(8, 3, 5)
    )
    assert rel_err(out, data["out"]) <= 1e-5


def test_mmdit_block(getkey):
    import pixeldit_eqx as px

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
    import pixeldit_eqx as px

    post = MANIFEST[case]["init"]["adaln_post_modulation"]
    block = px.PiTBlock(8, 32, 2, 32, 4, post_modulation=post, key=getkey())
    block = px.load_state_dict(block, load_weights(case))
    data = load_case(case)
    x = jnp.asarray(data["in_x"]).reshape(2, 15, 4, 8)
    s = jnp.asarray(data["in_s_cond"]).reshape(2, 15, 32)
    out = jax.vmap(block, in_axes=(0, 0, None))(x, s, px.rope_2d(8, 3, 5))
    assert rel_err(out.reshape(30, 4, 8), data["out"]) <= 1e-5


# --- Models ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["model_c2i", "model_t2i"])
def test_model_parity_and_patch_level(case):
    model = _model(case)
    data = load_case(case)
    args = (
        jnp.asarray(data["in_x"]),
        jnp.asarray(data["in_t"]),
        jnp.asarray(data["in_y"]),
    )
    out = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))(model, *args)
    assert out.shape == data["out"].shape
    assert rel_err(out, data["out"]) <= 1e-4
    mid = jax.vmap(model.patch_level)(*args)
    assert rel_err(mid.reshape(-1, mid.shape[-1]), data["mid_s_cond"]) <= 1e-4


@pytest.mark.parametrize("case", ["model_c2i", "model_t2i"])
def test_state_dict_round_trip_of_models_is_exact(case):
    import pixeldit_eqx as px

    sd = load_weights(case)
    out = px.state_dict(px.load_reference(sd, MANIFEST[case]["init"], "c2i" if case == "model_c2i" else "t2i"))
    assert sorted(out) == sorted(sd)
    for key, value in sd.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        np.testing.assert_array_equal(out[key], value)


def test_safetensors_writer_round_trip(tmp_path):
    import pixeldit_eqx as px

    model = _model("model_c2i")
    px.save_safetensors(tmp_path / "m.safetensors", model)
    again = px.load_reference(tmp_path / "m.safetensors", MANIFEST["model_c2i"]["init"])
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_files_load_without_torch():
    import ml_dtypes

    import pixeldit_eqx as px

    init = MANIFEST["model_c2i"]["init"]
    sd = load_weights("model_c2i")

    lightning = px.state_dict(px.load_reference(FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt", init))
    for key, value in sd.items():
        np.testing.assert_array_equal(lightning[key], value)  # ema_denoiser.* by default

    raw = px.state_dict(
        px.load_reference(
            FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt",
            init,
            prefix="denoiser.",
        )
    )
    for key, value in sd.items():
        np.testing.assert_array_equal(raw[key], value + 1.0)

    views = px.state_dict(px.load_reference(FIXTURES / "checkpoints" / "model_c2i_views.pt", init))
    for key, value in sd.items():
        np.testing.assert_array_equal(views[key], value)

    bf16 = px.load_reference(FIXTURES / "checkpoints" / "model_c2i_bf16.pt", init, dtype=jnp.bfloat16)
    exported = px.state_dict(bf16)
    for key, value in sd.items():
        assert exported[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[key], value.astype(ml_dtypes.bfloat16))


def test_weights_under_any_prefix_are_found():
    """No `prefix` given: the prefix under which most of the model's keys sit is taken,
    whatever it is, and keys outside it (a training-only head) are ignored."""
    import pixeldit_eqx as px

    init = MANIFEST["model_t2i"]["init"]
    sd = load_weights("model_t2i")
    extra = {"_repa_projector.0.weight": np.zeros((8, 4), np.float32)}
    for prefix in ("core.", "net.module.", ""):
        ckpt = {prefix + k: v for k, v in sd.items()} | (extra if prefix else {})  # no prefix: all keys count
        loaded = px.state_dict(px.load_reference(ckpt, init, "t2i"))
        assert loaded.keys() == sd.keys()
        for key, value in sd.items():
            np.testing.assert_array_equal(loaded[key], value)
    # The most complete copy wins over a partial one.
    partial = {"a." + k: v for k, v in list(sd.items())[:5]}
    loaded = px.state_dict(px.load_reference({**partial, **{"b." + k: v + 1 for k, v in sd.items()}}, init, "t2i"))
    for key, value in sd.items():
        np.testing.assert_array_equal(loaded[key], value + 1)


@pytest.mark.parametrize("name", ["pixeldit_xl_c2i", "pixeldit_t2i_1024"])
def test_released_configs_export_reference_keys_and_shapes(name):
    import pixeldit_eqx as px

    released = json.loads((FIXTURES / "released_shapes.json").read_text())[name]
    skeleton = eqx.filter_eval_shape(lambda: px.build(released["init"], released["variant"]))
    shapes = {k: list(v.shape) for k, v in px.state_dict(skeleton).items()}
    assert shapes == released["state_dict_shapes"]
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(skeleton))
    assert n_params == released["num_params"]
    # and the loader accepts exactly those keys and shapes (all zeros: nothing allocated but these)
    if name == "pixeldit_xl_c2i":
        tiny = {k: np.broadcast_to(np.float32(0.0), v) for k, v in released["state_dict_shapes"].items()}
        loaded = eqx.filter_eval_shape(lambda: px.load_reference(tiny, released["init"], released["variant"]))
        assert jax.tree.structure(loaded) == jax.tree.structure(skeleton)


def test_presets_build_lazily_and_match_released():
    import pixeldit_eqx as px

    released = json.loads((FIXTURES / "released_shapes.json").read_text())
    for preset, name in [
        ("pixeldit-xl-c2i-256", "pixeldit_xl_c2i"),
        ("pixeldit-xl-c2i-512", "pixeldit_xl_c2i"),
        ("pixeldit-t2i-1024", "pixeldit_t2i_1024"),
    ]:
        skeleton = eqx.filter_eval_shape(lambda: px.build(preset))
        assert type(skeleton).variant == released[name]["variant"]
        assert {k: list(v.shape) for k, v in px.state_dict(skeleton).items()} == released[name]["state_dict_shapes"]


def test_text_padding_masked_out_changes_nothing(getkey):
    model = _model("model_t2i")
    data = load_case("model_t2i")
    x, t, text = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    base = model(x, t, text)
    junk = 100.0 * jax.random.normal(getkey(), (4, text.shape[1]))
    padded = jnp.concatenate([text, junk])
    mask = jnp.arange(padded.shape[0]) < text.shape[0]
    out = model(x, t, padded, mask)
    assert rel_err(out, base) <= 1e-5
    unmasked = model(x, t, padded)  # without the mask the junk does matter
    assert rel_err(unmasked, base) > 1e-3


def test_text_longer_than_max_length_is_truncated(getkey):
    model = _model("model_t2i")
    data = load_case("model_t2i")
    x, t = jnp.asarray(data["in_x"][0]), jnp.asarray(data["in_t"][0])
    text = jax.random.normal(getkey(), (model.txt_max_length + 5, model.txt_embed_dim))
    np.testing.assert_array_equal(model(x, t, text), model(x, t, text[: model.txt_max_length]))


@pytest.mark.parametrize("case", ["model_c2i", "model_t2i"])
def test_second_resolution_is_computed_not_stale(case, getkey):
    model = _model(case)
    data = load_case(case)
    t, y = jnp.asarray(data["in_t"][0]), jnp.asarray(data["in_y"][0])
    x = jax.random.normal(getkey(), (3, 8, 12))  # non-square, another grid
    out = eqx.filter_jit(lambda m, x: m(x, t, y))(model, x)
    assert out.shape == (3, 8, 12) and bool(jnp.all(jnp.isfinite(out)))
    # a patch's output depends on its own pixels through the pixel level: embedding the
    # 8x12 image into the 16x16 fixture grid changes the result, so no 16x16 table is reused
    big = jnp.zeros((3, 16, 16)).at[:, :8, :12].set(x)
    assert rel_err(model(big, t, y)[:, :8, :12], out) > 1e-4


def test_scanned_stack_equals_blocks_one_by_one():
    import pixeldit_eqx as px

    model = _model("model_c2i")
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


def test_init_as_reference(getkey):
    import pixeldit_eqx as px

    c2i = px.PixelDiT(3, 4, 64, 8, 2, 2, 4, 10, key=getkey())
    x = jax.random.normal(getkey(), (3, 16, 16))
    assert np.all(np.asarray(c2i(x, 0.5, 3)) == 0)  # zero final layer
    assert not np.any(np.asarray(c2i.patch_blocks.blocks.adaln.weight))
    assert not np.any(np.asarray(c2i.pixel_blocks.blocks.adaln.weight))
    assert not np.any(np.asarray(c2i.s_embedder.proj.bias))
    bound = np.sqrt(6 / (48 + 64))
    assert np.abs(np.asarray(c2i.s_embedder.proj.weight)).max() <= bound
    assert 0.015 < float(jnp.std(c2i.y_embedder.embedding_table.weight)) < 0.025
    # blocks of a stack start different (a key per block)
    qkv = c2i.patch_blocks.blocks.attn.qkv.weight
    assert not np.allclose(qkv[0], qkv[1])
    t2i = px.PixelDiTT2I(3, 4, 64, 8, 32, 2, 2, 2, 4, 24, 12, key=getkey())
    assert np.any(np.asarray(t2i.patch_blocks.blocks.adaln_img.weight))  # default init in t2i
    assert not np.any(np.asarray(t2i.final_layer.linear.weight))


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_construction_as_one_program_equals_traced_construction(variant):
    """With a concrete key the constructor draws every parameter in one compiled program;
    traced (under `jit`, `vmap`, `eval_shape`) it runs inline. Both give the same model:
    same structure, static fields and dtypes, values equal to float32 round-off (XLA may
    contract a multiply-add differently), and the same draw for the same key."""
    import pixeldit_eqx as px

    config = dict(in_channels=3, num_groups=4, hidden_size=32, pixel_hidden_size=8, patch_depth=2, pixel_depth=1)
    config |= dict(patch_size=2, num_classes=10) if variant == "c2i" else dict(patch_size=2, txt_embed_dim=16)
    key = jax.random.key(5)
    direct = px.build(config, variant, key=key)
    again = px.build(config, variant, key=key)
    fast = px._model._INIT_CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    fast = {k: v for k, v in fast.items() if k not in px._compat._unknown_options}  # known to this XLA
    traced = eqx.filter_jit(lambda k: px.build(config, variant, key=k), compiler_options=fast)(key)
    arrays = [eqx.partition(m, eqx.is_array) for m in (direct, again, traced)]
    assert arrays[0][1] == arrays[2][1]  # identical static parts
    leaves = [jax.tree.leaves(dynamic) for dynamic, _ in arrays]
    assert jax.tree.structure(arrays[0][0]) == jax.tree.structure(arrays[2][0])
    for a, b, c in zip(*leaves):
        assert a.dtype == c.dtype and a.shape == c.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    assert px.build(config, variant, key=key, dtype=jnp.bfloat16).s_embedder.proj.weight.dtype == jnp.bfloat16
    ensemble = eqx.filter_eval_shape(
        eqx.filter_vmap(lambda k: px.build(config, variant, key=k)), jax.random.split(key, 2)
    )
    assert ensemble.final_layer.linear.weight.shape == (2, *direct.final_layer.linear.weight.shape)


def test_vmap_equals_loop_and_jit():
    model = _model("model_c2i")
    data = load_case("model_c2i")
    x, t, y = (jnp.asarray(data[k]) for k in ("in_x", "in_t", "in_y"))
    batched = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))(model, x, t, y)
    loop = jnp.stack([model(x[i], t[i], y[i]) for i in range(2)])
    assert rel_err(batched, loop) <= 1e-5
    # python scalars and numpy inputs are accepted for t and y
    assert rel_err(model(x[0], float(t[0]), int(y[0])), loop[0]) <= 1e-5


def test_gradients_flow(getkey):
    import pixeldit_eqx as px

    model = px.PixelDiT(3, 4, 32, 8, 2, 1, 4, 10, key=getkey())
    model = jax.tree.map(lambda a: a + 0.01 if eqx.is_inexact_array(a) else a, model)  # leave the zero init
    x = jax.random.normal(getkey(), (3, 8, 8))
    grads = eqx.filter_grad(lambda m: jnp.mean(m(x, 0.3, 1) ** 2))(model)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


# --- Errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(hidden_size=30, num_groups=4),
            "`hidden_size`=30 must be divisible by `num_groups`=4",
        ),
        (dict(hidden_size=24, num_groups=4), "head dim divisible by 4"),
        (dict(patch_depth=-1), "`patch_depth` must be a non-negative integer, got -1"),
        (dict(num_classes=-1), "`num_classes` must be a non-negative integer, got -1"),
        (dict(pixel_depth=0), "`pixel_depth` must be a positive integer, got 0"),
        (dict(pixel_depth=-1), "`pixel_depth` must be a positive integer, got -1"),
        (dict(pixel_hidden_size=6), "`pixel_hidden_size` must be divisible by 4"),
    ],
)
def test_config_errors(kwargs, message):
    import pixeldit_eqx as px

    config = dict(MANIFEST["model_c2i"]["init"]) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        px.build(config, "c2i")


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_no_patch_blocks_is_the_identity_stack(variant, getkey):
    """`patch_depth=0` (the reference runs it) equals one patch block made the identity
    on the image stream by a zero adaLN (all its gates 0)."""
    import pixeldit_eqx as px

    config = dict(MANIFEST[f"model_{variant}"]["init"])
    key = getkey()

    # The final layer is zero-initialised too: move it (alike in both) so the output is not 0.
    def moved(m):
        return eqx.tree_at(lambda m: m.final_layer, m, jax.tree.map(lambda a: a + 0.05, m.final_layer))

    empty = moved(px.build(config | {"patch_depth": 0}, variant, key=key))
    one = moved(px.build(config | {"patch_depth": 1}, variant, key=key))
    name = "adaln" if variant == "c2i" else "adaln_img"
    one = eqx.tree_at(
        lambda m: getattr(m.patch_blocks.blocks, name),
        one,
        jax.tree.map(jnp.zeros_like, getattr(one.patch_blocks.blocks, name)),
    )
    assert empty.patch_blocks.depth == 0
    assert not any(k.startswith("patch_blocks.") for k in px.state_dict(empty))
    x = jax.random.normal(getkey(), (config.get("in_channels", 3), 16, 16))
    cond = (3,) if variant == "c2i" else (jax.random.normal(getkey(), (5, config["txt_embed_dim"])),)
    out = empty(x, 0.4, *cond)
    assert float(jnp.abs(out).max()) > 0.1
    np.testing.assert_allclose(out, one(x, 0.4, *cond), rtol=0, atol=1e-5)
    # Trains and round-trips through a state dict like any other model.
    trained = jax.tree.map(lambda a: a + 0.01 if eqx.is_inexact_array(a) else a, empty)
    grads = eqx.filter_grad(lambda m: jnp.mean(m(x, 0.4, *cond) ** 2))(trained)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    again = px.load_reference(px.state_dict(trained), config | {"patch_depth": 0}, variant)
    np.testing.assert_array_equal(again(x, 0.4, *cond), trained(x, 0.4, *cond))


def test_no_classes_is_an_unconditional_model(getkey):
    """`num_classes=0` (the reference runs it): one embedding row, the null class 0."""
    import pixeldit_eqx as px

    model = px.build(dict(MANIFEST["model_c2i"]["init"]) | {"num_classes": 0}, "c2i", key=getkey())
    assert model.y_embedder.embedding_table.weight.shape[0] == 1
    x = jax.random.normal(getkey(), (3, 16, 16))
    assert np.isfinite(np.asarray(model(x, 0.5, 0))).all()
    with pytest.raises(Exception, match=r"class labels must lie in \[0, 0\]"):
        model(x, 0.5, 1)


def test_build_accepts_the_t2i_reference_arguments_that_change_nothing(getkey):
    import pixeldit_eqx as px

    config = dict(MANIFEST["model_t2i"]["init"])
    key = getkey()
    plain = px.build(config, "t2i", key=key)
    extra = px.build(config | {"num_text_blocks": 4, "repa_encoder_index": 2}, "t2i", key=key)
    assert jax.tree.structure(plain) == jax.tree.structure(extra)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="`num_text_blocks` must be an int, got 4.0"):
        px.build(config | {"num_text_blocks": 4.0}, "t2i")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['repa_encoder_index'\]"):
        px.build(dict(MANIFEST["model_c2i"]["init"]) | {"repa_encoder_index": 1}, "c2i")


def test_build_rejects_unknown_variant_and_arguments():
    import pixeldit_eqx as px

    with pytest.raises(ValueError, match="`variant` must be one of"):
        px.build(MANIFEST["model_c2i"]["init"], "x2y")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['txt_embed_dim'\]"):
        px.build(MANIFEST["model_c2i"]["init"] | {"txt_embed_dim": 3}, "c2i")
    with pytest.raises(ValueError, match="unknown preset"):
        px.build("pixeldit-huge")
    with pytest.raises(
        ValueError,
        match="`pixel_attn_hidden_size`=30 must be divisible by `pixel_num_groups`=4",
    ):
        px.build(
            MANIFEST["model_t2i"]["init"] | {"pixel_attn_hidden_size": 30, "pixel_num_groups": 4},
            "t2i",
        )


def test_image_size_not_divisible_by_patch_raises_at_call(getkey):
    model = _model("model_c2i")
    with pytest.raises(ValueError, match=r"multiples of the patch size 4, got \(H, W\) = \(16, 10\)"):
        model(jnp.zeros((3, 16, 10)), 0.5, 1)
    with pytest.raises(ValueError, match=r"expected 3 channels \(C, H, W\), got shape \(1, 16, 16\)"):
        model(jnp.zeros((1, 16, 16)), 0.5, 1)

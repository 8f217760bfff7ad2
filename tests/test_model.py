"""The PixelDiT models (c2i and t2i) against the reference fixtures; construction, initialisation,
config errors and call-time behaviour."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px

from .helpers import compiled, fast_jit, load_case, MANIFEST, rel_err


def _model(request, case):
    """The session's reference fixture model of `case` (`model_c2i` or `model_t2i`)."""
    return request.getfixturevalue(case.removeprefix("model_") + "_reference")


@pytest.mark.parametrize("case", ["model_c2i", "model_t2i"])
def test_model_parity_and_patch_level(case, request):
    model = _model(request, case)
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


def test_text_padding_masked_out_changes_nothing(getkey, t2i_reference):
    model = t2i_reference
    data = load_case("model_t2i")
    x, t, text = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    junk = 100.0 * jax.random.normal(getkey(), (4, text.shape[1]))
    padded = jnp.concatenate([text, junk])
    mask = jnp.arange(padded.shape[0]) < text.shape[0]
    # without the mask (the last call) the junk does matter
    base, out, unmasked = fast_jit(lambda m: (m(x, t, text), m(x, t, padded, mask), m(x, t, padded)))(model)
    assert rel_err(out, base) <= 1e-5
    assert rel_err(unmasked, base) > 1e-3


def test_text_longer_than_max_length_is_truncated(getkey, t2i_reference):
    model = t2i_reference
    data = load_case("model_t2i")
    x, t = jnp.asarray(data["in_x"][0]), jnp.asarray(data["in_t"][0])
    text = jax.random.normal(getkey(), (model.txt_max_length + 5, model.txt_embed_dim))
    long, truncated = fast_jit(lambda m: (m(x, t, text), m(x, t, text[: m.txt_max_length])))(model)
    np.testing.assert_array_equal(long, truncated)


@pytest.mark.parametrize("case", ["model_c2i", pytest.param("model_t2i", marks=pytest.mark.default_only)])
def test_second_resolution_is_computed_not_stale(case, getkey, request):
    model = _model(request, case)
    data = load_case(case)
    t, y = jnp.asarray(data["in_t"][0]), jnp.asarray(data["in_y"][0])
    x = jax.random.normal(getkey(), (3, 8, 12))  # non-square, another grid
    out = eqx.filter_jit(lambda m, x: m(x, t, y))(model, x)
    assert out.shape == (3, 8, 12) and bool(jnp.all(jnp.isfinite(out)))
    # a patch's output depends on its own pixels through the pixel level: embedding the
    # 8x12 image into the 16x16 fixture grid changes the result, so no 16x16 table is reused
    big = jnp.zeros((3, 16, 16)).at[:, :8, :12].set(x)
    assert rel_err(model(big, t, y)[:, :8, :12], out) > 1e-4


def test_init_as_reference(getkey):
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


@pytest.mark.parametrize("variant", ["c2i", pytest.param("t2i", marks=pytest.mark.default_only)])
def test_construction_as_one_program_equals_traced_construction(variant):
    """With a concrete key the constructor draws every parameter in one compiled program;
    traced (under `jit`, `vmap`, `eval_shape`) it runs inline. Both give the same model:
    same structure, static fields and dtypes, values equal to float32 round-off (XLA may
    contract a multiply-add differently), and the same draw for the same key."""
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


def test_vmap_equals_loop_and_jit(c2i_reference):
    model = c2i_reference
    data = load_case("model_c2i")
    x, t, y = (jnp.asarray(data[k]) for k in ("in_x", "in_t", "in_y"))
    batched = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))(model, x, t, y)
    call = lambda m, x, t, y: m(x, t, y)  # noqa: E731
    single = compiled(call, model, x[0], t[0], y[0])
    loop = jnp.stack([single(model, x[i], t[i], y[i]) for i in range(2)])
    assert rel_err(batched, loop) <= 1e-5
    # python scalars and numpy inputs are accepted for t and y (non-arrays reach the model as they are)
    assert rel_err(fast_jit(call)(model, x[0], float(t[0]), int(y[0])), loop[0]) <= 1e-5


def test_gradients_flow(getkey):
    model = px.PixelDiT(3, 4, 32, 8, 2, 1, 4, 10, key=getkey())
    x = jax.random.normal(getkey(), (3, 8, 8))

    def grad(model):
        model = jax.tree.map(lambda a: a + 0.01 if eqx.is_inexact_array(a) else a, model)  # leave the zero init
        return eqx.filter_grad(lambda m: jnp.mean(m(x, 0.3, 1) ** 2))(model)

    norms = [float(np.linalg.norm(np.asarray(g))) for g in jax.tree.leaves(fast_jit(grad)(model))]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


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
    config = dict(MANIFEST["model_c2i"]["init"]) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        px.build(config, "c2i")


@pytest.mark.default_only
@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_no_patch_blocks_is_the_identity_stack(variant, getkey):
    """`patch_depth=0` (the reference runs it) equals one patch block made the identity
    on the image stream by a zero adaLN (all its gates 0)."""
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
    call = lambda m: m(x, 0.4, *cond)  # noqa: E731
    out = fast_jit(call)(empty)
    assert float(jnp.abs(out).max()) > 0.1
    np.testing.assert_allclose(out, fast_jit(call)(one), rtol=0, atol=1e-5)
    # Trains and round-trips through a state dict like any other model.
    trained = fast_jit(lambda m: jax.tree.map(lambda a: a + 0.01 if eqx.is_inexact_array(a) else a, m))(empty)
    grads = fast_jit(eqx.filter_grad(lambda m: jnp.mean(call(m) ** 2)))(trained)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    again = px.load_reference(px.state_dict(trained), config | {"patch_depth": 0}, variant)
    np.testing.assert_array_equal(fast_jit(call)(again), fast_jit(call)(trained))


@pytest.mark.default_only
def test_no_classes_is_an_unconditional_model(getkey):
    """`num_classes=0` (the reference runs it): one embedding row, the null class 0."""
    model = px.build(dict(MANIFEST["model_c2i"]["init"]) | {"num_classes": 0}, "c2i", key=getkey())
    assert model.y_embedder.embedding_table.weight.shape[0] == 1
    x = jax.random.normal(getkey(), (3, 16, 16))
    assert np.isfinite(np.asarray(model(x, 0.5, 0))).all()
    with pytest.raises(Exception, match=r"class labels must lie in \[0, 0\]"):
        model(x, 0.5, 1)


@pytest.mark.default_only
def test_build_accepts_the_t2i_reference_arguments_that_change_nothing(getkey):
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


@pytest.mark.parametrize(
    "args, message",
    [
        ((MANIFEST["model_c2i"]["init"], "x2y"), "`variant` must be one of"),
        ((MANIFEST["model_c2i"]["init"] | {"txt_embed_dim": 3}, "c2i"), r"unknown argument\(s\) \['txt_embed_dim'\]"),
        (("pixeldit-huge",), "unknown preset"),
        (
            (MANIFEST["model_t2i"]["init"] | {"pixel_attn_hidden_size": 30, "pixel_num_groups": 4}, "t2i"),
            "`pixel_attn_hidden_size`=30 must be divisible by `pixel_num_groups`=4",
        ),
    ],
)
def test_build_rejects_unknown_variant_and_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        px.build(*args)


def test_image_size_not_divisible_by_patch_raises_at_call(c2i_reference):
    model = c2i_reference
    with pytest.raises(ValueError, match=r"multiples of the patch size 4, got \(H, W\) = \(16, 10\)"):
        model(jnp.zeros((3, 16, 10)), 0.5, 1)
    with pytest.raises(ValueError, match=r"expected 3 channels \(C, H, W\), got shape \(1, 16, 16\)"):
        model(jnp.zeros((1, 16, 16)), 0.5, 1)

"""Hardening: bad input gets one clear error, nothing is half-loaded, numerics stay
finite, serialisation is bit-exact, and `docs/troubleshooting.md` quotes every error
message verbatim.

The messages in the doc are produced by `SCENARIOS` below, run the way a user runs them
(no jaxtyping runtime checks, JAX's default promotion: see `as_a_user`). Regenerate the
doc's quoted blocks after changing a message with

    python -m tests.test_hardening --write-docs
"""

import contextlib
import io
import json
import os
import pathlib
import pickle
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import flow, train

from . import _hostile
from .helpers import arr, compiled, FIXTURES, load_weights, MANIFEST, normal, ROOT


DOC = ROOT / "docs" / "troubleshooting.md"
C2I = MANIFEST["model_c2i"]["init"]
T2I = MANIFEST["model_t2i"]["init"]
CHECKPOINTS = {
    ".pt": FIXTURES / "checkpoints" / "model_c2i_views.pt",
    ".ckpt": FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt",
    ".safetensors": FIXTURES / "model_c2i.safetensors",
}
HTML_404 = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n" * 8


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


def to_bf16(model):
    """`cast_params(model, bfloat16)` as one compiled program (eagerly, one per leaf)."""
    return eqx.filter_jit(lambda m: px.cast_params(m, jnp.bfloat16))(model)


def leaves_bytes(tree) -> list[tuple[str, tuple, bytes]]:
    """Every array leaf as `(dtype, shape, raw bytes)`: equal lists mean bit-identical."""

    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jr.key_data(x)
        x = np.asarray(x)
        return (x.dtype.name, x.shape, x.tobytes())

    return [raw(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.fixture
def c2i(c2i_reference):
    return c2i_reference


@pytest.fixture
def t2i(t2i_reference):
    return t2i_reference


# --- Construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, change, message",
    [
        ("c2i", {"hidden_size": 64.0}, "`config`: `hidden_size` must be an int, got 64.0 of type float."),
        ("c2i", {"num_classes": "10"}, "`config`: `num_classes` must be an int, got '10' of type str."),
        ("c2i", {"use_pixel_abs_pos": "no"}, "`config`: `use_pixel_abs_pos` must be a bool, got 'no' of type str."),
        ("c2i", {"mlp_ratio": "4"}, "`config`: `mlp_ratio` must be a number, got '4' of type str."),
        (
            "t2i",
            {"pixel_attn_hidden_size": 32.0},
            "`config`: `pixel_attn_hidden_size` must be an int or None, got 32.0 of type float.",
        ),
        ("t2i", {"text_rope_theta": None}, "`config`: `text_rope_theta` must be a number, got None of type NoneType."),
        ("c2i", {"hidden_size": 30}, "`hidden_size`=30 must be divisible by `num_groups`=4."),
        (
            "c2i",
            {"hidden_size": 24},
            "2D rope needs a head dim divisible by 4: `hidden_size` / `num_groups` = 24 / 4 = 6.",
        ),
        ("c2i", {"patch_size": 0}, "`patch_size` must be a positive integer, got 0."),
        ("c2i", {"pixel_hidden_size": 6}, "`pixel_hidden_size` must be divisible by 4 for the sincos table, got 6."),
        (
            "t2i",
            {"pixel_num_groups": 3},
            "`pixel_attn_hidden_size`=32 must be divisible by `pixel_num_groups`=3.",
        ),
        (
            "t2i",
            {"pixel_attn_hidden_size": 24, "pixel_num_groups": 4},
            "2D rope needs a head dim divisible by 4: `pixel_attn_hidden_size` / `pixel_num_groups` = 24 / 4 = 6.",
        ),
    ],
)
def test_build_refuses_inconsistent_or_mistyped_configs(variant, change, message):
    base = C2I if variant == "c2i" else T2I
    with pytest.raises(ValueError) as info:
        eqx.filter_eval_shape(px.build, base | change, variant)
    assert str(info.value) == message


def test_numpy_scalars_in_a_config_count_as_their_python_values():
    as_numpy = {k: np.asarray(v)[()] if isinstance(v, int | float | bool) else v for k, v in C2I.items()}
    assert any(isinstance(v, np.generic) for v in as_numpy.values())
    a = eqx.filter_eval_shape(px.build, C2I, "c2i")
    b = eqx.filter_eval_shape(lambda: px.build(as_numpy, "c2i"))
    assert jax.tree.structure(a) == jax.tree.structure(b)  # the same static config, as Python values
    with pytest.raises(ValueError, match="`hidden_size` must be an int, got 64.5 of type float"):
        px.build(as_numpy | {"hidden_size": np.float64(64.5)}, "c2i")


def test_variant_mixups_are_named():
    with pytest.raises(ValueError) as info:
        px.build("pixeldit-xl-c2i-256", "t2i")
    assert str(info.value) == (
        "`variant`='t2i' contradicts the preset 'pixeldit-xl-c2i-256', which is a 'c2i' model; leave `variant` out."
    )
    with pytest.raises(ValueError, match=re.escape("`variant` must be one of ['c2i', 'pixeldit2', 't2i'], got 'x2y'.")):
        px.load_reference(FIXTURES / "model_c2i.safetensors", C2I, "x2y")
    with pytest.raises(ValueError, match=re.escape("unknown argument(s) ['num_classes'] for variant 't2i'")):
        px.load_reference(FIXTURES / "model_c2i.safetensors", C2I, "t2i")


# --- Calls ----------------------------------------------------------------------------


def test_call_checks_image_and_label_before_computing(c2i):
    x = jnp.zeros((3, 16, 16))
    with pytest.raises(ValueError) as info:
        c2i(jnp.zeros((3, 16, 10)), 0.5, 1)
    assert str(info.value) == (
        "`x`: image height and width must be positive multiples of the patch size 4, got (H, W) = (16, 10)."
    )
    with pytest.raises(ValueError) as info:
        c2i(jnp.zeros((1, 16, 16)), 0.5, 1)
    assert str(info.value) == "`x`: expected 3 channels (C, H, W), got shape (1, 16, 16)."
    # A Python bool passes jaxtyping's `Int[ArrayLike, ""]` (bool is an int) but is no label.
    with pytest.raises(ValueError) as info:
        c2i.patch_level(x, 0.5, True)
    assert str(info.value) == "`y`: class labels must be integers, got dtype bool; cast with `.astype(jnp.int32)`."


def test_out_of_range_labels_raise_under_jit_and_vmap(c2i):
    x = arr(normal(0, (3, 16, 16)))
    message = re.escape("`y`: class labels must lie in [0, 10] (the last is the null class).")
    single = eqx.filter_jit(lambda m, x, y: m.patch_level(x, 0.5, y))
    assert all_finite(single(c2i, x, arr(10, np.int32)))  # the null class is a label
    for bad in (-1, 11):
        with pytest.raises(eqx.EquinoxRuntimeError, match=message):
            single(c2i, x, arr(bad, np.int32))
    # under plain `jax.jit` (see `compiled`) the error surfaces as a `JaxRuntimeError`
    # whose text holds Equinox's message (when the result is awaited: jax 0.5 returns first)
    vmapped = lambda m, x, y: jax.vmap(m.patch_level, in_axes=(None, None, 0))(x, 0.5, y)  # noqa: E731
    batched = compiled(vmapped, c2i, x, arr([0, 5, 10], np.int32))
    assert batched(c2i, x, arr([0, 5, 10], np.int32)).shape == (3, 16, 64)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(batched(c2i, x, arr([0, 11, 5], np.int32)))  # one bad label in the batch is enough


def test_out_of_range_labels_raise_through_loss_and_sampler(c2i):
    message = re.escape("`y`: class labels must lie in [0, 10] (the last is the null class).")
    xs = arr(normal(0, (2, 3, 16, 16)))
    labels = arr([1, 10], np.int32)
    loss = compiled(lambda m, y: train.c2i_loss(m, (xs, y), jr.key(0), drop_prob=0.0), c2i, labels)
    assert all_finite(loss(c2i, labels))
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(loss(c2i, arr([1, 12], np.int32)))

    def guided(m, null):  # a wrong null label (the null class of another model) is caught too
        return flow.sample(m, xs[0], arr(3, np.int32), num_steps=1, method="euler", guidance=2.0, null_cond=null)

    sample = compiled(guided, c2i, arr(10, np.int32))
    assert all_finite(sample(c2i, arr(10, np.int32)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(sample(c2i, arr(1000, np.int32)))


def test_text_width_and_length_are_checked(t2i):
    x = jnp.zeros((3, 16, 16))
    with pytest.raises(ValueError) as info:
        t2i(x, 0.5, jnp.zeros((7, 16)))
    assert str(info.value) == "`text`: expected shape (T, 24), got (7, 16)."
    with pytest.raises(ValueError) as info:
        t2i(x, 0.5, jnp.zeros((0, 24)))
    assert str(info.value) == "`text`: needs at least one token, got T=0."


def test_text_longer_than_max_length_is_truncated_with_its_mask(t2i):
    n = t2i.txt_max_length
    x, text = normal(0, (3, 16, 16)), normal(1, (n + 5, 24))
    mask = np.arange(n + 5) < n - 3  # padding at the end, inside and beyond the limit
    # Another text and mask that agree with these on the first `txt_max_length` tokens only.
    other_text, other_mask = text.copy(), mask.copy()
    other_text[n:], other_mask[n:] = 100 * normal(2, (5, 24)), True
    run = compiled(lambda m, *a: m.patch_level(*a), t2i, arr(x), arr(0.5), arr(text), arr(mask))
    out = run(t2i, arr(x), arr(0.5), arr(text), arr(mask))
    np.testing.assert_array_equal(out, run(t2i, arr(x), arr(0.5), arr(other_text), arr(other_mask)))
    other_text[0] += 1.0  # a change inside the limit does change the output
    assert not np.array_equal(out, run(t2i, arr(x), arr(0.5), arr(other_text), arr(mask)))
    assert "truncated" in px.PixelDiTT2I.__call__.__doc__


# --- Loading --------------------------------------------------------------------------


def test_every_state_dict_problem_in_one_error_and_nothing_loaded(c2i):
    before = leaves_bytes(c2i)
    sd = dict(load_weights("model_c2i"))
    bad = dict(sd)
    del bad["final_layer.linear.bias"]
    bad["pos_embed"] = np.zeros((1, 16, 64), np.float32)
    bad["t_embedder.mlp.0.bias"] = np.zeros((65,), np.float32)
    bad["t_embedder.mlp.2.weight"] = sd["t_embedder.mlp.2.weight"].copy()
    bad["t_embedder.mlp.2.weight"][3, 5] = np.nan
    bad["s_embedder.proj.bias"] = np.full((64,), np.inf, np.float32)
    bad["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"].astype(np.int32)
    with pytest.raises(px.StateDictError) as info:
        px.load_state_dict(c2i, bad)
    assert str(info.value) == (
        "state dict does not fit PixelDiT (6 problem(s)); nothing was loaded:\n"
        "  missing key 'final_layer.linear.bias' (expected shape (3,))\n"
        "  unexpected key 'pos_embed' (shape (1, 16, 64))\n"
        "  key 's_embedder.proj.bias': has non-finite values (nan/inf)\n"
        "  key 't_embedder.mlp.0.bias': expected shape (64,), got (65,)\n"
        "  key 't_embedder.mlp.2.weight': has non-finite values (nan/inf)\n"
        "  key 'y_embedder.embedding_table.weight': expected a floating tensor, got dtype int32"
    )
    assert isinstance(info.value, ValueError)
    assert leaves_bytes(c2i) == before  # the module passed in is untouched
    # the same problems from a file, through the public loader
    with pytest.raises(px.StateDictError, match=r"\(6 problem\(s\)\); nothing was loaded"):
        px.load_reference(bad, C2I)


@pytest.mark.parametrize(
    "weights, config, variant, other", [("model_c2i", T2I, "t2i", "c2i"), ("model_t2i", C2I, "c2i", "t2i")]
)
def test_weights_of_the_other_variant_fail_as_one_error(weights, config, variant, other):
    sd = load_weights(weights)
    want = {k: v.shape for k, v in px.state_dict(eqx.filter_eval_shape(px.build, config, variant)).items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    misshaped = sorted(k for k in set(want) & set(sd) if tuple(want[k]) != sd[k].shape)
    with pytest.raises(px.StateDictError) as info:
        px.load_reference(sd, config, variant)
    message = str(info.value)
    n = len(missing) + len(unexpected) + len(misshaped)
    cls = "PixelDiTT2I" if variant == "t2i" else "PixelDiT"
    assert message.startswith(f"state dict does not fit {cls} ({n} problem(s)); nothing was loaded:\n  hint: key ")
    assert f"these look like {other} weights (load them with variant={other!r} and a {other} config)" in message
    assert f"\n  the weights look like a {other} PixelDiT: hidden_size=64, " in message
    problems = info.value.problems  # all of them; the message shows the first of each kind
    assert len(problems) == n and len(message.splitlines()) <= 16
    for key in missing:
        assert f"missing key {key!r} (expected shape {tuple(want[key])})" in problems
    for key in unexpected:
        assert f"unexpected key {key!r} (shape {sd[key].shape})" in problems
    for key in misshaped:
        assert f"key {key!r}: expected shape {tuple(want[key])}, got {sd[key].shape}" in problems


def _damaged(data: bytes, damage: str) -> bytes:
    return {"garbage": HTML_404, "truncated": data[: len(data) // 2], "empty": b""}[damage]


@pytest.mark.parametrize("suffix", sorted(CHECKPOINTS))
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_checkpoint_files_give_a_clear_error(tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(_damaged(CHECKPOINTS[suffix].read_bytes(), damage))
    with pytest.raises(ValueError) as info:
        px.load_reference(path, C2I)
    error, message = info.value, str(info.value)
    assert str(path) in message  # names the file
    if suffix == ".safetensors":
        assert type(error) is px.CheckpointFormatError
        assert message.startswith(f"{str(path)!r} is not a readable .safetensors file: ")
    else:
        assert type(error) is px.CheckpointFormatError
        assert {
            "garbage": "not a zip archive, so not a `torch.save` checkpoint",
            "truncated": "the file is probably truncated",
            "empty": "the file is empty",
        }[damage] in message


def test_a_checkpoint_that_holds_no_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    with zipfile.ZipFile(path, "w") as archive:  # what `torch.save([1, 2, 3], path)` writes
        archive.writestr("archive/data.pkl", pickle.dumps([1, 2, 3], protocol=2))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(px.StateDictError) as info:
        px.load_reference(path, C2I)
    assert str(info.value) == "the checkpoint holds a list, not a state dict (a mapping of key -> tensor)."


# --- Numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "bfloat16 compute", "bfloat16 params"])
def test_forward_and_backward_are_finite(c2i, precision):
    """t = 0 and t = 1, inputs of unit, x100 and zero magnitude, random non-zero weights."""
    if precision == "bfloat16 compute":
        model = px.load_reference(FIXTURES / "model_c2i.safetensors", C2I, compute_dtype=jnp.bfloat16)
    elif precision == "bfloat16 params":
        model = to_bf16(c2i)
    else:
        model = c2i
    dtype = model.s_embedder.proj.weight.dtype
    noise = normal(7, (3, 16, 16))
    xs = arr([noise, noise, 100 * noise, 100 * noise, 0 * noise, 0 * noise], dtype)
    ts = arr([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], np.float32)
    ys = arr([0, 3, 10, 5, 9, 1], np.int32)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def forward(params, xs):
        return jax.vmap(eqx.combine(params, static))(xs, ts, ys)

    def forward_backward(params, xs):
        out, vjp = jax.vjp(forward, params, xs)
        return out, vjp(out)  # the gradient of sum(out**2) / 2

    jax.eval_shape(forward, params, xs)  # the forward traces under strict promotion
    # The transpose of `jax.nn.dot_product_attention` on bf16 inputs mixes bf16 and f32
    # outside the forward's standard-promotion scope, and strict mode refuses that (jax
    # 0.10.2): the backward of bf16 attention compiles under standard promotion only.
    promotion = "strict" if precision == "float32" else "standard"
    with jax.numpy_dtype_promotion(promotion):
        out, (g_params, g_x) = compiled(forward_backward, params, xs)(params, xs)
    assert out.dtype == jnp.float32 and out.shape == xs.shape  # the output head runs in float32
    assert g_x.dtype == dtype
    assert all_finite(out) and all_finite(g_x) and all_finite(g_params), precision
    g_leaves = [np.asarray(g, np.float32) for g in jax.tree.leaves(g_params)]
    assert np.abs(np.asarray(out)).max() > 0 and sum(g.any() for g in g_leaves) > len(g_leaves) // 2


# --- Serialisation --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["c2i", "t2i"])
def test_tree_serialisation_round_trip_is_bit_exact(case, request, tmp_path):
    model = request.getfixturevalue(case)
    for m in (model, to_bf16(model)):
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, m)
        buffer.seek(0)
        skeleton = eqx.filter_eval_shape(
            px.build, C2I if case == "c2i" else T2I, case, dtype=m.s_embedder.proj.weight.dtype
        )
        again = eqx.tree_deserialise_leaves(buffer, skeleton)
        assert jax.tree.structure(again) == jax.tree.structure(m)
        assert leaves_bytes(again) == leaves_bytes(m)
        train.save_model(tmp_path / "m.eqx", m)  # the self-describing file: no skeleton needed
        loaded = train.load_model(tmp_path / "m.eqx")
        assert jax.tree.structure(loaded) == jax.tree.structure(m)
        assert leaves_bytes(loaded) == leaves_bytes(m)


def _init(model, **optimizer):
    return train.init_train_state(model, train.default_optimizer(1e-3, **optimizer), key=jr.key(3))


def _state(model, **optimizer):
    """A fresh train state, made in one compiled call (cheaper than op by op)."""
    return eqx.filter_jit(lambda m: _init(m, **optimizer))(model)


def _state_like(config, **optimizer):
    """The shapes and dtypes of a fresh train state for `config`; nothing is allocated."""
    return eqx.filter_eval_shape(lambda: _init(px.build(config), **optimizer))


def test_train_state_round_trip_is_bit_exact_and_another_config_fails_clearly(c2i, tmp_path):
    state = _state(c2i, warmup_steps=10)
    # non-trivial moments, EMA and step, so that a mix-up of leaves would show
    bump = lambda tree: jax.tree.map(lambda a: arr(np.asarray(a) + 0.25) if eqx.is_inexact_array(a) else a, tree)  # noqa: E731
    state = eqx.tree_at(
        lambda s: (s.ema, s.opt_state, s.step), state, (bump(state.ema), bump(state.opt_state), arr(7, np.int32))
    )
    path = tmp_path / "state.eqx"
    train.save_checkpoint(path, state)
    again = train.load_checkpoint(path, eqx.filter_eval_shape(lambda: state))
    assert jax.tree.structure(again) == jax.tree.structure(state)
    assert leaves_bytes(again) == leaves_bytes(state)
    assert jr.key_impl(again.key) == jr.key_impl(state.key)

    other = _state_like(C2I | {"num_classes": 12}, warmup_steps=10)
    with pytest.raises(ValueError) as info:
        train.load_checkpoint(path, other)
    message = str(info.value)
    assert message.startswith(f"`path`: the checkpoint {path!r} does not fit `like_state`: ")
    assert "has changed shape from (13, 64) in `like` to (11, 64) on disk" in message


def test_model_file_of_another_config_or_damaged_fails_clearly(c2i, tmp_path):
    path = tmp_path / "m.eqx"
    train.save_model(path, c2i)
    data = path.read_bytes()
    header, leaves = data.split(b"\n", 1)
    config = json.loads(header)
    config["config"]["num_classes"] = 12
    path.write_bytes(json.dumps(config).encode() + b"\n" + leaves)
    with pytest.raises(ValueError, match=r"fails its sha256 checksum"):
        train.load_model(path)
    legacy = {k: v for k, v in config.items() if k not in ("sha256", "size")} | {"version": 1}
    path.write_bytes(json.dumps(legacy).encode() + b"\n" + leaves)
    with pytest.raises(ValueError, match=r"the leaves in .* do not fit the model its header describes"):
        train.load_model(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"the file is truncated"):
        train.load_model(path)
    path.write_bytes(HTML_404)
    with pytest.raises(ValueError, match=r"is not a pixeldit_eqx model file"):
        train.load_model(path)


# --- The troubleshooting page quotes the errors verbatim -------------------------------


@dataclass
class _Context:
    """What the scenarios share, built on first use, in a scratch directory."""

    directory: str

    @cached_property
    def c2i(self):
        return px.load_reference(FIXTURES / "model_c2i.safetensors", C2I, "c2i")

    @cached_property
    def t2i(self):
        return px.load_reference(FIXTURES / "model_t2i.safetensors", T2I, "t2i")

    def file(self, name: str, data: bytes) -> str:
        pathlib.Path(self.directory, name).write_bytes(data)
        return name


def _bad_state_dict() -> dict:
    sd = dict(load_weights("model_c2i"))
    del sd["final_layer.linear.bias"]
    sd["pos_embed"] = np.zeros((1, 16, 64), np.float32)
    sd["t_embedder.mlp.0.bias"] = np.zeros((65,), np.float32)
    sd["s_embedder.proj.bias"] = np.full((64,), np.nan, np.float32)
    return sd


def _model_file_of_another_config(ctx: _Context) -> str:
    buffer = io.BytesIO()
    train.save_model(buffer, ctx.c2i)
    header, leaves = buffer.getvalue().split(b"\n", 1)
    meta = {k: v for k, v in json.loads(header).items() if k not in ("sha256", "size")}
    meta["config"]["num_classes"] = 12
    meta["version"] = 1  # A file without a checksum (an edited checksummed header fails it).
    return ctx.file("edited.eqx", json.dumps(meta, sort_keys=True).encode() + b"\n" + leaves)


def _checkpoint_into_another_config(ctx: _Context):
    train.save_checkpoint("state.eqx", _state(ctx.c2i))
    other = _state_like(C2I | {"num_classes": 12})
    train.load_checkpoint("state.eqx", other)


def _damaged_model_file(ctx: _Context, how: str) -> str:
    train.save_model("model.eqx", ctx.c2i)
    data = pathlib.Path(ctx.directory, "model.eqx").read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "flipped": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
        "trailing": data + b"\n",
    }[how]
    return ctx.file("model.eqx", damaged)


def _model_file_with_nan(ctx: _Context) -> str:
    model = eqx.tree_at(lambda m: m.final_layer.linear.bias, ctx.c2i, replace_fn=lambda b: b.at[1].set(jnp.inf))
    train.save_model("nan.eqx", model)
    return "nan.eqx"


def _safetensors_flipped(ctx: _Context) -> str:
    px.save_safetensors("model.safetensors", load_weights("model_c2i"))
    data = pathlib.Path(ctx.directory, "model.safetensors").read_bytes()
    return ctx.file("model.safetensors", data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])


def _fit_on_nan_batches():
    def step(state, batch):
        return state, {"loss": np.float32("nan"), "skipped": np.float32(1.0)}

    return train.fit(step, None, [None] * 4, num_steps=4, progress=False, max_consecutive_skips=3)


_X = lambda: jnp.zeros((3, 16, 16))  # noqa: E731
_TEXT = lambda: jnp.zeros((7, 24))  # noqa: E731

#: name -> (what raises the error, how many lines of the message the doc shows or None for all)
SCENARIOS: dict[str, tuple[Callable[[_Context], object], int | None]] = {
    "config-type": (lambda c: px.build(C2I | {"hidden_size": 64.0}), None),
    "config-heads": (lambda c: px.build(C2I | {"hidden_size": 30}), None),
    "config-rope": (lambda c: px.build(C2I | {"hidden_size": 24}), None),
    "config-unknown": (lambda c: px.build(C2I | {"txt_embed_dim": 24}), None),
    "preset-variant": (lambda c: px.build("pixeldit-xl-c2i-256", "t2i"), None),
    "image-size": (lambda c: c.c2i(jnp.zeros((3, 16, 10)), 0.5, 1), None),
    "image-channels": (lambda c: c.c2i(jnp.zeros((1, 16, 16)), 0.5, 1), None),
    "image-batched": (lambda c: c.c2i(jnp.zeros((2, 3, 16, 16)), 0.5, 1), None),
    "image-dtype": (lambda c: c.c2i(jnp.zeros((3, 16, 16), jnp.uint8), 0.5, 1), None),
    "time-batched": (lambda c: c.c2i(_X(), jnp.array([0.1, 0.2]), 1), None),
    "label-float": (lambda c: c.c2i(_X(), 0.5, 2.0), None),
    "label-batched": (lambda c: c.c2i(_X(), 0.5, jnp.array([1, 2])), None),
    "label-range": (lambda c: c.c2i(_X(), 0.5, 11), None),
    "text-width": (lambda c: c.t2i(_X(), 0.5, jnp.zeros((7, 16))), None),
    "text-mask-shape": (lambda c: c.t2i(_X(), 0.5, _TEXT(), jnp.ones((5,), bool)), None),
    "text-mask-dtype": (lambda c: c.t2i(_X(), 0.5, _TEXT(), jnp.ones((7,))), None),
    "state-dict-problems": (lambda c: px.load_state_dict(c.c2i, _bad_state_dict()), None),
    "state-dict-other-variant": (lambda c: px.load_reference(load_weights("model_c2i"), T2I, "t2i"), 5),
    "state-dict-not-a-mapping": (lambda c: px.load_state_dict(c.c2i, "model.safetensors"), None),
    "source-type": (lambda c: px.load_reference(c.c2i, C2I), None),
    "file-missing": (lambda c: px.load_reference("missing.safetensors", C2I), None),
    "pt-not-a-zip": (lambda c: px.load_reference(c.file("model.pt", HTML_404), C2I), None),
    "ckpt-truncated": (
        lambda c: px.load_reference(
            c.file("model.ckpt", _damaged(CHECKPOINTS[".ckpt"].read_bytes(), "truncated")), C2I
        ),
        None,
    ),
    "safetensors-not-safetensors": (
        lambda c: px.load_reference(c.file("model.safetensors", HTML_404), C2I),
        None,
    ),
    "safetensors-truncated": (
        lambda c: px.load_reference(
            c.file("model.safetensors", _damaged(CHECKPOINTS[".safetensors"].read_bytes(), "truncated")), C2I
        ),
        None,
    ),
    "pt-unsafe-global": (lambda c: px.load_reference(c.file("model.pt", _hostile.hostile_global()), C2I), None),
    "pt-structured-dtype": (
        lambda c: px.load_reference(c.file("model.pt", _hostile.structured_dtype()), C2I),
        None,
    ),
    "pt-over-budget": (lambda c: px.load_reference(c.file("model.pt", _hostile.stride_zero_view()), C2I), None),
    "pt-crc": (lambda c: px.load_reference(c.file("model.pt", _hostile.bad_crc_storage()), C2I), None),
    "safetensors-checksum": (lambda c: px.load_reference(_safetensors_flipped(c), C2I), None),
    "checkpoint-prefix": (lambda c: px.load_reference(CHECKPOINTS[".ckpt"], C2I, prefix="ema."), None),
    "checkpoint-no-model-keys": (
        lambda c: px.load_reference({"encoder.layers.0.weight": np.zeros((2, 2), np.float32)}, C2I),
        None,
    ),
    "train-checkpoint-other-config": (_checkpoint_into_another_config, None),
    "model-file-not-a-model": (lambda c: train.load_model(c.file("model.eqx", HTML_404)), None),
    "model-file-other-config": (lambda c: train.load_model(_model_file_of_another_config(c)), None),
    "model-file-truncated": (lambda c: train.load_model(_damaged_model_file(c, "truncated")), None),
    "model-file-flipped": (lambda c: train.load_model(_damaged_model_file(c, "flipped")), None),
    "model-file-trailing": (lambda c: train.load_model(_damaged_model_file(c, "trailing")), None),
    "model-file-nonfinite": (lambda c: train.load_model(_model_file_with_nan(c)), None),
    "optimizer-not-finite": (lambda c: train.default_optimizer(float("inf")), None),
    "fit-nonfinite": (lambda c: _fit_on_nan_batches(), None),
    "flow-noise-dtype": (lambda c: flow.sample(c.c2i, jnp.zeros((3, 16, 16), jnp.int32), 1, num_steps=4), None),
    "flow-x-dtype": (
        lambda c: flow.flow_matching_loss(c.c2i, jnp.zeros((3, 16, 16), jnp.uint8), 1, key=jr.key(0)),
        None,
    ),
    "flow-guidance-shape": (
        lambda c: flow.sample(c.c2i, _X(), 1, num_steps=4, guidance=jnp.array([2.0, 3.0]), null_cond=10),
        None,
    ),
    "train-float-labels": (
        lambda c: eqx.filter_jit(train.c2i_loss)(c.c2i, (jnp.zeros((2, 3, 16, 16)), jnp.array([1.0, 2.0])), jr.key(0)),
        None,
    ),
}


def render(error: BaseException) -> str:
    """An error as the last line of a traceback shows it (Equinox's runtime errors: the
    message line, without the advice Equinox appends)."""
    message = str(error)
    if isinstance(error, eqx.EquinoxRuntimeError):
        message = re.search(r"EquinoxRuntimeError: (.*)", message).group(1)
    return f"{type(error).__name__}: {message}"


def run_scenarios() -> dict[str, str]:
    """The text each scenario's error renders to, as the doc quotes it."""
    out = {}
    with tempfile.TemporaryDirectory() as directory:
        cwd = os.getcwd()
        os.chdir(directory)
        try:
            ctx = _Context(directory)
            for name, (scenario, lines) in SCENARIOS.items():
                try:
                    scenario(ctx)
                except Exception as e:
                    text = render(e)
                else:
                    text = "(no error was raised)"
                if lines is not None and text.count("\n") >= lines:
                    text = "\n".join(text.split("\n")[:lines] + ["..."])
                out[name] = text
        finally:
            os.chdir(cwd)
    return out


_BLOCK = re.compile(r"<!-- error: (?P<name>[\w-]+) -->\n```text\n(?P<text>.*?)\n```", re.S)


def doc_blocks(doc: str) -> dict[str, str]:
    return {m["name"]: m["text"] for m in _BLOCK.finditer(doc)}


@contextlib.contextmanager
def as_a_user():
    """What a plain Python session has: no jaxtyping runtime checks (the suite's import
    hook is switched off meanwhile), JAX's default dtype and rank promotion."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


# These messages end with safetensors' own error text, which older safetensors words
# differently (0.4: "MetadataIncompleteBuffer"); the package's part must match verbatim.
_LIBRARY_WORDED = dict.fromkeys(
    ["safetensors-not-safetensors", "safetensors-truncated"], "is not a readable .safetensors file: "
)


def _same_quote(name: str, quoted: str, actual: str) -> bool:
    if quoted == actual or name not in _LIBRARY_WORDED:
        return quoted == actual
    head = _LIBRARY_WORDED[name]
    return head in actual and quoted.split(head)[0] == actual.split(head)[0]


def test_troubleshooting_doc_quotes_every_error_verbatim():
    with as_a_user():
        actual = run_scenarios()
    assert not [name for name, text in actual.items() if text == "(no error was raised)"]
    quoted = doc_blocks(DOC.read_text())
    assert sorted(quoted) == sorted(SCENARIOS), "every scenario is quoted once, and nothing else"
    stale = {
        name: (quoted[name], actual[name]) for name in SCENARIOS if not _same_quote(name, quoted[name], actual[name])
    }
    assert not stale, "docs/troubleshooting.md is stale; run `python -m tests.test_hardening --write-docs`"


def _write_docs() -> None:
    actual = run_scenarios()
    doc = DOC.read_text()

    def replace(m):
        return f"<!-- error: {m['name']} -->\n```text\n{actual[m['name']]}\n```"

    DOC.write_text(_BLOCK.sub(replace, doc))
    missing = sorted(set(SCENARIOS) - set(doc_blocks(doc)))
    if missing:
        print("not in the doc yet:", *(f"\n<!-- error: {n} -->\n```text\n{actual[n]}\n```" for n in missing))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        _write_docs()
    else:
        print(json.dumps(run_scenarios(), indent=1))

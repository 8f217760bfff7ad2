"""Profiles read by name: every block, attention, MLP and main stage of the models runs
under a `jax.named_scope`, which shows in the lowered program's locations (and so in
XLA's op names and the profiler's trace) and changes nothing else."""

import inspect
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px

from .helpers import init


F32 = jnp.float32
SMALL = dict(in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=1, pixel_depth=1)


def _debug_text(lowered) -> str:
    """The lowered StableHLO with its locations (the name stacks of the named scopes)."""
    try:
        return lowered.as_text(debug_info=True)
    except TypeError:  # a jax whose `as_text` has no `debug_info`
        return lowered.compiler_ir("stablehlo").operation.get_asm(enable_debug_info=True)


def _scope_paths(text: str) -> list[list[str]]:
    """The name stacks of the program's locations, each split into its scopes."""
    return [name.split("/") for name in re.findall(r'loc\("([^"]*)"', text) if "/" in name]


def _scopes(fn, *args) -> tuple[set[str], list[list[str]]]:
    """`(every scope named, every name stack)` of `jax.jit(fn)` lowered on `args`."""
    paths = _scope_paths(_debug_text(jax.jit(fn).lower(*args)))
    return {scope for path in paths for scope in path}, paths


def _nested(paths: list[list[str]], outer: str, inner: str) -> bool:
    """Some location runs under `inner` inside `outer`."""
    return any(outer in path and inner in path[path.index(outer) + 1 :] for path in paths)


def _abstract(make):
    """A model's parameters as shapes and its static part: lowering needs no weights."""
    model = eqx.filter_eval_shape(make)
    return eqx.partition(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))


def _spec(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


STAGES = {"patch_embed", "patch_blocks", "pixel_embed", "pixel_blocks", "final_layer"}


def test_pixeldit_forward_is_named_by_stage_block_attention_and_mlp():
    params, static = _abstract(lambda: px.PixelDiT(**SMALL, pixel_hidden_size=8, num_classes=10, key=jax.random.key(0)))

    def forward(params, x, t, y):
        return eqx.combine(params, static)(x, t, y)

    names, paths = _scopes(forward, params, _spec((3, 16, 16)), _spec(()), _spec((), jnp.int32))
    assert STAGES <= names
    assert {"DiTBlock", "PiTBlock", "RotaryAttention", "SwiGLU", "PixelMLP"} <= names
    assert _nested(paths, "DiTBlock", "RotaryAttention") and _nested(paths, "DiTBlock", "SwiGLU")
    assert _nested(paths, "PiTBlock", "RotaryAttention") and _nested(paths, "PiTBlock", "PixelMLP")


def test_t2i_forward_is_named_by_stage_block_attention_and_mlp():
    params, static = _abstract(
        lambda: px.PixelDiTT2I(**SMALL, pixel_hidden_size=8, txt_embed_dim=12, txt_max_length=8, key=jax.random.key(0))
    )

    def forward(params, x, t, text):
        return eqx.combine(params, static)(x, t, text)

    names, paths = _scopes(forward, params, _spec((3, 16, 16)), _spec(()), _spec((5, 12)))
    assert STAGES <= names
    assert {"MMDiTBlock", "JointAttention", "SwiGLU", "PiTBlock", "PixelMLP"} <= names
    assert _nested(paths, "MMDiTBlock", "JointAttention") and _nested(paths, "MMDiTBlock", "SwiGLU")


def test_pixeldit2_forward_is_named_by_stage_block_attention_and_mlp():
    params, static = _abstract(lambda: px.PixelDiT2(**init("model_pixeldit2"), key=jax.random.key(0)))

    def forward(params, x, t, y):
        return eqx.combine(params, static)(x, t, y)

    names, paths = _scopes(forward, params, _spec((3, 32, 32)), _spec(()), _spec((), jnp.int32))
    assert {"grounding", "patch_embed", "patch_blocks", "final_layer"} <= names
    assert {"ModulatedDiTBlock", "RotaryAttention", "FeedForward"} <= names
    assert _nested(paths, "ModulatedDiTBlock", "RotaryAttention")
    assert _nested(paths, "ModulatedDiTBlock", "FeedForward")


@pytest.mark.parametrize("name", ["DiTBlock", "RotaryAttention", "SwiGLU"])
def test_a_scope_adds_names_only(getkey, name):
    """The scoped call lowers to the same program as the same code without its scope,
    apart from the locations, and gives bitwise the same numbers."""
    d, n = 32, 6
    if name == "DiTBlock":
        layer = px.DiTBlock(d, 2, key=getkey())
        args = (jax.random.normal(getkey(), (n, d)), jax.random.normal(getkey(), (d,)), jnp.zeros((n, 8)))
        method = px.DiTBlock.__call__
    elif name == "RotaryAttention":
        layer = px.RotaryAttention(d, 2, key=getkey())
        args = (jax.random.normal(getkey(), (n, d)), jax.random.normal(getkey(), (n, 8)))
        method = px.RotaryAttention.__call__
    else:
        layer = px.SwiGLU(d, key=getkey())
        args = (jax.random.normal(getkey(), (n, d)),)
        method = px.SwiGLU.apply
    unscoped = inspect.unwrap(method)
    assert unscoped is not method  # the scope is a wrapper around the layer's own code

    def run(fn):  # one name for both programs: it is part of the text
        def forward(layer, *args):
            return fn(layer, *args)

        return jax.jit(forward).lower(layer, *args)

    scoped, plain = run(method), run(unscoped)
    assert name in {s for path in _scope_paths(_debug_text(scoped)) for s in path}
    assert name not in {s for path in _scope_paths(_debug_text(plain)) for s in path}
    assert scoped.as_text() == plain.as_text()
    np.testing.assert_array_equal(scoped.compile()(layer, *args), plain.compile()(layer, *args))

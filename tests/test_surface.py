"""The user's surface in Python: submodules as attributes, the friendly ImportError of a
missing optional extra, a text model's `(text, mask)` condition, and PNG grids."""

import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _digits, flow
from pixeldit_eqx._model import PixelDiTT2I

from .helpers import load_case, rel_err


def test_submodules_are_attributes():
    code = (
        "import pixeldit_eqx as px, sys\n"
        "assert 'pixeldit_eqx.train' not in sys.modules, 'train (optax) is imported lazily'\n"
        "print(px.flow.sample.__name__, px.train.make_train_step.__name__, px.sharding.fsdp_spec.__name__)\n"
        "print('train' in dir(px), 'sharding' in dir(px))\n"
        "try:\n    px.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "sample make_train_step fsdp_spec",
        "True True",
        "module 'pixeldit_eqx' has no attribute 'no_such_name'",
    ]


@pytest.mark.parametrize(
    ("blocked", "action", "extra"),
    [
        ("optax", lambda px: importlib.import_module("pixeldit_eqx.train"), "train"),
        ("optax", lambda px: px.sharding, "train"),
        ("safetensors", lambda px: px.save_safetensors("unused.safetensors", {"a": np.zeros(2)}), "safetensors"),
        (
            "safetensors",
            lambda px: px.load_reference(_fixture("model_c2i.safetensors"), "pixeldit-xl-c2i-256"),
            "safetensors",
        ),
        ("PIL", lambda px: px.save_image_grid(np.zeros((1, 1, 2, 2), np.float32), "unused.png"), "images"),
    ],
)
def test_missing_extra_names_it(monkeypatch, tmp_path, blocked, action, extra):
    """A missing optional package gives one ImportError that names the extra to install."""
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    for name in ("train", "sharding"):
        if f"pixeldit_eqx.{name}" in sys.modules:
            monkeypatch.delitem(sys.modules, f"pixeldit_eqx.{name}")
        if name in vars(px):  # an earlier import left the submodule as an attribute of the package
            monkeypatch.delattr(px, name)
    with pytest.raises(ImportError, match=rf"pip install 'pixeldit-eqx\[{extra}\]'") as info:
        action(px)
    assert f"`{blocked}`" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing written


def _fixture(name):
    from .helpers import FIXTURES

    return FIXTURES / name


def test_t2i_takes_the_text_and_mask_pair_that_flow_sample_hands_over(getkey, t2i_reference):
    import equinox as eqx

    model = t2i_reference
    data = load_case("model_t2i")
    x, t, text = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    mask = jnp.arange(text.shape[0]) < text.shape[0] - 1
    null = (jnp.zeros_like(text), jnp.ones_like(mask))
    noise = jax.random.normal(getkey(), x.shape)

    @eqx.filter_jit
    def run(model):
        # One Euler step from t = 0, guided (the interval includes t = 0): flow.sample hands
        # the model the pair; by hand, the model takes text and mask as two arguments.
        kwargs = dict(num_steps=1, method="euler", guidance=2.0, null_cond=null, guidance_interval=(-1.0, 2.0))
        sampled = flow.sample(model, noise, (text, mask), **kwargs)
        texts, masks = jnp.stack([null[0], text]), jnp.stack([null[1], mask])
        v_u, v_c = jax.vmap(lambda tx, m: model(noise, 0.0, tx, m))(texts, masks)
        return sampled, noise + v_u + 2.0 * (v_c - v_u), noise + v_c

    sampled, by_hand, unguided = run(model)
    assert rel_err(sampled, by_hand) <= 1e-5
    assert rel_err(sampled, unguided) > 1e-3  # guidance did apply


def test_t2i_refuses_a_condition_it_cannot_read_with_the_recipe(t2i_reference):
    model = t2i_reference
    data = load_case("model_t2i")
    x, t, text = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    mask = jnp.ones(text.shape[0], bool)
    with pytest.raises((ValueError, TypeError), match=r"text|flow.sample"):
        model(x, t, (text, mask, mask))


def test_t2i_refuses_a_pair_and_a_mask_with_the_recipe(t2i_reference):
    """Outside the shape checks (a plain call), the message shows the recipe."""
    model = t2i_reference
    data = load_case("model_t2i")
    x, t, text = (jnp.asarray(data[k][0]) for k in ("in_x", "in_t", "in_y"))
    mask = jnp.ones(text.shape[0], bool)
    call = PixelDiTT2I.__call__.__wrapped__ if hasattr(PixelDiTT2I.__call__, "__wrapped__") else PixelDiTT2I.__call__
    with pytest.raises(ValueError, match=r"flow\.sample\(model, noise, \(text, mask\)"):
        call(model, x, t, (text, mask), mask)
    with pytest.raises(ValueError, match=r"flow\.sample\(model, noise, \(text, mask\)"):
        call(model, x, t, [text, mask, mask])
    with pytest.raises(ValueError, match=r"got str"):
        call(model, x, t, "a cat")


# ----------------------------------------------------------------------------- image grids


def _read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def test_image_grid_layout_and_values(tmp_path):
    # 5 RGB images of 3x4 pixels; image i is constant -1 + i / 2 on channel 0 and its
    # pixel (r, c) carries the position on channel 1, so the layout can be read back.
    n, h, w = 5, 3, 4
    images = np.zeros((n, 3, h, w), np.float32)
    for i in range(n):
        images[i, 0] = -1.0 + i / 2
        images[i, 1] = np.linspace(-1, 1, h * w).reshape(h, w)
        images[i, 2] = 1.0
    path = tmp_path / "sub" / "grid.png"
    px.save_image_grid(jnp.asarray(images), path, nrow=2, padding=1, pad_value=0.0)
    mode, got = _read_png(path)
    assert mode == "RGB" and got.shape == (3 * (h + 1) + 1, 2 * (w + 1) + 1, 3)
    gray = round((0.0 + 1) / 2 * 255)
    for i in range(6):  # the sixth cell is empty: padding colour
        top, left = 1 + (i // 2) * (h + 1), 1 + (i % 2) * (w + 1)
        cell = got[top : top + h, left : left + w]
        if i == n:
            assert (cell == gray).all()
            continue
        want = np.clip(np.round((images[i].transpose(1, 2, 0) + 1) / 2 * 255), 0, 255)
        np.testing.assert_array_equal(cell, want.astype(np.uint8))
    assert (got[0] == gray).all() and (got[:, 0] == gray).all()  # the border
    assert got[1, 1, 0] == 0 and got[1 + 2 * (h + 1), 1, 0] == 255  # image 0 is -1, image 4 is +1
    assert not [p for p in path.parent.iterdir() if p.name != "grid.png"]  # no temporary left


def test_image_grid_greyscale_clipping_and_scale(tmp_path):
    images = np.array([[[[-3.0, 0.0], [0.5, 7.0]]]], np.float32)  # (1, 1, 2, 2), out of range clipped
    px.save_image_grid(images, tmp_path / "g.png", nrow=4, padding=0, scale=3)
    mode, got = _read_png(tmp_path / "g.png")
    assert mode == "L" and got.shape == (6, 6)
    np.testing.assert_array_equal(got[::3, ::3], [[0, 128], [191, 255]])
    assert (got[:3, :3] == 0).all() and (got[3:, 3:] == 255).all()  # 3x3 blocks


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (np.zeros((2, 2, 4, 4), np.float32), {}, r"`images`: .*C in \(1, 3, 4\), got shape \(2, 2, 4, 4\)"),
        (np.zeros((4, 4), np.float32), {}, r"`images`: .*got shape \(4, 4\)"),  # (under the suite: jaxtyping)
        (np.zeros((1, 3, 4, 4), np.uint8), {}, r"`images`: expected floating-point .* got dtype uint8"),
        (np.full((1, 3, 4, 4), np.nan, np.float32), {}, r"`images`: .*got 48 NaN or infinite"),
        (np.zeros((1, 3, 4, 4), np.float32), {"nrow": 0}, r"`nrow` must be an integer >= 1, got nrow=0"),
        (np.zeros((1, 3, 4, 4), np.float32), {"padding": -1}, r"`padding` must be an integer >= 0"),
        (np.zeros((1, 3, 4, 4), np.float32), {"pad_value": 2.0}, r"`pad_value` must be in \[-1, 1\]"),
    ],
)
def test_image_grid_refuses_bad_input_and_writes_nothing(tmp_path, images, kwargs, match):
    save = getattr(px.save_image_grid, "__wrapped__", px.save_image_grid)  # past the suite's shape checks
    with pytest.raises(ValueError, match=match):
        save(images, tmp_path / "x.png", **kwargs)
    assert not list(tmp_path.iterdir())


def test_digits_grid_is_a_save_image_grid(tmp_path):
    """The digits job's 10x10 grid: one row per class, dark ink on white, 48-pixel cells."""
    labels = np.repeat(np.arange(10), 12)
    samples = np.zeros((120, 1, 16, 16), np.float32)
    samples[labels == 3, :, :8] = 16.0  # class 3: the top half inked
    _digits.write_grid(tmp_path / "d.png", samples, labels)
    mode, got = _read_png(tmp_path / "d.png")
    assert mode == "L" and got.shape == (502, 502)
    row3 = got[2 + 3 * 50 : 2 + 3 * 50 + 48]
    assert (row3[:24, 2:50] == 0).all() and (row3[24:, 2:50] == 255).all()
    assert (got[2:50, 2:50] == 255).all()  # class 0: blank

"""Smoke test of an installed pixeldit_eqx (a wheel in a clean venv), run outside the
checkout by `nox -s smoke`: build, jit, vmap, one train step, load a fixture checkpoint,
sample.

    python smoke.py path/to/tests/fixtures/reference
"""

import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import pixeldit_eqx as px
from pixeldit_eqx import flow, train


def main(fixtures: pathlib.Path) -> None:
    here = pathlib.Path(px.__file__).resolve()
    if pathlib.Path.cwd().resolve() in here.parents or "site-packages" not in here.parts:
        raise SystemExit(f"smoke: pixeldit_eqx imported from {here}, not from an installed wheel")

    # Build (the README's first model), jit and vmap.
    model = px.PixelDiT(
        in_channels=3, num_groups=4, hidden_size=64, pixel_hidden_size=8,
        patch_depth=2, pixel_depth=2, patch_size=4, num_classes=10, key=jr.key(0),
    )  # fmt: skip
    x, t, y = jnp.zeros((2, 3, 16, 16)), jnp.full((2,), 0.5), jnp.arange(2)
    v = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))(model, x, t, y)
    if v.shape != x.shape or not bool(jnp.isfinite(v).all()):
        raise SystemExit(f"smoke: forward gave shape {v.shape}, finite={bool(jnp.isfinite(v).all())}")

    # One train step.
    state = train.init_train_state(model, optax.adam(1e-3), key=jr.key(1))
    step = train.jit_step(train.make_train_step(train.c2i_loss, optax.adam(1e-3)))
    state, metrics = step(state, (jr.normal(jr.key(2), (2, 3, 16, 16)), jnp.arange(2)))
    if int(state.step) != 1 or not np.isfinite(float(metrics["loss"])):
        raise SystemExit(f"smoke: train step gave step={int(state.step)}, metrics={metrics}")

    # Load a fixture checkpoint (torch-free) and match the reference's output.
    manifest = json.loads((fixtures / "manifest.json").read_text())
    loaded = px.load_reference(fixtures / "checkpoints" / "model_c2i_lightning.ckpt", manifest["model_c2i"]["init"])
    case = np.load(fixtures / "model_c2i.npz")
    out = jax.vmap(loaded)(jnp.asarray(case["in_x"]), jnp.asarray(case["in_t"]), jnp.asarray(case["in_y"]))
    err = float(np.abs(np.asarray(out, np.float64) - case["out"]).max() / np.abs(case["out"]).max())
    if not err <= 1e-5:
        raise SystemExit(f"smoke: loaded checkpoint is off the reference by {err:.2e} (> 1e-5)")

    # Sample.
    noise = jr.normal(jr.key(3), (3, 16, 16))
    image = eqx.filter_jit(lambda n: flow.sample(loaded, n, jnp.asarray(1), num_steps=4))(noise)
    if image.shape != noise.shape or not bool(jnp.isfinite(image).all()):
        raise SystemExit("smoke: sampling gave a wrong shape or non-finite values")

    print(f"smoke ok: python {sys.version.split()[0]}, jax {jax.__version__}, equinox {eqx.__version__}, "
          f"pixeldit_eqx {px.__version__} from {here.parent}, checkpoint rel err {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))

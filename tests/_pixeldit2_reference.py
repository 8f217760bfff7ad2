"""PixelDiT2 reference fixtures (`tests/fixtures/pixeldit2/`): inputs, weights, outputs."""

import json
import pathlib

import equinox as eqx
import jax
import numpy as np


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pixeldit2"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
RELEASED = json.loads((FIXTURES / "released_shapes.json").read_text())


def load_case(name: str) -> dict[str, np.ndarray]:
    """The inputs/outputs/intermediates `.npz` of a fixture case."""
    return dict(np.load(FIXTURES / f"{name}.npz"))


def load_weights(name: str) -> dict[str, np.ndarray]:
    """The reference `state_dict()` of a case (or of the case it takes its weights from)."""
    from safetensors.numpy import load_file

    name = MANIFEST[name].get("params_from", name)
    return load_file(FIXTURES / f"{name}.safetensors")


def init(name: str) -> dict:
    """The reference constructor arguments of a case, as the manifest records them."""
    return dict(MANIFEST[name]["init"])


def rel_err(port, ref) -> float:
    """`max|port - ref| / max|ref|` over a whole output (the fixtures' metric)."""
    port, ref = np.asarray(port, np.float64), np.asarray(ref, np.float64)
    assert port.shape == ref.shape, (port.shape, ref.shape)
    return float(np.abs(port - ref).max() / np.abs(ref).max())


@eqx.filter_jit
def vmapped(fn, *args):
    """`jax.vmap(fn)(*args)` as one compiled program (`fn` a module, a bound method or an
    `eqx.Partial`): much faster than op-by-op dispatch for the tests' small models."""
    return jax.vmap(fn)(*args)

"""What several test files share: the PyTorch reference fixtures and their metric, the small
model configs, and helpers that build test data and programs without eager compiles.

The fixtures of the PixelDiT family sit in `tests/fixtures/reference/`, those of PixelDiT2 in
`tests/fixtures/pixeldit2/`; their case names do not overlap, so `load_case`, `load_weights`
and `init` find a case in either.
"""

import json
import pathlib
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from safetensors.numpy import load_file

from pixeldit_eqx._compat import compile_lowered


ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "reference"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FIXTURES2 = pathlib.Path(__file__).parent / "fixtures" / "pixeldit2"
MANIFEST2 = json.loads((FIXTURES2 / "manifest.json").read_text())
RELEASED2 = json.loads((FIXTURES2 / "released_shapes.json").read_text())

# --- Small configs (keyword arguments of `PixelDiT` / `PixelDiTT2I`) ---------------------------

TINY = dict(in_channels=1, num_groups=2, hidden_size=16, pixel_hidden_size=4, patch_depth=1, pixel_depth=1)
SMALL_C2I = TINY | dict(patch_size=2, num_classes=2)
SMALL_T2I = TINY | dict(patch_size=2, txt_embed_dim=8, txt_max_length=4)
# An RGB model with 4x4 patches and ten classes (sharded training, checkpoints).
SMALL_RGB_C2I = dict(
    in_channels=3, num_groups=2, hidden_size=32, pixel_hidden_size=8, patch_depth=1, pixel_depth=1,
    patch_size=4, num_classes=10,
)  # fmt: skip


# --- Reference fixtures -------------------------------------------------------------------------


def _directory(name: str) -> pathlib.Path:
    return FIXTURES2 if name in MANIFEST2 else FIXTURES


def load_case(name: str) -> dict[str, np.ndarray]:
    """The inputs/outputs (and intermediates) `.npz` of a reference fixture case."""
    return dict(np.load(_directory(name) / f"{name}.npz"))


def load_weights(name: str) -> dict[str, np.ndarray]:
    """The reference `state_dict()` of a case (or of the case it takes its weights from)."""
    name = MANIFEST2.get(name, {}).get("params_from", name)
    return load_file(_directory(name) / f"{name}.safetensors")


def init(name: str) -> dict:
    """The reference constructor arguments of a case, as its manifest records them."""
    return dict((MANIFEST2 if name in MANIFEST2 else MANIFEST)[name]["init"])


def rel_err(port, ref) -> float:
    """`max|port - ref| / max|ref|` over a whole output (the fixtures' metric)."""
    port, ref = np.asarray(port, np.float64), np.asarray(ref, np.float64)
    assert port.shape == ref.shape, (port.shape, ref.shape)
    return float(np.abs(port - ref).max() / np.abs(ref).max())


# --- Test data and programs ---------------------------------------------------------------------

# Programs checked for errors and finiteness, not speed: with XLA's backend optimisations and
# CPU fusion emitters off they compile about 3x faster on CPU.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@eqx.filter_jit
def vmapped(fn, *args):
    """`jax.vmap(fn)(*args)` as one compiled program (`fn` a module, a bound method or an
    `eqx.Partial`): much faster than op-by-op dispatch for the tests' small models."""
    return jax.vmap(fn)(*args)


def compiled(fn: Callable, *args):
    """`fn` compiled once for the shapes of `args` (arrays traced, the rest static, in the
    arguments and in what `fn` returns), with the `FAST` compiler options."""
    dyn, static = eqx.partition(args, eqx.is_array)
    returned = []

    def arrays_of(d):
        out, out_static = eqx.partition(fn(*eqx.combine(d, static)), eqx.is_array)
        returned.append(out_static)
        return out

    exe = compile_lowered(jax.jit(arrays_of).lower(dyn), FAST)  # without the options an XLA does not know
    return lambda *new: eqx.combine(exe(eqx.filter(new, eqx.is_array)), returned[0])


def fast_jit(fn: Callable) -> Callable:
    """`fn` run as one program compiled for each call's arguments (see `compiled`): for the
    tests' one-off programs, where compiling is most of the time."""
    return lambda *args: compiled(fn, *args)(*args)


def arr(values, dtype=None) -> jax.Array:
    """A device array from numpy (eager `jnp` ops compile a program each; this does not)."""
    return jnp.asarray(np.asarray(values, dtype))


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 test data from numpy."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def jaxpr_eqns(jaxpr):
    """Every equation of `jaxpr`, and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex_core.Jaxpr):
                    yield from jaxpr_eqns(sub)

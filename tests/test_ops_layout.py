"""One job per file: `modules` holds the public layers the package re-exports, `_ops` the
operations they and the other files are made of, at the bottom of the import stack."""

import ast
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _ops, modules


PACKAGE = pathlib.Path(px.__file__).parent


def _package_imports(path: pathlib.Path) -> set[str]:
    """The package's modules that `path` imports at its top level (`from .x import`)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                out |= {alias.name for alias in node.names}
            else:
                out.add(node.module.split(".")[0])
    return out


def test_modules_exports_exactly_what_the_package_re_exports_from_it():
    re_exported = {name for name in modules.__all__ if getattr(px, name, None) is getattr(modules, name)}
    assert set(modules.__all__) == re_exported
    for name in ("linear", "dense", "keep", "gelu", "silu_gate", "token_wise", "zero_linear", "sincos_axes"):
        assert name not in modules.__all__
        assert callable(getattr(_ops, name))


@pytest.mark.parametrize(
    "name", ["silu_gate", "sincos_2d", "get_1d_sincos_pos_embed_from_grid", "get_2d_sincos_pos_embed_from_grid"]
)
def test_a_name_modules_used_to_export_warns_and_still_works(name):
    with pytest.warns(DeprecationWarning, match=rf"modules\.{name}` is internal"):
        moved = getattr(modules, name)
    assert moved is getattr(_ops, name)


def test_modules_public_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in modules.__all__:
            getattr(modules, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        modules.no_such_name  # noqa: B018


def test_ops_sits_at_the_bottom_of_the_import_stack():
    # `_dots` (the matmul primitives) is a leaf too: it imports nothing from the package.
    assert _package_imports(PACKAGE / "_ops.py") == {"_dots"}
    assert _package_imports(PACKAGE / "_dots.py") == set()
    assert _package_imports(PACKAGE / "modules.py") == {"_ops", "_custom_types"}
    importers = [p.name for p in PACKAGE.glob("*.py") if "_ops" in _package_imports(p)]
    assert {"modules.py", "_attention.py", "_blocks.py", "_tokens.py", "_model.py"} <= set(importers)


def test_token_wise_runs_the_layers_apply_or_vmaps(getkey):
    x = jax.random.normal(getkey(), (2, 3, 8))
    norm = px.RMSNorm(8)
    np.testing.assert_array_equal(_ops.token_wise(norm, x), norm.apply(x))
    fn = px.TimestepConditioner(4, freq_dim=8, key=getkey()).linear2  # an eqx.nn.Linear 4 -> 4
    y = jax.random.normal(getkey(), (5, 4))
    np.testing.assert_allclose(_ops.token_wise(fn, y), jax.vmap(fn)(y), rtol=1e-6, atol=1e-6)
    double = lambda v: jnp.concatenate([v, v])  # noqa: E731  a plain function: vmapped
    assert _ops.token_wise(double, y).shape == (5, 8)

"""The docstrings' contract: every public layer lists its constructor's arguments under
`**Arguments:**` (Equinox's style), and no docstring quotes this machine's timings
(those live in `docs/performance.md`)."""

import ast
import inspect
import pathlib
import re

import equinox as eqx
import pytest

import pixeldit_eqx as px


PACKAGE = pathlib.Path(px.__file__).parent
LAYERS = sorted(
    name for name in dir(px) if inspect.isclass(getattr(px, name)) and issubclass(getattr(px, name), eqx.Module)
)
# A time, a rate or a speed-up measured on some machine.
TIMING = re.compile(r"\b\d+(\.\d+)?\s*(ms|s|seconds|minutes|GFLOP/s)\b|\d(\.\d+)?x (faster|slower)|% (faster|slower)")


def test_the_layers_are_found():
    assert {"PixelDiT", "PixelDiT2", "RMSNorm", "BlockStack", "DiTBlock", "RotaryAttention"} <= set(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_public_layer_lists_every_constructor_argument(name):
    cls = getattr(px, name)
    doc = inspect.getdoc(cls) or ""
    assert "**Arguments:**" in doc, f"{name}: no `**Arguments:**` list"
    arguments = doc.split("**Arguments:**", 1)[1]
    missing = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and f"`{p}`" not in arguments]
    assert not missing, f"{name}: arguments not documented: {missing}"


def _docstrings():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield f"{path.relative_to(PACKAGE)}:{getattr(node, 'name', '<module>')}", doc


def test_no_docstring_quotes_a_timing():
    found = [(where, m.group(0)) for where, doc in _docstrings() for m in TIMING.finditer(doc)]
    assert not found, found


def test_the_timing_pattern_finds_timings():
    """The check above would see the kind of sentence it forbids."""
    for text in ("compiles in about 2 s", "10.1 ms / example", "1.3x faster", "3-5% faster", "176.9 GFLOP/s"):
        assert TIMING.search(text), text
    for text in ("(B, 3, 256, 256)", "max period 10", "rows", "`x` is 2x2"):
        assert not TIMING.search(text), text

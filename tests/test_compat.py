"""What differs between jax versions: compile options an XLA does not know are dropped,
construction works with and without `_INIT_CPU_OPTIONS`, and the glibc allocator calls
degrade to a no-op where glibc is missing."""

import ctypes
import pathlib
import re
import tomllib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _compat, _model, runtime

from .helpers import SMALL_C2I


UNKNOWN = "xla_no_such_option_in_any_version"
SMALL = SMALL_C2I | dict(in_channels=3, num_classes=3)


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(_compat, "_unknown_options", set())
    return _compat._unknown_options


def test_unknown_compile_option_is_dropped_and_remembered(fresh_cache):
    lowered = jax.jit(lambda x: 2 * x + 1).lower(jnp.ones(3))
    options = {"xla_backend_optimization_level": 0, UNKNOWN: False}
    with pytest.raises(Exception, match=f"No such compile option: '{UNKNOWN}'"):
        lowered.compile(compiler_options=options)  # what XLA does with it unasked
    out = _compat.compile_lowered(lowered, options)(jnp.arange(3.0))
    np.testing.assert_array_equal(out, [1.0, 3.0, 5.0])
    assert fresh_cache == {UNKNOWN}
    assert options == {"xla_backend_optimization_level": 0, UNKNOWN: False}  # the caller's dict is untouched

    calls = []

    class Recording:
        def compile(self, compiler_options):
            calls.append(dict(compiler_options))
            return lowered.compile(compiler_options=compiler_options)

    _compat.compile_lowered(Recording(), options)
    assert calls == [{"xla_backend_optimization_level": 0}]  # found once, never sent again


def test_other_compile_errors_still_raise(fresh_cache):
    lowered = jax.jit(lambda x: x + 1).lower(jnp.ones(3))
    with pytest.raises(Exception, match="xla_backend_optimization_level"):
        _compat.compile_lowered(lowered, {"xla_backend_optimization_level": "fast"})
    assert fresh_cache == set()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="_INIT_CPU_OPTIONS apply on CPU only")
def test_construction_with_and_without_init_options(monkeypatch, fresh_cache):
    """A model builds with `_INIT_CPU_OPTIONS` plus an option no XLA knows, and with no
    options at all, to the same parameters."""
    monkeypatch.setattr(_model, "_INIT_CPU_OPTIONS", {**_model._INIT_CPU_OPTIONS, UNKNOWN: True})
    with_options = px.PixelDiT(**SMALL, key=jr.key(0))
    assert UNKNOWN in fresh_cache
    monkeypatch.setattr(_model, "_INIT_CPU_OPTIONS", {})
    without = px.PixelDiT(**SMALL, key=jr.key(0))
    leaves_a = jax.tree.leaves(eqx.filter(with_options, eqx.is_array))
    leaves_b = jax.tree.leaves(eqx.filter(without, eqx.is_array))
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_allocator_calls_are_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.tune_cpu_allocator() is False
    assert runtime.release_free_memory() is False


@pytest.mark.parametrize(
    "platform, cdll",
    [
        ("darwin", None),
        ("linux", "missing"),  # no C library to open
        ("linux", "musl"),  # a C library without glibc's functions
    ],
)
def test_glibc_lookup_degrades_to_none(monkeypatch, platform, cdll):
    class Musl:
        pass

    def fake_cdll(name):
        if cdll == "missing":
            raise OSError(f"{name}: cannot open shared object file")
        return Musl()

    monkeypatch.setattr(runtime.sys, "platform", platform)
    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    assert runtime._glibc.__wrapped__() is None


def test_oldest_constraints_pin_every_declared_minimum():
    """`nox -s tests-oldest` installs exactly the lower bounds pyproject.toml declares for
    the package, its train/safetensors extras and the test tools."""
    root = pathlib.Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {}
    for extra in [
        project["dependencies"],
        *(project["optional-dependencies"][k] for k in ("train", "safetensors", "test")),
    ]:
        for requirement in extra:
            name, low = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
            declared[name] = low
    pins = {}
    for line in (root / "tests" / "constraints-oldest.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    assert pins.pop("jaxlib") == pins["jax"]
    assert {k: pins.get(k) for k in declared} == {k: v + ".0" * (2 - v.count(".")) for k, v in declared.items()}
    assert set(pins) == set(declared)


def test_benchmark_probes_xla_flags_before_using_them():
    """An XLA flag this jaxlib does not know aborts a process; the benchmark asks first."""
    from tests.benchmarks.bench import xla_knows_flags

    assert xla_knows_flags("--xla_force_host_platform_device_count=2")
    assert not xla_knows_flags("--xla_no_such_flag_in_any_version=1")


def test_pre_commit_runs_the_ruff_that_nox_lint_pins():
    """`.pre-commit-config.yaml` and `nox -s lint` check with the same ruff version."""
    root = pathlib.Path(__file__).resolve().parent.parent
    (pinned,) = re.findall(r'RUFF = "ruff==([0-9.]+)"', (root / "noxfile.py").read_text())
    (rev,) = re.findall(r"ruff-pre-commit\n\s+rev: v([0-9.]+)", (root / ".pre-commit-config.yaml").read_text())
    assert rev == pinned

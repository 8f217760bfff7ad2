"""Sessions that CI and developers share: `nox -s tests`, `nox -s lint`, `nox -s digits`, ...

Sessions without a version run on the interpreter that runs nox (any Python >= 3.11).
`tests-newest-3.1x`, `tests-oldest` and `smoke-3.1x` name their interpreter; one that is
missing is an error, not a skip.
"""

import os
import pathlib
import shutil
import tempfile

import nox


nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

SUPPORTED = ["3.11", "3.12", "3.13"]
ROOT = pathlib.Path(__file__).parent
# The lowest version of every dependency pyproject.toml declares, pinned with `==`.
OLDEST = ROOT / "tests" / "constraints-oldest.txt"
_VERSIONS = (
    "import sys, jax, jaxlib, equinox, optax, numpy; "
    "print('python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__, "
    "'| equinox', equinox.__version__, '| optax', optax.__version__, '| numpy', numpy.__version__)"
)
# The suite runs in parallel processes (pytest-xdist, a tool of these sessions rather than a
# declared dependency): most of its time is single-threaded compilation.
XDIST = "pytest-xdist>=3.8"
# The checkers' versions, pinned: `.pre-commit-config.yaml` runs the same ruff.
RUFF = "ruff==0.17.6"
PYRIGHT = "pyright[nodejs]==1.1.414"
SUITE = ("pytest", "-n", str(min(4, os.cpu_count() or 1)), "-m", "not slow and not docs")
# The dependency-version runs compile at XLA's lowest backend optimisation level: compiling
# is most of the suite's time, and what they check (APIs, parity within tolerance) does not
# depend on LLVM's optimisations. `nox -s tests` keeps the default level users run.
FAST_COMPILE = "--xla_backend_optimization_level=0"
_PROBE = (
    "import os, subprocess, sys; "
    "env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + sys.argv[1]).strip()); "
    "code = 'import jax.numpy as jnp; jnp.zeros(1).block_until_ready()'; "
    "print(subprocess.run([sys.executable, '-c', code], env=env, capture_output=True).returncode == 0)"
)


def _fast_compile_env(session: nox.Session) -> dict[str, str]:
    """`XLA_FLAGS` with `FAST_COMPILE` added where this jaxlib knows the flag (XLA aborts
    a process on an unknown one), else unchanged."""
    known = session.run("python", "-c", _PROBE, FAST_COMPILE, silent=True)
    if known is None:  # `nox --install-only`: nothing runs
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    if str(known).strip().endswith("True"):
        flags = f"{flags} {FAST_COMPILE}".strip()
        session.log(f"XLA_FLAGS={flags!r}")
    else:
        session.log(f"this jaxlib does not know {FAST_COMPILE}: the default optimisation level")
    return {"XLA_FLAGS": flags}


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite with jaxtyping + beartype shape checking on (slow tests excluded)."""
    session.install("-e", ".[test]", XDIST)
    session.run(*SUITE, *session.posargs)


@nox.session(name="tests-newest", python=SUPPORTED)
def tests_newest(session: nox.Session) -> None:
    """The suite with the newest jax, equinox and optax the registry offers for this Python
    (compiled at XLA's lowest optimisation level, `FAST_COMPILE`)."""
    session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]", XDIST)
    session.run("python", "-c", _VERSIONS)
    session.run(*SUITE, *session.posargs, env=_fast_compile_env(session))


@nox.session(name="tests-oldest", python=SUPPORTED[0])
def tests_oldest(session: nox.Session) -> None:
    """The suite with the lowest versions pyproject.toml declares (`tests/constraints-oldest.txt`),
    on the oldest supported Python (compiled at XLA's lowest optimisation level, `FAST_COMPILE`)."""
    session.install("-c", str(OLDEST), "-e", ".[test]", XDIST)
    session.run("python", "-c", _VERSIONS)
    session.run("python", "tests/check_pins.py", str(OLDEST))
    session.run(*SUITE, *session.posargs, env=_fast_compile_env(session))


@nox.session(python=SUPPORTED, reuse_venv=False)
def smoke(session: nox.Session) -> None:
    """A wheel of the checkout, installed in a fresh venv with the newest dependencies,
    runs `tests/smoke.py` outside the checkout (build, jit, vmap, train step, load, sample)."""
    outside = pathlib.Path(tempfile.mkdtemp(prefix="pixeldit-smoke-"))
    session.run("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(outside), str(ROOT))
    (wheel,) = outside.glob("pixeldit_eqx-*.whl")
    session.install(f"{wheel}[train,safetensors]")
    shutil.copy(ROOT / "tests" / "smoke.py", outside)
    session.chdir(outside)
    session.run("python", "-c", _VERSIONS)
    session.run("python", "smoke.py", str(ROOT / "tests" / "fixtures" / "reference"))
    shutil.rmtree(outside)


@nox.session
def slow(session: nox.Session) -> None:
    """End-to-end runs marked `slow` (the digits job's quality bar, long trainings)."""
    session.install("-e", ".[test,examples]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright on the package, with every optional dependency installed: zero errors."""
    session.install("-e", ".[test,examples]", PYRIGHT)
    session.run("pyright", "pixeldit_eqx", *session.posargs)


@nox.session
def digits(session: nox.Session) -> None:
    """The main job: train a small PixelDiT on scikit-learn's digits and sample a grid."""
    session.install("-e", ".[examples]")
    session.run("python", "examples/digits.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed, compile time and memory benchmark; prints a table (see README)."""
    session.install("-e", ".[test]")
    session.run("python", "tests/benchmarks/bench.py", *session.posargs)


@nox.session
def notebooks(session: nox.Session) -> None:
    """Re-execute the example notebooks with small settings through nbmake.

    nbmake runs each notebook on a copy: the committed outputs are left alone. The
    notebooks check their own shapes (`%jaxtyping.typechecker`), so the jaxtyping pytest
    plugin is switched off, and with it the `--jaxtyping-packages` of the shared addopts.
    `PIXELDIT_NOTEBOOK_SMALL=0 nox -s notebooks` runs them with their full settings.
    """
    session.install("-e", ".[test,examples,notebooks]")
    env = {"PIXELDIT_NOTEBOOK_SMALL": "1"}
    session.run(
        "pytest",
        "--nbmake",
        "-p",
        "no:jaxtyping",
        "-o",
        "addopts=-p no:cacheprovider",
        "examples/",
        *session.posargs,
        env=env | dict(os.environ),
    )


@nox.session
def fuzz(session: nox.Session) -> None:
    """A longer fuzz campaign of the checkpoint loaders (20x the CI cases; `PIXELDIT_FUZZ_SCALE`,
    `PIXELDIT_FUZZ_SEED` to change), in a memory-limited subprocess."""
    session.install("-e", ".[test]")
    env = {"PIXELDIT_FUZZ_SCALE": os.environ.get("PIXELDIT_FUZZ_SCALE", "20")}
    session.run("pytest", "tests/test_fuzz.py", *session.posargs, env=env)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site: `mkdocs build --strict` into `site/` (a broken cross-reference
    or a public name without a docstring fails it), then `tests/test_docs_site.py` opens it
    in headless chromium (Debian's `/usr/bin/chromium`; `.ci/run` installs it when missing).
    """
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})
    env = {"PIXELDIT_DOCS_SITE": "site"}
    session.run("pytest", "-m", "docs", "tests/test_docs_site.py", *session.posargs, env=env)

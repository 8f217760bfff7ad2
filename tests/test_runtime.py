"""`pixeldit_eqx.runtime`: allocator settings, checked in fresh processes (they are
process-wide) by the page faults and resident memory they change."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from pixeldit_eqx import runtime


linux_glibc = pytest.mark.skipif(runtime._glibc() is None, reason="needs Linux with glibc")


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FAULTS = """
import json, resource
import jax, jax.numpy as jnp
from pixeldit_eqx import runtime
applied = runtime.tune_cpu_allocator() if TUNE else None
x = jnp.ones((3072, 3072), jnp.float32)  # the product is a fresh 36 MiB buffer per call
f = jax.jit(lambda a: a @ a)
for _ in range(3):
    jax.block_until_ready(f(x))
faults = []
for _ in range(8):  # now and then a tuned call still faults afresh: take the best of 8
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(x)
    jax.block_until_ready(out)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del out
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


@pytest.mark.default_only
@linux_glibc
def test_tuned_allocator_reuses_pages_across_calls():
    pages = 3072 * 3072 * 4 // 4096
    default = _run("TUNE = False\n" + _FAULTS)
    tuned = _run("TUNE = True\n" + _FAULTS)
    assert default["faults"] > pages // 2  # every call faults in its output afresh
    assert tuned["applied"] is True
    assert tuned["faults"] < pages // 20


@linux_glibc
def test_release_free_memory_returns_scattered_free_heap():
    out = _run(
        """
        import json
        from pixeldit_eqx import runtime

        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

        runtime.tune_cpu_allocator()
        blocks = [bytearray(4000) for _ in range(50_000)]  # ~200 MiB in small heap blocks
        del blocks[:-1]  # all free but the last, which pins the top of the heap
        before = rss()
        released = runtime.release_free_memory()
        print(json.dumps({"released": released, "before": before, "after": rss()}))
        """
    )
    assert out["released"] is True
    assert out["before"] - out["after"] > 100


def test_tune_cpu_allocator_rejects_bad_threshold():
    with pytest.raises(ValueError, match="trim_threshold"):
        runtime.tune_cpu_allocator(trim_threshold=-1)


def test_release_after_compile_runs_after_each_long_compile(monkeypatch):
    """Importing the package turns it on; the listener sees this jax's compile event."""
    x = jnp.ones(7)
    calls = []
    monkeypatch.setattr(runtime, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(runtime, "_LONG_COMPILE_S", 0.0)
    jax.jit(lambda x: x * 3.0 + 1.0).lower(x).compile()
    assert len(calls) == 1
    monkeypatch.setattr(runtime, "_LONG_COMPILE_S", 1e9)  # a short compile: nothing to return
    jax.jit(lambda x: x * 5.0 - 1.0).lower(x).compile()
    assert len(calls) == 1
    monkeypatch.setattr(runtime, "_LONG_COMPILE_S", 0.0)
    try:
        runtime.release_after_compile(False)
        jax.jit(lambda x: x * 7.0 - 2.0).lower(x).compile()
        assert len(calls) == 1
    finally:
        runtime.release_after_compile(True)
    jax.jit(lambda x: x * 9.0 - 3.0).lower(x).compile()
    assert len(calls) == 2


@linux_glibc
def test_release_after_compile_returns_the_free_heap():
    """The compile event returns scattered free heap memory, unless switched off."""
    code = """
        import json
        import jax.monitoring
        from pixeldit_eqx import runtime

        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

        runtime.release_after_compile(ON)
        runtime.tune_cpu_allocator()
        blocks = [bytearray(4000) for _ in range(50_000)]  # ~200 MiB in small heap blocks
        del blocks[:-1]  # all free but the last, which pins the top of the heap
        before = rss()
        jax.monitoring.record_event_duration_secs(runtime._COMPILE_EVENT, 2.0)
        print(json.dumps({"before": before, "after": rss()}))
        """
    on = _run(code.replace("ON", "True"))
    off = _run(code.replace("ON", "False"))
    assert on["before"] - on["after"] > 100
    assert off["before"] - off["after"] < 20


def test_release_after_compile_rejects_a_non_bool():
    # The test suite's type checker stops it first; without one, the ValueError does.
    with pytest.raises((ValueError, TypeCheckError), match="enabled"):
        runtime.release_after_compile("yes")  # type: ignore[arg-type]
    assert runtime._release["on"] is True

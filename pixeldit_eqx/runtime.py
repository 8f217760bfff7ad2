"""Process settings for fast, lean CPU runs (Linux with glibc; a no-op elsewhere).

XLA:CPU allocates a program's temporary buffer afresh on every call. glibc serves blocks
over 32 MiB with new `mmap` pages and unmaps them on free, so each call of a jitted
training step page-faults its whole working set again (`docs/performance.md` has the
benchmark's counts and times).
`tune_cpu_allocator` keeps large blocks in the heap, so steps reuse their pages. The
alternative that needs no code and keeps no freed memory is a setting of glibc (>= 2.35)
read when the process starts: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py`
backs malloc's large blocks with transparent huge pages (where the kernel's
`/sys/kernel/mm/transparent_hugepage/enabled` is not `never`), so a call faults its
buffer in 2 MiB at a time instead of 4 KiB. With `tune_cpu_allocator` as well, the heap
gets huge pages too, which ran fastest (`docs/performance.md`).

Compiling a large program leaves a few hundred MiB of freed memory scattered in the
heap (XLA's fusion emitters); `release_free_memory` hands it back to the system. Importing
`pixeldit_eqx` turns on `release_after_compile`, which does that after every long compile,
so a process's peak memory is not the compiler's scratch plus the first steps' buffers
(`release_after_compile(False)` turns it off).

```python
from pixeldit_eqx import runtime

runtime.tune_cpu_allocator()  # once, at the start of the process
model = ...  # build or load; then hand back the host copies loading left behind
runtime.release_free_memory()
```

Both change only how this process's C allocator hands memory to the system, never
results. They are process-wide; call them from the application, not from a library.
"""

import ctypes
import ctypes.util
import functools
import sys

import jax.monitoring


__all__ = ["release_after_compile", "release_free_memory", "tune_cpu_allocator"]

# glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (not musl)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(trim_threshold: int = 2**30) -> bool:
    """Serve every allocation from the heap (no per-block `mmap`) and return freed heap
    memory to the system only beyond `trim_threshold` bytes at its top.

    Repeated calls of a compiled program then mostly reuse the same pages instead of
    faulting in fresh ones; now and then a call still gets fresh pages (measured on a
    36 MiB output: at most 96 faults in the best of 8 calls, but single calls may fault
    all 9217 pages, as every call does by default). Memory freed after a peak stays with
    the process (up to `trim_threshold` at the top of the heap) until
    `release_free_memory`.

    **Returns:** True when applied (Linux with glibc), False otherwise.
    """
    if not 0 <= trim_threshold < 2**31:
        raise ValueError(f"tune_cpu_allocator: `trim_threshold` must be in [0, 2**31), got {trim_threshold}.")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_free_memory() -> bool:
    """Return the process's free heap memory to the system (glibc `malloc_trim(0)`),
    e.g. what compiling left behind.

    **Returns:** True when supported (Linux with glibc), False otherwise.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# jax records this event (in seconds) after each XLA compile, in every supported version.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Compiles shorter than this (eager ops, small programs) leave little scratch behind.
_LONG_COMPILE_S = 0.2
_release = {"on": False, "registered": False}


def _after_compile(event: str, duration_secs: float, **kwargs: object) -> None:
    if event == _COMPILE_EVENT and duration_secs >= _LONG_COMPILE_S and _release["on"]:
        release_free_memory()


def _release_after_one_off() -> None:
    """Called when a one-off program has run: its temporaries, freed in pieces glibc
    keeps, go back to the system when `release_after_compile` is on."""
    if _release["on"]:
        release_free_memory()


def release_after_compile(enabled: bool = True) -> bool:
    """Return the process's free heap memory to the system after every long XLA compile
    (not after the small ones of eager operations); on from importing `pixeldit_eqx`,
    `False` turns it off.

    The compiler's scratch is freed in scattered pieces that glibc keeps; without this,
    the first calls of a freshly compiled program put their buffers on top of it.
    Results never change.

    **Returns:** True when it acts (Linux with glibc), False otherwise.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"release_after_compile: `enabled` must be a bool, got enabled={enabled!r}.")
    _release["on"] = enabled
    if not _release["registered"]:
        jax.monitoring.register_event_duration_secs_listener(_after_compile)
        _release["registered"] = True
    return enabled and _glibc() is not None


release_after_compile()

"""Speed, compile-time and memory benchmark of pixeldit_eqx.

Run with `nox -s bench`, or directly:

    python tests/benchmarks/bench.py [--out out/bench] [--quick] [--xl auto|skip|forward|full]
        [--torch-python PYTHON --torch-reference DIR]

What it measures, on whatever device JAX uses (CPU or one accelerator), after printing the
CPU's model and the flags that decide XLA:CPU's matmul paths (AVX-512, bf16, AMX):

- **the machine's matmul rate**: a jitted 2048x2048 matmul in the benchmark's dtype,
  sampled once before every timed model call, so that rate and model share the same
  conditions (other processes, clocks); the ratios use the median rate of the samples
  taken during that measurement.
- **speed** of the mid-size config (64x64x3 and 128x128x3 images, patch 8, hidden 256,
  4 heads, 6 patch + 2 pixel blocks, pixel width 16, batch 8, c2i, float32): median time
  of the forward pass and of forward+backward (`value_and_grad` of an MSE loss in the
  parameters) after a warm-up, per batch and per example; achieved FLOP/s from the
  analytic count of `flops.py` (matmuls and attention, as PyTorch's FlopCounterMode
  counts them); and that as a fraction of the matmul rate. At 128x128 also with
  `checkpoint=True` (rematerialised blocks). On CPU the 64x64 and 128x128 cases run
  twice: in this (default) process, and in a subprocess that first calls
  `pixeldit_eqx.runtime.tune_cpu_allocator()` (no per-call page faults), and in one
  with XLA's dots routed through XNNPACK one at a time (`XNN_DOTS`, when this XLA knows
  the flags), for comparison. Where glibc (>= 2.35) and the kernel offer transparent huge
  pages, also in a subprocess started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  (`HUGE_PAGES`): the default allocator with huge pages behind its large blocks, so a call
  faults its temporary buffer in 2 MiB at a time instead of 4 KiB.
- **bf16 compute**: forward and forward+backward with `compute_dtype=jnp.bfloat16`
  against float32, same weights, timed alternately; the target on a CPU with bf16 dot
  instructions is 1.5x at 128x128.
- **the eager PyTorch reference** (with `--torch-python`, a Python that has torch, and
  `--torch-reference`, a directory holding the reference's `pixdit_core`): the same
  passes and the peak memory of 10 steps, by `torch_reference.py`, in the side-by-side
  table with this package's rows.
- **where the time goes**: at 64x64 and 128x128, forward and forward+backward of the
  whole model and of `model.patch_level` alone (its output's mean square as the loss),
  timed alternately in one process; the difference is the pixel path (pixel embedder,
  PiT blocks, final layer, unpatchify), reported as a share of the whole, next to its
  share of the analytic FLOPs (about half: the per-pixel adaLN matmuls), and the time of
  those adaLN matmuls alone at the model's shapes (a floor under the pixel path).
- **compile time** of `jit(forward+backward)` at patch depth 2, 6 and 24 (same widths);
  with the block stacks run by `lax.scan` it should not grow with depth.
- **peak memory** of a fresh process that builds the model and runs 10
  forward+backward steps (CPU: peak resident set, `VmHWM`; accelerators: the device's
  `peak_bytes_in_use`), with the resident set after each phase; at 128x128 with
  `checkpoint` off and on. Also XLA's own temp-buffer size for each program. On CPU
  also with the allocator tuned and `runtime.release_free_memory()` after loading (or
  building) and after compiling, for both ways of building the model; with the
  constructor in a process started with `GLIBC_TUNABLES=HUGE_PAGES`; without
  `runtime.release_after_compile` (on from import); and the whole training recipe
  (the constructor with `checkpoint="lean"`, AdamW and an EMA, `train.jit_steps`,
  `train.fit`), also compiled with XLA's default options (`compiler_options={}`) instead
  of the package's; at 128x128 also with `checkpoint="lean"`.
- **training step**: AdamW + EMA under `eqx.filter_jit`, `train.jit_step` and
  `train.jit_steps` (4 steps per call), the last also with `compiler_options={}`, ms per
  step, timed alternately in this process.
- **attention-shaped batched matmul**: the rate of the attention scores' matmul at the
  128x128 shape (32 heads-times-examples of 256x64 @ 64x256), against the matmul rate.
  XLA:CPU runs a matmul with batch dimensions on one thread; this line shows what that
  leaves of the machine.
- **attention**: forward and forward+backward of one attention at the 128x128 shape,
  `jax.nn.dot_product_attention` against the heads-major layout that `attend` takes on
  the CPU, timed alternately.
- **SwiGLU gating**: forward+backward of a scanned stack of 6 SwiGLU blocks with
  `_ops.silu_gate` and with autodiff of `jax.nn.silu(gate) * value`.
- **program size**: bytes of the StableHLO text of `jax.jit(forward).lower(...)` at
  64x64 and 512x512 (tables are computed in the program, not baked in as constants).
- **PixelDiT-XL** (the released c2i network) at 256x256, batch 1: forward, and
  forward+backward unless `--xl forward` (the default on CPU, where it is slow).

Parameters for timing are random (scaled to keep activations O(1)) and loaded through
`pixeldit_eqx.load_state_dict` into a skeleton from `eqx.filter_eval_shape`: the values
do not change the work, and that avoids compiling the initialisers. The memory run of
the default case builds the model both ways: from a state dict (as when loading
weights) and with the constructor (as a training script from scratch does).

Results are printed as tables and written to `<out>/results.json` and
`<out>/results.md`. `tests/benchmarks/bf16_dots.py` times XLA's matmuls by operand and
result dtype at the model's shapes (why bf16 Linears ask for a float32 result);
`tests/benchmarks/pixel_locality.py` the memory rate and the per-pixel MLP in
cache-sized chunks.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pixeldit_eqx as px  # noqa: E402
from pixeldit_eqx import _attention, _ops  # noqa: E402
from tests.benchmarks.flops import pixeldit_flops  # noqa: E402
from tests.benchmarks.mid import BATCH, MID  # noqa: E402


MATMUL_N = 2048
# The memory row of the recipe compiled with XLA's default options instead of the package's.
RECIPE_XLA_OPTIONS = "train.fit recipe, compiler_options={}"
# Steps per compiled call of the README's training recipe (`train.jit_steps`).
STEPS_PER_CALL = 4
# XLA:CPU's dots through XNNPACK one by one instead of YNNPACK fusions: an XLA setting of
# the process (experimental flags, renamed between versions), shown for comparison.
XNN_DOTS = (
    "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT --xla_cpu_experimental_ynn_fusion_type="
)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


# glibc's tunable that backs malloc's large blocks with transparent huge pages (read at
# process start, so only a fresh process can have it).
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_available() -> bool:
    """Whether a process started with `GLIBC_TUNABLES=HUGE_PAGES` gets huge pages: glibc
    >= 2.35 (older ones ignore the tunable) and transparent huge pages not off."""
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except (OSError, ValueError):  # not Linux with glibc
        return False
    return lib == "glibc" and (major, minor) >= (2, 35) and "[never]" not in mode


def _rss_mib() -> dict[str, float]:
    """Resident set now and its peak (Linux `/proc/self/status`), in MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:  # not Linux
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _device_peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


# The /proc/cpuinfo flags that decide XLA:CPU's matmul paths.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and which of `CPU_FLAGS` it has (Linux), else `platform`'s."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def has_bf16_dots(cpu: dict[str, Any]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu["flags"]))


def random_model(
    config: dict, variant: str, *, checkpoint: bool | str = False, seed: int = 0, compute_dtype: Any = None
) -> Any:
    """A model with random parameters, without running (or compiling) initialisers."""
    skeleton = eqx.filter_eval_shape(
        lambda: px.build(config, variant, key=jax.random.key(0), checkpoint=checkpoint, compute_dtype=compute_dtype)
    )
    rng = np.random.default_rng(seed)
    weights = {}
    for key, spec in px.state_dict(skeleton).items():
        shape = tuple(spec.shape)
        if len(shape) >= 2:
            w = rng.standard_normal(shape, dtype=np.float32)
            weights[key] = w * np.float32(shape[-1] ** -0.5)
        elif key.endswith("bias"):
            weights[key] = np.zeros(shape, np.float32)
        else:
            weights[key] = np.ones(shape, np.float32)
    return px.load_state_dict(skeleton, weights)


def inputs(config: dict, variant: str, hw: int, batch: int, text_len: int = 16):
    key = jax.random.key(1)
    x = jax.random.normal(key, (batch, config["in_channels"], hw, hw), jnp.float32)
    t = jnp.linspace(0.1, 0.9, batch, dtype=jnp.float32)
    if variant == "c2i":
        cond = jnp.arange(batch, dtype=jnp.int32) % config["num_classes"]
    else:
        cond = jax.random.normal(key, (batch, text_len, config["txt_embed_dim"]))
    return x, t, cond


def programs(static: Any):
    """`forward(params, x, t, cond)` and `forward_backward` (value and gradient of an
    MSE loss in the parameters), both batched with `vmap`, not yet jitted."""

    def forward(params, x, t, cond):
        return jax.vmap(eqx.combine(params, static))(x, t, cond)

    def loss(params, x, t, cond):
        return jnp.mean((forward(params, x, t, cond) - x) ** 2)

    return forward, jax.value_and_grad(loss)


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class MatmulRate:
    """The device's dense matmul rate, sampled between model calls."""

    def __init__(self, n: int, dtype: Any = jnp.float32):
        k1, k2 = jax.random.split(jax.random.key(2))
        self.a = jax.random.normal(k1, (n, n), dtype)
        self.b = jax.random.normal(k2, (n, n), dtype)
        self.fn = jax.jit(jnp.matmul)
        self.n = n
        self.flops = 2 * n**3
        self.samples: list[float] = []
        for _ in range(3):
            self.sample()  # warm-up
        self.samples.clear()

    def sample(self) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(self.a, self.b))
        rate = self.flops / (time.perf_counter() - t0)
        self.samples.append(rate)
        return rate


def time_calls(compiled: Any, args: tuple, repeats: int, mm: MatmulRate) -> dict[str, Any]:
    """Median wall time of `compiled(*args)` after one warm-up call, each call preceded
    by one matmul-rate sample."""
    jax.block_until_ready(compiled(*args))
    times, rates, faults = [], [], []
    for _ in range(repeats):
        rates.append(mm.sample())
        faults_before = _minor_faults()
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        faults.append(_minor_faults() - faults_before)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "matmul_flops_per_s": statistics.median(rates),
        "minor_faults": statistics.median(faults),
    }


def _minor_faults() -> int:
    """This process's minor page faults so far (each a page mapped on first touch); 0
    where the platform does not count them."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def batched_matmul_case(mm: MatmulRate, repeats: int = 21) -> dict[str, Any]:
    """Rate of the attention scores' batched matmul at the mid config's 128x128 shape
    (batch 8 x 4 heads, 256 tokens, head width 64), against the dense matmul rate: XLA:CPU
    runs a matmul with batch dimensions on one thread, which bounds the attention."""
    k1, k2 = jax.random.split(jax.random.key(3))
    q = jax.random.normal(k1, (BATCH * MID["num_groups"], 256, MID["hidden_size"] // MID["num_groups"]), mm.a.dtype)
    k = jax.random.normal(k2, q.shape, q.dtype)
    fn = jax.jit(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k))
    res = time_calls(fn, (q, k), repeats, mm)
    n, s, d = q.shape
    rate = 2 * n * s * s * d / res["median_s"]
    return {"shape": [n, s, d], "flops_per_s": rate, "fraction_of_matmul": rate / res["matmul_flops_per_s"]}


def compile_timed(fn: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
    try:
        info["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        pass
    return compiled, info


# --------------------------------------------------------------------------------------
# Child process: peak memory of building a model and running forward+backward steps
# --------------------------------------------------------------------------------------


def memory_child(spec: dict) -> dict:
    if spec.get("tuned"):
        px.runtime.tune_cpu_allocator()
    if spec.get("keep_compile_scratch"):
        px.runtime.release_after_compile(False)
    phases = {"import": _rss_mib()}
    config, variant = spec["config"], spec["variant"]
    if spec.get("recipe"):
        return recipe_memory(spec, phases)
    if spec["init"] == "constructor":
        model = px.build(config, variant, key=jax.random.key(0), checkpoint=spec["checkpoint"])
    else:
        model = random_model(config, variant, checkpoint=spec["checkpoint"])
    jax.block_until_ready(model)
    if spec.get("tuned"):
        px.runtime.release_free_memory()  # the host copies the weights were loaded from
    phases["build"] = _rss_mib()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    args = inputs(config, variant, spec["hw"], spec["batch"])
    _, fwd_bwd = programs(static)
    compiled, info = compile_timed(fwd_bwd, params, *args)
    phases["compile"] = _rss_mib()
    if spec.get("tuned"):
        px.runtime.release_free_memory()  # what compiling left in the heap
    for _ in range(spec["steps"]):
        loss, grads = compiled(params, *args)
        jax.block_until_ready(grads)
    phases["steps"] = _rss_mib()
    return {
        "peak_rss_mib": phases["steps"]["VmHWM"],
        "device_peak_mib": _device_peak_mib(),
        "phases": phases,
        "temp_mib": info.get("temp_mib"),
        "loss_finite": bool(jnp.isfinite(loss)),
    }


def recipe_memory(spec: dict, phases: dict) -> dict:
    """Peak memory of the training recipe: the constructor, `train.init_train_state`
    (AdamW and an EMA), `make_train_step` under `train.jit_steps` (STEPS_PER_CALL steps per
    call; `spec["compiler_options"]` passed on), `train.fit` for `steps` steps; the peak of
    the steps after the first call (which compiles) is kept apart."""
    from pixeldit_eqx import train

    config, variant = spec["config"], spec["variant"]
    model = px.build(config, variant, key=jax.random.key(0), checkpoint=spec["checkpoint"])
    optimizer = train.default_optimizer(1e-4)
    state = train.init_train_state(model, optimizer, key=jax.random.key(1))
    del model
    jax.block_until_ready(state)
    phases["build"] = _rss_mib()
    x, _, y = inputs(config, variant, spec["hw"], spec["batch"])
    raw = train.make_train_step(train.c2i_loss, optimizer)
    step = train.jit_steps(raw, STEPS_PER_CALL, compiler_options=spec.get("compiler_options"))
    state, first = train.fit(step, state, lambda i: (x, y), num_steps=1, progress=False)
    phases["compile"] = _rss_mib()
    steps_peak = None
    if _reset_peak_rss():
        state, losses = train.fit(step, state, lambda i: (x, y), num_steps=spec["steps"] - 1, progress=False)
        phases["steps"] = _rss_mib()
        steps_peak = phases["steps"]["VmHWM"]
        peak = max(phases["compile"]["VmHWM"], steps_peak)
    else:  # no resettable peak: one figure for the whole run
        state, losses = train.fit(step, state, lambda i: (x, y), num_steps=spec["steps"] - 1, progress=False)
        phases["steps"] = _rss_mib()
        peak = phases["steps"]["VmHWM"]
    return {
        "peak_rss_mib": peak,
        "steps_peak_rss_mib": steps_peak,
        "device_peak_mib": _device_peak_mib(),
        "phases": phases,
        "temp_mib": None,
        "loss_finite": bool(np.isfinite(losses).all() and np.isfinite(first).all()),
    }


def _reset_peak_rss() -> bool:
    """Restart the process's `VmHWM` from its current RSS (Linux `clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def speed_child(spec: dict) -> list[dict]:
    """Mid-config speed cases in a fresh process: with `runtime.tune_cpu_allocator()`,
    or with the XLA flags `run_child` set."""
    if spec.get("tuned", True):
        px.runtime.tune_cpu_allocator()
    mm = MatmulRate(MATMUL_N)
    cases = [speed_case("mid", MID, "c2i", hw, BATCH, reps, mm) for hw, reps in spec["cases"]]
    for case in cases:
        case["allocator"] = spec.get("label", "tuned")
    return cases


def xla_knows_flags(flags: str) -> bool:
    """Whether this jaxlib's XLA accepts `flags` in XLA_FLAGS (an unknown flag aborts the
    process: XLA renames and removes flags between versions)."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    code = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300).returncode == 0


def run_child(spec: dict, timeout: float = 900, xla_flags: str | None = None, glibc_tunables: str | None = None) -> Any:
    """Run `memory_child` (or `speed_child`, for a spec with `speed`) in a fresh process,
    with `xla_flags` added to `XLA_FLAGS` and `glibc_tunables` to `GLIBC_TUNABLES`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), glibc_tunables)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Benchmark sections
# --------------------------------------------------------------------------------------


def speed_case(
    name: str,
    config: dict,
    variant: str,
    hw: int,
    batch: int,
    repeats: int,
    mm: MatmulRate,
    *,
    checkpoint: bool = False,
    backward: bool = True,
    text_len: int = 0,
) -> dict:
    model = random_model(config, variant, checkpoint=checkpoint)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    args = (params, *inputs(config, variant, hw, batch))
    forward, fwd_bwd = programs(static)
    flops = pixeldit_flops(config, variant, hw, hw, batch, text_len=text_len)
    out = {"case": name, "hw": hw, "batch": batch, "checkpoint": checkpoint}
    passes = [("forward", forward, flops["forward"])]
    if backward:
        passes.append(("forward_backward", fwd_bwd, flops["forward_backward"]))
    for pass_name, fn, n_flops in passes:
        compiled, info = compile_timed(fn, *args)
        res = time_calls(compiled, args, repeats, mm)
        rate = n_flops / res["median_s"]
        out[pass_name] = {
            **res,
            **info,
            "flops": n_flops,
            "flops_per_s": rate,
            "per_example_s": res["median_s"] / batch,
            "fraction_of_matmul": rate / res["matmul_flops_per_s"],
        }
        del compiled
    return out


def time_alternately(calls: dict[Any, tuple[Any, tuple]], repeats: int) -> dict[Any, list[float]]:
    """Wall times of each compiled `fn(*args)` in `calls`, one call of each in turn
    (`repeats` rounds after one warm-up call each): the programs share the conditions."""
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for fn, fn_args in calls.values():
        jax.block_until_ready(fn(*fn_args))
    for _ in range(repeats):
        for k, (fn, fn_args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[k].append(time.perf_counter() - t0)
    return times


def split_case(config: dict, variant: str, hw: int, batch: int, repeats: int) -> dict:
    """Forward and forward+backward of the whole model and of `patch_level` alone,
    timed alternately (one call of each in turn, medians): the pixel path's share."""
    model = random_model(config, variant)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    args = (params, *inputs(config, variant, hw, batch))
    forward, fwd_bwd = programs(static)

    def patch_forward(params, x, t, cond):
        return jax.vmap(eqx.combine(params, static).patch_level)(x, t, cond)

    def patch_loss(params, x, t, cond):
        return jnp.mean(patch_forward(params, x, t, cond) ** 2)

    fns = {
        ("forward", "model"): forward,
        ("forward", "patch_level"): patch_forward,
        ("forward_backward", "model"): fwd_bwd,
        ("forward_backward", "patch_level"): jax.value_and_grad(patch_loss),
    }
    calls = {k: (jax.jit(fn).lower(*args).compile(), args) for k, fn in fns.items()}
    # The floor under the pixel path: its per-pixel adaLN matmuls alone, at the model's
    # shapes (one block's; times `pixel_depth`). Forward: (B*L, D) @ (D, n_mod*p*p*D_pix);
    # backward: the input gradient and the weight gradient, each the same size.
    p2 = config["patch_size"] ** 2
    rows, width = batch * (hw // config["patch_size"]) ** 2, 6 * p2 * config["pixel_hidden_size"]
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    s_cond = jax.random.normal(k1, (rows, config["hidden_size"]))
    weight = jax.random.normal(k2, (width, config["hidden_size"]))
    g = jax.random.normal(k3, (rows, width))
    adaln = (s_cond, weight, g)
    calls[("forward", "adaln")] = (jax.jit(lambda s, w, g: s @ w.T).lower(*adaln).compile(), adaln)
    calls[("forward_backward", "adaln")] = (
        jax.jit(lambda s, w, g: (s @ w.T, g @ w, g.T @ s)).lower(*adaln).compile(),
        adaln,
    )
    times = time_alternately(calls, repeats)
    out: dict[str, Any] = {"hw": hw, "batch": batch}
    # The pixel path's share of the analytic FLOPs: the model without its PiT blocks
    # (pixel embedder and final layer are a few MFLOP) against the whole.
    flops = pixeldit_flops(config, variant, hw, hw, batch)
    patch_flops = pixeldit_flops({**config, "pixel_depth": 0}, variant, hw, hw, batch)
    for pass_name in ("forward", "forward_backward"):
        whole = statistics.median(times[(pass_name, "model")])
        patch = statistics.median(times[(pass_name, "patch_level")])
        adaln_s = config["pixel_depth"] * statistics.median(times[(pass_name, "adaln")])
        out[pass_name] = {
            "model_s": whole,
            "patch_level_s": patch,
            "pixel_path_share": (whole - patch) / whole,
            "pixel_path_flop_share": 1 - patch_flops[pass_name] / flops[pass_name],
            "adaln_matmuls_s": adaln_s,
            "adaln_share": adaln_s / whole,
        }
    return out


def dtype_case(config: dict, variant: str, hw: int, batch: int, repeats: int) -> dict:
    """Forward and forward+backward with float32 and with bfloat16 compute
    (`compute_dtype=jnp.bfloat16`, same weights), timed alternately: bf16's speedup."""
    args = inputs(config, variant, hw, batch)
    calls = {}
    for dtype_name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
        params, static = eqx.partition(random_model(config, variant, compute_dtype=dtype), eqx.is_inexact_array)
        forward, fwd_bwd = programs(static)
        for pass_name, fn in (("forward", forward), ("forward_backward", fwd_bwd)):
            calls[(pass_name, dtype_name)] = (jax.jit(fn).lower(params, *args).compile(), (params, *args))
    times = time_alternately(calls, repeats)
    out: dict[str, Any] = {"hw": hw, "batch": batch}
    for pass_name in ("forward", "forward_backward"):
        f32 = statistics.median(times[(pass_name, "float32")])
        bf16 = statistics.median(times[(pass_name, "bfloat16")])
        out[pass_name] = {"float32_s": f32, "bfloat16_s": bf16, "speedup": f32 / bf16}
    return out


def train_step_case(config: dict, hw: int, batch: int, repeats: int) -> dict:
    """The training step (AdamW, EMA) under `eqx.filter_jit`, under `train.jit_step` (the
    state donated), under `train.jit_steps` (donated, STEPS_PER_CALL steps per call),
    under `train.jit_steps` compiled with XLA's default options (`compiler_options={}`)
    and under `train.jit_steps` for the model built with `checkpoint="lean"` (the
    README's recipe): each runs STEPS_PER_CALL steps in turn, threading its own state;
    ms per step."""
    from pixeldit_eqx import train

    optimizer = train.default_optimizer(1e-4)
    step = train.make_train_step(train.c2i_loss, optimizer)
    x, _, y = inputs(config, "c2i", hw, batch)
    several = {
        "jit_steps": train.jit_steps(step, STEPS_PER_CALL),
        "jit_steps_xla_options": train.jit_steps(step, STEPS_PER_CALL, compiler_options={}),
        "jit_steps_lean": train.jit_steps(step, STEPS_PER_CALL),
    }
    runs = {"filter_jit": eqx.filter_jit(step), "jit_step": train.jit_step(step), **several}
    states = {
        k: train.init_train_state(
            random_model(config, "c2i", checkpoint="lean" if k == "jit_steps_lean" else False),
            optimizer,
            key=jax.random.key(1),
        )
        for k in runs
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round compiles and warms up
        for k in list(runs) if i % 2 else list(runs)[::-1]:
            t0 = time.perf_counter()
            if k in several:
                states[k], _ = several[k](states[k], [(x, y)] * STEPS_PER_CALL)
            else:
                for _ in range(STEPS_PER_CALL):
                    states[k], _ = runs[k](states[k], (x, y))
            jax.block_until_ready(states[k])
            if i:
                times[k].append((time.perf_counter() - t0) / STEPS_PER_CALL)
    plain, donated, per_call, xla_options, lean = (statistics.median(times[k]) for k in runs)
    return {
        "hw": hw,
        "batch": batch,
        "filter_jit_s": plain,
        "jit_step_s": donated,
        "jit_steps_s": per_call,
        "jit_steps_xla_options_s": xla_options,
        "speedup": plain / donated,
        "steps_speedup": plain / per_call,
        "options_speedup": xla_options / per_call,
        "jit_steps_lean_s": lean,
        "lean_speed": per_call / lean,
    }


def torch_case(python: str, reference: str, repeats: int) -> dict:
    """The eager PyTorch reference, timed by `torch_reference.py` under `python`."""
    cmd = [python, os.path.join(HERE, "torch_reference.py"), "--reference", reference, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"torch_reference.py failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _GatedMLPBlock(eqx.Module):
    """`x + SwiGLU(RMSNorm(x))` with a choice of gating, for the gating comparison."""

    norm: px.RMSNorm
    mlp: px.SwiGLU
    gating: Any = eqx.field(static=True)

    def __call__(self, x):
        linear, keep = _ops.linear, _ops.keep
        h = self.norm.apply(x)
        gate, value = keep(linear(self.mlp.w1, h)), keep(linear(self.mlp.w3, h))
        return x + keep(linear(self.mlp.w2, self.gating(gate, value)))


def gating_case(repeats: int, mm: MatmulRate) -> dict:
    """Forward+backward of a scanned stack of 6 SwiGLU blocks (mid widths, 8x256
    tokens) with `_ops.silu_gate` against autodiff of `jax.nn.silu(gate) * value`."""
    out = {}
    x = jax.random.normal(jax.random.key(3), (BATCH, 256, MID["hidden_size"]))
    for name, gating in (("silu_gate", _ops.silu_gate), ("jax.nn.silu", lambda g, v: jax.nn.silu(g) * v)):

        def make(key, gating=gating):
            return _GatedMLPBlock(px.RMSNorm(MID["hidden_size"]), px.SwiGLU(MID["hidden_size"], key=key), gating)

        params, static = eqx.partition(px.BlockStack(make, 6, key=jax.random.key(0)), eqx.is_inexact_array)

        def loss(params, x, static=static):
            return jnp.mean(jax.vmap(eqx.combine(params, static))(x) ** 2)

        compiled, _ = compile_timed(jax.value_and_grad(loss), params, x)
        out[name] = time_calls(compiled, (params, x), repeats, mm)["median_s"]
    out["speedup"] = out["jax.nn.silu"] / out["silu_gate"]
    return out


def attention_case(repeats: int) -> dict:
    """Forward and forward+backward of one attention at the 128x128 shape (8 examples of
    256 tokens, 4 heads of 64), per-example and vmapped as the model runs it:
    `jax.nn.dot_product_attention` against the heads-major layout `attend` takes on the
    CPU, float32, timed alternately."""
    heads = MID["num_groups"]
    shape = (BATCH, 256, heads, MID["hidden_size"] // heads)
    q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(5), 3))
    paths = {
        "dot_product_attention": lambda q, k, v: _attention._sdpa(q, k, v, None),
        "heads_major": lambda q, k, v: _attention._heads_major(q, k, v, None),
    }
    calls = {}
    for name, path in paths.items():
        batched = jax.vmap(path)
        calls[("forward", name)] = (jax.jit(batched), (q, k, v))
        loss = lambda q, k, v, batched=batched: jnp.sum(batched(q, k, v) ** 2)  # noqa: E731
        calls[("forward_backward", name)] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), (q, k, v))
    times = time_alternately(calls, repeats)
    out: dict[str, Any] = {"shape": list(shape)}
    for pass_name in ("forward", "forward_backward"):
        fused = statistics.median(times[(pass_name, "dot_product_attention")])
        ours = statistics.median(times[(pass_name, "heads_major")])
        out[pass_name] = {"dot_product_attention_s": fused, "heads_major_s": ours, "speedup": fused / ours}
    return out


def compile_depths(depths: tuple[int, ...], hw: int) -> dict:
    """Lower+compile time of jit(forward+backward) by patch depth, at the mid widths."""
    # Warm the compiler (first-use initialisation) so that no depth pays for it.
    jax.jit(lambda a: jnp.sin(a) @ a).lower(jnp.ones((8, 8))).compile()
    out = {}
    for depth in depths:
        config = {**MID, "patch_depth": depth}
        skeleton = eqx.filter_eval_shape(lambda config=config: px.build(config, "c2i", key=jax.random.key(0)))
        params, static = eqx.partition(skeleton, lambda a: isinstance(a, jax.ShapeDtypeStruct))
        args = abstract(inputs(config, "c2i", hw, BATCH))
        _, fwd_bwd = programs(static)
        _, info = compile_timed(fwd_bwd, params, *args)
        out[depth] = info
    return out


def program_sizes(sizes: tuple[int, ...], config: dict) -> dict:
    """Bytes of StableHLO text of jit(forward) by image side (no compilation)."""
    skeleton = eqx.filter_eval_shape(lambda: px.build(config, "c2i", key=jax.random.key(0)))
    params, static = eqx.partition(skeleton, lambda a: isinstance(a, jax.ShapeDtypeStruct))
    forward, _ = programs(static)
    out = {}
    for hw in sizes:
        args = abstract(inputs(config, "c2i", hw, 1))
        out[hw] = len(jax.jit(forward).lower(params, *args).as_text())
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def comparison(results: dict) -> list[str]:
    """The side-by-side table: ms per batch of 8 for each implementation and setting."""
    speed = {(c["hw"], c.get("allocator")): c for c in results["speed"] if c["case"] == "mid" and not c["checkpoint"]}
    memory = {r["label"]: r["peak_rss_mib"] for r in results["memory"]}
    cells = ("64px fwd", "64px fwd+bwd", "128px fwd", "128px fwd+bwd")
    rows = []
    for label, allocator, mem in (
        ("pixeldit_eqx", None, "mid 64px b8 (constructor init)"),
        ("pixeldit_eqx, `tune_cpu_allocator()`", "tuned", "mid 64px b8 (constructor init, tuned allocator)"),
        (f"pixeldit_eqx, `GLIBC_TUNABLES={HUGE_PAGES}`", HUGE_PAGES, f"mid 64px b8 (constructor init, {HUGE_PAGES})"),
    ):
        if (64, allocator) in speed and (128, allocator) in speed:
            times = [speed[(hw, allocator)][p]["median_s"] for hw in (64, 128) for p in ("forward", "forward_backward")]
            rows.append((label, times, memory.get(mem)))
    dtype = {r["hw"]: r for r in results.get("dtype", [])}
    if 64 in dtype and 128 in dtype:
        times = [dtype[hw][p]["bfloat16_s"] for hw in (64, 128) for p in ("forward", "forward_backward")]
        rows.append(("pixeldit_eqx, `compute_dtype=jnp.bfloat16`", times, None))
    torch = results.get("torch")
    if torch:
        times = [torch["speed"][str(hw)][p]["median_s"] for hw in (64, 128) for p in ("forward", "forward_backward")]
        rows.append((f"PyTorch reference, eager (torch {torch['torch']})", times, torch["peak_rss_mib"]))
    if not rows:
        return []
    lines = ["\n## Side by side: mid config, batch 8, median ms per batch\n"]
    lines.append("| implementation | " + " | ".join(cells) + " | peak RSS, 10 steps at 64px |")
    lines.append("|---|" + "---:|" * (len(cells) + 1))
    for label, times, mem in rows:
        peak = f"{mem:.0f} MiB" if mem is not None else ""
        lines.append(f"| {label} | " + " | ".join(f"{1e3 * t:,.0f}" for t in times) + f" | {peak} |")
    return lines


def _setting(allocator: str | None) -> str:
    """How a speed case's process was set up, as a label suffix."""
    if allocator is None:
        return ""
    if allocator == "tuned":
        return " (tuned allocator)"
    if allocator == HUGE_PAGES:
        return f" (GLIBC_TUNABLES={HUGE_PAGES})"
    return f" (XLA_FLAGS={allocator})"


def render(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append("# pixeldit_eqx benchmark\n")
    lines.append(
        f"- device: {m['device']} ({m['platform']}), {m['cpu_count']} CPUs, jax {m['jax']}, python {m['python']}"
    )
    cpu = m["cpu"]
    lines.append(f"- CPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or 'none of ' + ' '.join(CPU_FLAGS)}")
    lines.append(
        f"- fp32 matmul {m['matmul_n']}x{m['matmul_n']}: median {m['matmul_gflops']:.1f} GFLOP/s "
        f"over {m['matmul_samples']} samples (min {m['matmul_gflops_min']:.1f}, "
        f"max {m['matmul_gflops_max']:.1f})"
    )
    if "batched_matmul" in results:
        b = results["batched_matmul"]
        lines.append(
            f"- attention-shaped batched matmul {b['shape'][0]}x({b['shape'][1]}x{b['shape'][2]} @ "
            f"{b['shape'][2]}x{b['shape'][1]}): {b['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{100 * b['fraction_of_matmul']:.0f}% of the matmul rate"
        )
    lines.append(f"- total benchmark time: {results['elapsed_s']:.0f} s\n")
    lines.append("## Speed (median after warm-up; FLOPs analytic, see flops.py)\n")
    lines.append(
        "| case | pass | GFLOP | ms / batch | ms / example | GFLOP/s "
        "| matmul GFLOP/s | of matmul rate | compile s | XLA temp MiB | page faults / call |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in results["speed"]:
        for pass_name in ("forward", "forward_backward"):
            r = case.get(pass_name)
            if r is None:
                continue
            label = f"{case['case']} {case['hw']}px b{case['batch']}"
            if case["checkpoint"]:
                label += " (checkpoint)"
            label += _setting(case.get("allocator"))
            lines.append(
                f"| {label} | {pass_name.replace('_', '+')} | {r['flops'] / 1e9:.2f} "
                f"| {_ms(r['median_s'])} | {_ms(r['per_example_s'])} "
                f"| {r['flops_per_s'] / 1e9:.1f} | {r['matmul_flops_per_s'] / 1e9:.1f} "
                f"| {100 * r['fraction_of_matmul']:.0f}% | {r['compile_s']:.1f} "
                f"| {r.get('temp_mib', float('nan')):.0f} | {r.get('minor_faults', float('nan')):,.0f} |"
            )
    if results.get("split"):
        lines.append("\n## Where the time goes: whole model against `patch_level` alone (same process)\n")
        lines.append(
            "| case | pass | model ms | patch_level ms | pixel path ms | pixel path share of time | of FLOPs "
            "| its adaLN matmuls alone ms | their share of the model's time |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["split"]:
            for pass_name in ("forward", "forward_backward"):
                q = r[pass_name]
                lines.append(
                    f"| mid {r['hw']}px b{r['batch']} | {pass_name.replace('_', '+')} | {_ms(q['model_s'])} "
                    f"| {_ms(q['patch_level_s'])} | {_ms(q['model_s'] - q['patch_level_s'])} "
                    f"| {100 * q['pixel_path_share']:.0f}% | {100 * q['pixel_path_flop_share']:.0f}% "
                    f"| {_ms(q['adaln_matmuls_s'])} | {100 * q['adaln_share']:.0f}% |"
                )
        lines.append(
            "\nThe last two columns time the PiT blocks' per-pixel adaLN matmuls by themselves (forward: "
            "`(B*L, D) @ (D, 6*p*p*D_pix)`; forward+backward adds its input and weight gradients), at the "
            "model's shapes, times `pixel_depth`: a floor under the pixel path's time that no layout of the "
            "rest can remove."
        )
    if results.get("dtype"):
        lines.append("\n## bfloat16 compute against float32 (same weights, timed alternately)\n")
        lines.append("| case | pass | float32 ms | bfloat16 ms | speedup |")
        lines.append("|---|---|---:|---:|---:|")
        for r in results["dtype"]:
            for pass_name in ("forward", "forward_backward"):
                q = r[pass_name]
                lines.append(
                    f"| mid {r['hw']}px b{r['batch']} | {pass_name.replace('_', '+')} | {_ms(q['float32_s'])} "
                    f"| {_ms(q['bfloat16_s'])} | {q['speedup']:.2f}x |"
                )
    if results.get("train_step"):
        lines.append(
            "\n## Training step (AdamW + EMA): plain jit against `train.jit_step` and "
            f"`train.jit_steps(step, {STEPS_PER_CALL})`, ms per step, timed alternately (default process)\n"
        )
        lines.append(
            "| case | eqx.filter_jit | train.jit_step | ratio | train.jit_steps | ratio "
            "| jit_steps, `compiler_options={}` | package's options vs XLA's "
            '| jit_steps, `checkpoint="lean"` | lean vs default |'
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["train_step"]:
            lines.append(
                f"| mid {r['hw']}px b{r['batch']} | {_ms(r['filter_jit_s'])} | {_ms(r['jit_step_s'])} "
                f"| {r['speedup']:.2f}x | {_ms(r['jit_steps_s'])} | {r['steps_speedup']:.2f}x "
                f"| {_ms(r['jit_steps_xla_options_s'])} | {r['options_speedup']:.2f}x "
                f"| {_ms(r['jit_steps_lean_s'])} | {r['lean_speed']:.2f}x |"
            )
    lines.extend(comparison(results))
    if results.get("compile"):
        lines.append("\n## Compile time of jit(forward+backward), mid widths, 64x64 b8\n")
        lines.append("| patch depth | lower s | compile s | total s | vs depth 2 |")
        lines.append("|---:|---:|---:|---:|---:|")
        base = results["compile"][min(results["compile"])]["total_s"]
        for depth, r in sorted(results["compile"].items()):
            lines.append(
                f"| {depth} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
                f"| {r['total_s']:.1f} | {r['total_s'] / base:.2f}x |"
            )
    if results.get("gating"):
        g = results["gating"]
        lines.append("\n## SwiGLU gating: forward+backward of 6 scanned blocks, 8x256 tokens, width 256\n")
        lines.append(
            f"`_ops.silu_gate` {_ms(g['silu_gate'])} ms, autodiff of `jax.nn.silu(gate) * value` "
            f"{_ms(g['jax.nn.silu'])} ms: {g['speedup']:.2f}x"
        )
    if results.get("attention"):
        a = results["attention"]
        lines.append("\n## Attention: 8 x 256 tokens, 4 heads of 64, float32 (timed alternately)\n")
        lines.append("| pass | `jax.nn.dot_product_attention` ms | heads-major (`attend` on CPU) ms | speedup |")
        lines.append("|---|---:|---:|---:|")
        for pass_name in ("forward", "forward_backward"):
            r = a[pass_name]
            lines.append(
                f"| {pass_name} | {_ms(r['dot_product_attention_s'])} | {_ms(r['heads_major_s'])} "
                f"| {r['speedup']:.2f}x |"
            )
    if results.get("memory"):
        lines.append("\n## Peak memory of a process doing forward+backward steps\n")
        lines.append(
            "| case | steps | peak RSS MiB | peak after compiling MiB | device peak MiB | RSS after import / build "
            "/ compile / steps MiB | XLA temp MiB |"
        )
        lines.append("|---|---:|---:|---:|---:|---|---:|")
        for r in results["memory"]:
            ph = r["phases"]
            phases = " / ".join(
                f"{ph[k]['VmRSS']:.0f}" if "VmRSS" in ph.get(k, {}) else "-"
                for k in ("import", "build", "compile", "steps")
            )
            dev, temp, after = r["device_peak_mib"], r["temp_mib"], r.get("steps_peak_rss_mib")
            lines.append(
                f"| {r['label']} | {r['steps']} | {r['peak_rss_mib']:.0f} "
                f"| {'-' if after is None else f'{after:.0f}'} "
                f"| {'-' if dev is None else f'{dev:.0f}'} | {phases} "
                f"| {'-' if temp is None else f'{temp:.0f}'} |"
            )
    if results.get("program_size"):
        lines.append("\n## Program size: StableHLO text of jit(forward), mid config\n")
        lines.append("| image | bytes |")
        lines.append("|---:|---:|")
        for hw, n in sorted(results["program_size"].items()):
            lines.append(f"| {hw}x{hw} | {n:,} |")
    if results.get("checks"):
        lines.append("\n## Targets\n")
        for name, (ok, detail) in results["checks"].items():
            lines.append(f"- [{'x' if ok else ' '}] {name}: {detail}")
    return "\n".join(lines) + "\n"


def checks(results: dict) -> dict[str, tuple[bool, str]]:
    out = {}
    for case in results["speed"]:
        if case["case"] != "mid" or case["checkpoint"]:
            continue
        if case.get("allocator") not in (None, "tuned", HUGE_PAGES):
            continue  # the XLA-flags rows are for comparison
        setting = _setting(case.get("allocator")) or " (default process)"
        for pass_name in ("forward", "forward_backward"):
            f = case[pass_name]["fraction_of_matmul"]
            out[f"mid {case['hw']}px {pass_name} >= 55% of matmul rate{setting}"] = (
                f >= 0.55,
                f"{100 * f:.0f}%",
            )
    for r in results.get("split", []):
        if r["hw"] == 128:
            share = r["forward_backward"]["pixel_path_share"]
            out["mid 128px forward+backward: pixel path <= 25% of the time"] = (share <= 0.25, f"{100 * share:.0f}%")
    for r in results.get("memory", []):
        reference_row = r.get("xla_flags") or "(False)" in r["label"] or r["label"].startswith(RECIPE_XLA_OPTIONS)
        if r["label"].startswith(("mid 64px", "train.fit")) and not reference_row:
            out[f"{r['label']}: peak RSS <= 700 MiB"] = (
                r["peak_rss_mib"] <= 700,
                f"{r['peak_rss_mib']:.0f} MiB",
            )
    for r in results.get("dtype", []):
        if r["hw"] == 128 and has_bf16_dots(results["machine"]["cpu"]):
            speedup = r["forward_backward"]["speedup"]
            out["mid 128px forward+backward: bfloat16 compute >= 1.5x float32"] = (speedup >= 1.5, f"{speedup:.2f}x")
    mem128 = {r["label"]: r for r in results.get("memory", []) if "128px" in r["label"]}
    if len(mem128) == 2:
        off = next(r for r in mem128.values() if "off" in r["label"])
        on = next(r for r in mem128.values() if "on" in r["label"])
        out["checkpoint lowers peak memory at 128px"] = (
            on["peak_rss_mib"] < off["peak_rss_mib"] and on["temp_mib"] < off["temp_mib"],
            f"peak RSS {off['peak_rss_mib']:.0f} -> {on['peak_rss_mib']:.0f} MiB, "
            f"XLA temp {off['temp_mib']:.0f} -> {on['temp_mib']:.0f} MiB",
        )
    comp = results.get("compile")
    if comp:
        lo, hi = comp[min(comp)]["total_s"], comp[max(comp)]["total_s"]
        out[f"compile depth {max(comp)} <= 1.5x depth {min(comp)}"] = (
            hi <= 1.5 * lo,
            f"{hi:.1f} s vs {lo:.1f} s ({hi / lo:.2f}x)",
        )
    sizes = results.get("program_size")
    if sizes:
        small, big = sizes[min(sizes)], sizes[max(sizes)]
        out["program size flat in H*W"] = (
            big <= 1.05 * small,
            f"{small:,} B at {min(sizes)}px, {big:,} B at {max(sizes)}px",
        )
    return out


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench", help="directory for results")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; skip XL and 128px memory")
    parser.add_argument(
        "--xl",
        choices=("auto", "skip", "forward", "full"),
        default="auto",
        help="PixelDiT-XL 256px b1: auto = forward on CPU, forward+backward elsewhere",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per pass")
    parser.add_argument(
        "--torch-python",
        default=None,
        help="a Python with torch: adds the eager PyTorch reference to the comparison (needs --torch-reference)",
    )
    parser.add_argument("--torch-reference", default=None, help="directory holding the reference's pixdit_core")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.torch_python is None) != (args.torch_reference is None):
        parser.error("--torch-python and --torch-reference go together")
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(speed_child(spec) if spec.get("speed") else memory_child(spec)))
        return

    start = time.perf_counter()
    platform_name = jax.devices()[0].platform
    on_cpu = platform_name == "cpu"
    repeats = args.repeats or (3 if args.quick else 7)
    xl = args.xl if args.xl != "auto" else ("forward" if on_cpu else "full")
    if args.quick:
        xl = "skip"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    # 2048^3 keeps a CPU busy for ~0.1 s; an accelerator needs a bigger one to be timed.
    mm = MatmulRate(MATMUL_N if on_cpu else 4 * MATMUL_N)
    results: dict[str, Any] = {"speed": [], "memory": []}

    log("program size (lowering only)")
    results["program_size"] = program_sizes((64, 512), MID)

    log("compile time by patch depth")
    results["compile"] = compile_depths((2, 6, 24), 64)

    for hw, reps in ((64, repeats), (128, max(3, repeats - 2))):
        log(f"speed: mid config {hw}x{hw}")
        results["speed"].append(speed_case("mid", MID, "c2i", hw, BATCH, reps, mm))
    if on_cpu:
        log("speed: mid config 64x64 and 128x128 with runtime.tune_cpu_allocator() (subprocess)")
        spec = {"speed": True, "cases": [[64, repeats], [128, max(3, repeats - 2)]]}
        results["speed"].extend(run_child(spec))
        if xla_knows_flags(XNN_DOTS):
            log(f"speed: mid config 64x64 and 128x128 with XLA_FLAGS={XNN_DOTS} (subprocess)")
            results["speed"].extend(run_child({**spec, "tuned": False, "label": XNN_DOTS}, xla_flags=XNN_DOTS))
        if huge_pages_available():
            log(f"speed: mid config 64x64 and 128x128 with GLIBC_TUNABLES={HUGE_PAGES} (subprocess)")
            results["speed"].extend(run_child({**spec, "tuned": False, "label": HUGE_PAGES}, glibc_tunables=HUGE_PAGES))
        else:
            log("speed: no transparent huge pages for malloc here (glibc < 2.35 or THP off); that row is left out")
    log("speed: mid config 128x128 with checkpoint=True (forward+backward)")
    case = speed_case("mid", MID, "c2i", 128, BATCH, max(3, repeats - 2), mm, checkpoint=True)
    results["speed"].append(case)

    results["split"] = []
    for hw in (64, 128):
        log(f"split: whole model and patch_level alone, {hw}x{hw}")
        results["split"].append(split_case(MID, "c2i", hw, BATCH, max(3, repeats - 2)))

    results["dtype"] = []
    for hw in (64, 128):
        log(f"bfloat16 against float32 compute, {hw}x{hw}")
        results["dtype"].append(dtype_case(MID, "c2i", hw, BATCH, max(3, repeats - 2)))

    results["train_step"] = []
    for hw in (64, 128):
        log(f"train step: eqx.filter_jit, train.jit_step and train.jit_steps, {hw}x{hw}")
        results["train_step"].append(train_step_case(MID, hw, BATCH, max(3, repeats - 2)))

    if args.torch_python:
        log("the eager PyTorch reference (torch_reference.py)")
        results["torch"] = torch_case(args.torch_python, args.torch_reference, repeats)

    log("batched matmul of the attention scores (128x128 shape)")
    results["batched_matmul"] = batched_matmul_case(mm)

    log("gating: scanned SwiGLU stack with silu_gate and with jax.nn.silu")
    results["gating"] = gating_case(repeats, mm)

    log("attention: jax.nn.dot_product_attention and the heads-major layout (128x128 shape)")
    results["attention"] = attention_case(max(5, repeats))

    mem_specs = [
        ("mid 64px b8 (weights loaded)", 64, False, "state_dict", 10, None, False),
        ("mid 64px b8 (constructor init)", 64, False, "constructor", 10, None, False),
        ("mid 64px b8 (constructor init, release_after_compile(False))", 64, False, "constructor", 10, None, False),
        ("train.fit recipe: AdamW + EMA, jit_steps, mid 64px b8", 64, "lean", "constructor", 10, None, False),
        (f"{RECIPE_XLA_OPTIONS}: AdamW + EMA, jit_steps, mid 64px b8", 64, "lean", "constructor", 10, None, False),
    ]
    if on_cpu:
        mem_specs.append(("mid 64px b8 (weights loaded, tuned allocator)", 64, False, "state_dict", 10, None, True))
        mem_specs.append(("mid 64px b8 (constructor init, tuned allocator)", 64, False, "constructor", 10, None, True))
        if huge_pages_available():
            mem_specs.append(
                (f"mid 64px b8 (constructor init, {HUGE_PAGES})", 64, False, "constructor", 10, None, False)
            )
        # XLA:CPU's fusion emitters dominate the compile-time peak; shown for reference.
        flag = "--xla_cpu_use_fusion_emitters=false"
        if xla_knows_flags(flag):
            mem_specs.append((f"mid 64px b8 (weights loaded, {flag})", 64, False, "state_dict", 10, flag, False))
        else:
            log(f"memory: this XLA does not know {flag}; its row is left out")
    if not args.quick:
        mem_specs += [
            ("mid 128px b8 checkpoint off", 128, False, "state_dict", 3, None, False),
            ("mid 128px b8 checkpoint on", 128, True, "state_dict", 3, None, False),
            ('mid 128px b8 checkpoint "lean"', 128, "lean", "state_dict", 3, None, False),
        ]
    for label, hw, ckpt, init, steps, flags, tuned in mem_specs:
        log(f"memory: {label} (subprocess)")
        spec = dict(
            config=MID, variant="c2i", hw=hw, batch=BATCH, checkpoint=ckpt,
            init=init, steps=steps, tuned=tuned,
            keep_compile_scratch="release_after_compile(False)" in label, recipe=label.startswith("train.fit"),
            compiler_options={} if label.startswith(RECIPE_XLA_OPTIONS) else None,
        )  # fmt: skip
        tunables = HUGE_PAGES if HUGE_PAGES in label else None
        child = run_child(spec, xla_flags=flags, glibc_tunables=tunables)
        results["memory"].append({"label": label, "steps": steps, "xla_flags": flags, "tuned": tuned, **child})

    if xl != "skip":
        log(f"speed: PixelDiT-XL 256x256 b1 ({xl})")
        config = px.PRESETS["pixeldit-xl-c2i-256"]["config"]
        results["speed"].append(speed_case("XL", dict(config), "c2i", 256, 1, 3, mm, backward=(xl == "full")))

    rates = mm.samples
    results["machine"] = {
        "device": str(jax.devices()[0].device_kind),
        "cpu": cpu_info(),
        "platform": platform_name,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "matmul_gflops": statistics.median(rates) / 1e9,
        "matmul_gflops_min": min(rates) / 1e9,
        "matmul_gflops_max": max(rates) / 1e9,
        "matmul_samples": len(rates),
        "matmul_n": mm.n,
    }
    results["elapsed_s"] = time.perf_counter() - start
    results["checks"] = checks(results)
    report = render(results)
    print("\n" + report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(f"wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
    main()

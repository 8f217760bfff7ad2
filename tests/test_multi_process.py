"""Multi-controller training: 2 processes x 4 CPU devices against 1 process x 8 devices.

Runs the commands of the README's "several hosts" recipe, `examples/multi_process.py`:
its launcher starts 2 worker processes on localhost, each with 4 simulated CPU devices,
joined by `jax.distributed` (a local coordinator, gloo collectives) into one 8-device
mesh; every process feeds only its own half of each global batch. Then the same run in
one process with 8 devices, which also restores the 2-process FSDP checkpoint onto 4
devices. Both runs write their results (losses, the states gathered, samples) to
`results.npz`, compared here:

- for data parallel and FSDP, the losses, the whole state after the run and the sharded
  sampler's images equal the 1-process run's to float32 round-off;
- a run resumed from its (asynchronously saved, sharded) checkpoint ends bit-identical
  to the uninterrupted run, each process having written its own shards; resumed with
  its remaining steps in one call (`steps_per_call`), it ends the same to float32
  round-off;
- the checkpoint restores onto another mesh (8 devices -> 4; FSDP -> replicated) with
  the same bits;
- when a worker dies, the launcher stops the other and fails at once, not hanging;
- processes that initialise the state with different keys are refused by `shard_state`.

Every subprocess runs under a timeout and in its own session (killed whole on timeout).
XLA compiles at its lowest backend optimisation level in all of them (as in
`tests/test_sharding.py`): compiling is most of the time spent here.
"""

import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multi_process.py"
# Seconds for each of the two runs: far above what they need (the whole file: 139 s of
# CPU time, the 2-process run 80 s of it), for a machine shared with other jobs.
TIMEOUT = 480
STRATEGIES = ("replicated", "fsdp")
RTOL, ATOL = 1e-5, 1e-6

pytest.importorskip("orbax.checkpoint")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the launcher and its workers: one group to kill
    )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(*args: str) -> str:
    """Runs the example to completion (or fails the test at the timeout); its output."""
    proc = _start(*args)
    start = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` timed out after {TIMEOUT} s:\n{output[-6000:]}")
    lines = [line for line in output.splitlines() if not line.startswith("[Gloo]")]
    output = "\n".join(lines)
    assert proc.returncode == 0, f"`{' '.join(args)}` failed after {time.monotonic() - start:.0f} s:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run, then the 1-process run (which restores the first's checkpoint)."""
    multi = tmp_path_factory.mktemp("two_processes")
    single = tmp_path_factory.mktemp("one_process")
    multi_log = _run("--processes", "2", "--devices", "4", "--out", str(multi))
    single_log = _run("--processes", "1", "--devices", "8", "--out", str(single), "--restore-check", str(multi))
    return (
        dict(np.load(multi / "results.npz")),
        dict(np.load(single / "results.npz")),
        (multi, single),
        multi_log + "\n" + single_log,
    )


def _state(results: dict, strategy: str, name: str) -> dict[str, np.ndarray]:
    prefix = f"{strategy}/{name}/"
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_equal_one(runs, strategy):
    multi, single, _, log = runs
    assert "[process 1]" in log and "ready: 2 process(es), 4 of 8 devices; mesh {'data': 8}" in log
    np.testing.assert_allclose(multi[f"{strategy}/losses"], single[f"{strategy}/losses"], rtol=RTOL, atol=ATOL)
    got, want = _state(multi, strategy, "final"), _state(single, strategy, "final")
    assert got.keys() == want.keys() and len(got) > 50
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_allclose(got[path], want[path], rtol=RTOL, atol=ATOL, err_msg=path)
    assert got[".step"] == 4
    # The run moved the parameters: the comparison is not of two untouched copies.
    start = _state(multi, strategy, "at_save")
    assert max(np.max(np.abs(got[p] - start[p])) for p in got if p.startswith(".model.")) > 1e-4
    samples, expected = multi[f"{strategy}/samples"], single[f"{strategy}/samples"]
    assert samples.shape == expected.shape == (16, 3, 8, 8)
    np.testing.assert_allclose(samples, expected, rtol=RTOL, atol=ATOL)
    # Both strategies train the same model the same way.
    np.testing.assert_allclose(multi["replicated/losses"], multi["fsdp/losses"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resumed_run_is_bit_identical(runs, strategy):
    multi, single, (multi_dir, single_dir), _ = runs
    for results in (multi, single):
        final, resumed = _state(results, strategy, "final"), _state(results, strategy, "resumed")
        assert final.keys() == resumed.keys()
        for path in final:
            np.testing.assert_array_equal(resumed[path], final[path], err_msg=path)
        assert _state(results, strategy, "at_save")[".step"] == 2
        # The same two steps in one call (`steps_per_call`): a different program (a scan
        # of in-place steps), the same numbers to float32 round-off.
        in_one_call = _state(results, strategy, "in_one_call")
        assert in_one_call.keys() == final.keys() and in_one_call[".step"] == 4
        for path in final:
            np.testing.assert_allclose(in_one_call[path], final[path], rtol=RTOL, atol=ATOL, err_msg=path)

    # Each process wrote its own shards, a replicated array once (by process 0): the two
    # together wrote what the 1-process run wrote alone (compressed alike).
    def written(run_dir, process):
        folder = run_dir / "checkpoints" / strategy / "2" / "default" / f"ocdbt.process_{process}"
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    parts, alone = [written(multi_dir, 0), written(multi_dir, 1)], written(single_dir, 0)
    assert 0.8 * alone < sum(parts) < 1.25 * alone, (parts, alone)
    if strategy == "fsdp":  # most of the state is split: each process holds a part
        assert min(parts) > 0.2 * alone, (parts, alone)
    else:  # every array whole in every process: process 0's replica is written
        assert parts[1] < 0.05 * alone < parts[0], (parts, alone)


def test_checkpoint_restores_onto_another_mesh(runs):
    """The 2-process FSDP checkpoint (8 devices) restored in 1 process onto 4 devices."""
    multi, single, _, _ = runs
    saved = _state(multi, "fsdp", "at_save")
    for layout in STRATEGIES:
        restored = _state(single, "restore4", layout)
        assert restored.keys() == saved.keys()
        for path in saved:
            np.testing.assert_array_equal(restored[path], saved[path], err_msg=f"{layout}: {path}")


def test_a_dead_process_fails_the_run_at_once(tmp_path):
    """Kill one worker once both have joined: the launcher stops the other and fails."""
    proc = _start("--processes", "2", "--devices", "4", "--out", str(tmp_path), "--timeout", "120")
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    output, pids = [], {}
    try:
        deadline = time.monotonic() + 120
        while not any(re.search(r"\[process 1\] +[0-9.]+ s  ready: ", line) for line in output):
            assert proc.poll() is None, "\n".join(output)
            try:
                output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())).rstrip())
            except queue.Empty:
                pytest.fail("the workers did not start within 120 s:\n" + "\n".join(output))
            if m := re.match(r"\[launcher\] process (\d) pid (\d+):", output[-1]):
                pids[int(m[1])] = int(m[2])
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher did not notice the dead process within 30 s")
        elapsed = time.monotonic() - killed
    finally:
        _kill_group(proc)
        reader.join(timeout=10)
        proc.stdout.close()
    while not lines.empty():
        output.append(lines.get().rstrip())
    log = "\n".join(output)
    assert proc.returncode == 1, log
    assert f"FAILED: process 1 exited with code {-signal.SIGKILL}; stopping the others" in log, log
    assert elapsed < 10, elapsed
    with pytest.raises(ProcessLookupError):  # the other worker is gone too
        os.kill(pids[0], 0)


def test_processes_with_different_keys_are_refused(tmp_path):
    """`shard_state` compares the processes' PRNG keys and step before placing anything."""
    proc = _start("--processes", "2", "--devices", "4", "--out", str(tmp_path), "--timeout", "120", "--different-keys")
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail("the run with different keys did not fail within 180 s")
    assert proc.returncode == 1, output[-4000:]
    assert "ValueError: `state`: expected the same PRNG keys and steps in every process, got .key = " in output
    assert "FAILED: process " in output

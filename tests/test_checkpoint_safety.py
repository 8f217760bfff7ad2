"""Checkpoints that cannot hurt and cannot be lost.

- The torch reader refuses each hostile file of `tests/_hostile.py` with a documented
  error naming the budget or the check (and quickly), admits only plain numeric numpy
  dtypes, checks views against their storages, and no reading step is worse than linear.
- Every file the package writes is atomic and checksummed: a writer killed with SIGKILL
  at random points, or two writers at once, leave the previous or the new file, byte for
  byte, never a mix; truncation, flipped bits and trailing bytes are reported as such.
- Training survives non-finite batches (skipped, counted, `fit` stops after too many in a
  row); optimiser factories validate their numbers; loaders refuse non-finite weights.
- Resuming includes the data position: N + M steps == N, save, load, M, bit for bit.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pixeldit_eqx as px
from pixeldit_eqx import _torch_pickle, train
from pixeldit_eqx._atomic import atomic_write
from pixeldit_eqx._convert import _infer_prefix
from pixeldit_eqx._torch_pickle import CheckpointFormatError, load_torch_file, UnsafeCheckpointError

from . import _hostile
from .helpers import FIXTURES, MANIFEST


ROOT = Path(__file__).resolve().parent.parent
C2I = MANIFEST["model_c2i"]["init"]

# attack -> what the error says.
EXPECTED = {
    "structured-dtype": r"unsupported numpy dtype 'V4': only plain numeric dtypes",
    "structured-dtype-small-offset": r"unsupported numpy dtype 'V4'",
    "dtype-setstate": r"unsupported numpy dtype state .*: only plain numeric dtypes are read",
    "stride-zero-view": r"bytes materialised by tensors, arrays and copies .*`ReadBudget.materialise_ratio`",
    "list-of-range": r"objects built \(a range\).*`ReadBudget.max_objects`",
    "tuple-copies": r"objects built: .*`ReadBudget.max_objects`",
    "repeated-copies": r"bytes materialised by tensors, arrays and copies .*`ReadBudget.materialise_ratio`",
    "zip-bomb-pickle": r"decompressed bytes .*`ReadBudget.decompress_ratio`",
    "zip-bomb-storage": r"decompressed bytes .*`ReadBudget.decompress_ratio`",
    "shared-references": r"objects built \(shared references counted at every use\).*`ReadBudget.max_objects`",
    "deep-nesting": r"nesting depth: 101 > 100 \(`ReadBudget.max_depth`\)",
    "long-dotted-key": r"key length: 1000023 > 4096 \(`ReadBudget.max_key_length`\)",
    "none-pop-flood": r"pickle opcodes: 2000001 > 2000000 \(`ReadBudget.max_opcodes`\)",
    "lzma-member": r"cannot read the record 'archive/data.pkl' \(truncated, corrupt or unsupported zip member\)",
    "bad-crc-storage": r"fails its CRC-32 check: the file is corrupt",
    "hostile-global": r"refusing to unpickle the global 'os.system'",
}


def test_every_attack_has_an_expectation():
    assert sorted(EXPECTED) == sorted(_hostile.ATTACKS)


@pytest.mark.parametrize("name", sorted(_hostile.ATTACKS))
def test_hostile_file_is_refused_quickly(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.pt"
    path.write_bytes(_hostile.ATTACKS[name]())
    start = time.process_time()
    with pytest.raises((CheckpointFormatError, UnsafeCheckpointError), match=EXPECTED[name]):
        load_torch_file(path)
    assert time.process_time() - start < 5.0
    assert not (tmp_path / "canary").exists()


def test_lzma_decoder_errors_are_format_errors(tmp_path):
    """A record that really is LZMA-declared but holds garbage: the decoder's error is wrapped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_LZMA) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1.0}, protocol=2) * 50)
    data = bytearray(buffer.getvalue())
    start = data.find(b"PK\x03\x04") + 30 + len("archive/data.pkl") + 4  # past LZMA's properties header
    data[start : start + 16] = b"\xff" * 16
    (tmp_path / "x.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"cannot read the record .*(LZMAError|BadZipFile|EOFError)"):
        load_torch_file(tmp_path / "x.pt")


def test_plain_numpy_dtypes_load_and_others_do_not(tmp_path):
    values = {
        f"{d}": np.arange(6).astype(d).reshape(2, 3) for d in ("?", "i1", "u2", "<i4", ">i8", "<f2", ">f4", "f8", "c8")
    }
    values["scalar"] = np.float64(2.5)
    path = tmp_path / "plain.pt"
    path.write_bytes(_hostile.zip_records({"data.pkl": pickle.dumps(values, protocol=2)}))
    got = load_torch_file(path)
    for key, want in values.items():
        np.testing.assert_array_equal(got[key], want)
        assert got[key].dtype == want.dtype.newbyteorder("="), key  # In native byte order.
    for refused in (np.dtype("O"), np.dtype([("a", "<f4")]), np.dtype("M8[s]"), np.dtype("V8")):
        array = np.zeros(2, refused)
        path.write_bytes(_hostile.zip_records({"data.pkl": pickle.dumps({"x": array}, protocol=2)}))
        with pytest.raises(CheckpointFormatError, match="unsupported numpy dtype"):
            load_torch_file(path)


@pytest.mark.parametrize(
    "size, stride, offset, numel, ok",
    [
        ((4, 4), (0, 1), 0, 4, True),  # A broadcast (stride-0) view within budget copies.
        ((2, 2), (2, 1), 0, 4, True),
        ((2, 2), (2, 1), 1, 4, False),  # Past the end by the offset.
        ((3, 2), (2, 1), 0, 4, False),  # Past the end by the size.
        ((2, 2), (3, 1), 0, 4, False),  # Past the end by the stride.
        ((1, 4), (10**30, 1), 0, 4, True),  # A size-1 dimension's stride is never used.
    ],
)
def test_views_are_checked_against_their_storage(tmp_path, size, stride, offset, numel, ok):
    storage = np.arange(numel, dtype="<f4")
    path = tmp_path / "view.pt"
    path.write_bytes(
        _hostile.zip_records(
            {"data.pkl": _hostile._tensor_pickle(size, stride, numel, offset), "data/0": storage.tobytes()}
        )
    )
    if ok:
        got = load_torch_file(path)[_hostile.KEY]
        want = np.lib.stride_tricks.as_strided(
            storage[offset:], size, tuple(0 if n == 1 else s * 4 for n, s in zip(size, stride))
        )
        np.testing.assert_array_equal(got, want)
    else:
        with pytest.raises(CheckpointFormatError, match="reaches past the end of storage"):
            load_torch_file(path)


def test_budget_applies_to_real_checkpoints_when_lowered(monkeypatch):
    """The real fixture loads under the default budget, and each lowered budget trips."""
    import dataclasses

    path = FIXTURES / "checkpoints" / "model_c2i_lightning.ckpt"
    assert "state_dict" in load_torch_file(path)
    for field, value in [("max_opcodes", 100), ("max_objects", 50), ("max_depth", 2), ("materialise_ratio", 0)]:
        budget = dataclasses.replace(_torch_pickle.ReadBudget(), **{field: value})
        if field == "materialise_ratio":
            budget = dataclasses.replace(budget, materialise_slack=0)
        monkeypatch.setattr(_torch_pickle, "BUDGET", budget)
        with pytest.raises(CheckpointFormatError, match=f"`ReadBudget.{field}`"):
            load_torch_file(path)


def test_prefix_inference_is_linear_in_the_key_length():
    expected = set(px.state_dict(eqx.filter_eval_shape(px.build, C2I, "c2i", key=jr.key(0))))
    key = "." * 1_000_000 + "final_layer.linear.bias"
    start = time.process_time()
    assert _infer_prefix({key: 0, "ema.x": 0}, expected) == "." * 1_000_000
    many = {"." * 100_000 + f"{i}": 0 for i in range(10)}
    with pytest.raises(px.StateDictError, match="no key of the checkpoint names a weight"):
        _infer_prefix(many, expected)
    assert time.process_time() - start < 1.0


def test_values_that_are_no_arrays_give_a_state_dict_error(tmp_path):
    """Ragged or too deep lists under a weight's key: listed as problems, not numpy's errors."""
    deep = [1.0]
    for _ in range(80):
        deep = [deep]
    for value in ([[1.0], [1.0, 2.0]], deep):
        path = tmp_path / "lists.pt"
        path.write_bytes(
            _hostile.zip_records({"data.pkl": pickle.dumps({_hostile.KEY: value, "x": value}, protocol=2)})
        )
        with pytest.raises(px.StateDictError, match=r"got none: a list that is not an array"):
            px.load_reference(path, C2I, "c2i")


def test_safetensors_with_a_huge_key_is_refused_quickly(tmp_path):
    import safetensors.numpy

    path = tmp_path / "dots.safetensors"
    safetensors.numpy.save_file({"." * 1_000_000 + "final_layer.linear.bias": np.zeros(64, np.float32)}, path)
    start = time.process_time()
    with pytest.raises(CheckpointFormatError, match="key length"):
        px.load_reference(path, C2I, "c2i")
    assert time.process_time() - start < 2.0


# --- Checksums ---------------------------------------------------------------------------


def test_safetensors_checksum_is_written_and_verified(tmp_path):
    import safetensors.numpy
    from safetensors import safe_open

    weights = safetensors.numpy.load_file(FIXTURES / "model_c2i.safetensors")
    path = tmp_path / "m.safetensors"
    px.save_safetensors(path, weights)
    with safe_open(path, "np") as f:
        assert len(f.metadata()["pixeldit_eqx.sha256"]) == 64
    px.load_reference(path, C2I, "c2i")
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # A bit of the last tensor's data.
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="fail the sha256 checksum in the file's metadata"):
        px.load_reference(path, C2I, "c2i")
    # A file without the checksum (written by anything else) loads unverified.
    safetensors.numpy.save_file(weights, path)
    px.load_reference(path, C2I, "c2i")


def _tiny(key, **kwargs):
    config = dict(in_channels=1, num_groups=2, hidden_size=16, pixel_hidden_size=4, patch_depth=1, pixel_depth=1)
    return px.PixelDiT(**config, patch_size=2, num_classes=2, key=key, **kwargs)


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
def test_truncation_flipped_bits_and_trailing_bytes_are_named(tmp_path, kind):
    model = _tiny(jr.key(0))
    state = train.init_train_state(model, train.default_optimizer(1e-3), key=jr.key(1))
    path = tmp_path / f"{kind}.eqx"
    if kind == "model":
        train.save_model(path, model)
        load = train.load_model
    else:
        train.save_checkpoint(path, state)
        load = lambda p: train.load_checkpoint(p, state)  # noqa: E731
    load(path)
    good = path.read_bytes()
    header_end = good.index(b"\n") + 1
    cases = {
        "the file is truncated": good[: (header_end + len(good)) // 2],
        "fails its sha256 checksum": good[:-9] + bytes([good[-9] ^ 4]) + good[-8:],
        "trailing garbage": good + b"\0" * 3,
        "the file is truncated: its header declares": good[:header_end],
    }
    for message, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointFormatError, match=message):
            load(path)
    assert sorted(os.listdir(tmp_path)) == [path.name], "no temporary file is left behind"


def test_checkpoints_from_before_checksums_still_load(tmp_path):
    state = train.init_train_state(_tiny(jr.key(0)), train.default_optimizer(1e-3), key=jr.key(1))
    path = tmp_path / "old.eqx"
    eqx.tree_serialise_leaves(path, train._keys_to_data(state))  # What save_checkpoint wrote before.
    loaded = train.load_checkpoint(path, state)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(train._keys_to_data(loaded)), jax.tree.leaves(train._keys_to_data(state)))
    )


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    model = _tiny(jr.key(0))
    bad = eqx.tree_at(lambda m: m.final_layer.linear.bias, model, replace_fn=lambda b: b.at[0].set(jnp.nan))
    train.save_model(tmp_path / "nan.eqx", bad)
    with pytest.raises(CheckpointFormatError, match=r"holds non-finite values \(nan/inf\) in .*final_layer"):
        train.load_model(tmp_path / "nan.eqx")
    assert np.isnan(np.asarray(train.load_model(tmp_path / "nan.eqx", allow_nonfinite=True).final_layer.linear.bias)[0])

    state = train.init_train_state(bad, train.default_optimizer(1e-3), key=jr.key(1))
    train.save_checkpoint(tmp_path / "nan-state.eqx", state)
    with pytest.raises(CheckpointFormatError, match="non-finite values"):
        train.load_checkpoint(tmp_path / "nan-state.eqx", state)
    train.load_checkpoint(tmp_path / "nan-state.eqx", state, allow_nonfinite=True)


# --- Atomic writes -------------------------------------------------------------------------


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"previous")
    os.chmod(path, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_writers_killed_at_random_points_or_racing_never_leave_a_mix(tmp_path):
    """SIGKILL 16 times per writer at random points of a save (48 kills), and 4 races of
    two writers per writer: the target is always the previous or the new file, byte for
    byte, and both load."""
    plan = {"folder": str(tmp_path), "config": C2I, "seed": 0, "kills": 16, "concurrent": 4}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run(
        [sys.executable, "-m", "tests._writer", str(tmp_path / "plan.json")],
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    for name, result in summary.items():
        assert set(result["kills"]) <= {"A", "B"}, (name, result)
        assert set(result["concurrent"]) <= {"A", "B"}, (name, result)
        # The kills landed both before and after the replacement.
        assert result["kills"].count("A") >= 1 and result["kills"].count("B") >= 1, (name, result)
    like = train.init_train_state(px.build(C2I, "c2i", key=jr.key(0)), train.default_optimizer(1e-3), key=jr.key(0))
    for ref in ("A", "B"):
        train.load_model(tmp_path / f"model-{ref}.ref")
        train.load_checkpoint(tmp_path / f"checkpoint-{ref}.ref", like)
        (tmp_path / f"w-{ref}.safetensors").write_bytes((tmp_path / f"safetensors-{ref}.ref").read_bytes())
        px.load_reference(tmp_path / f"w-{ref}.safetensors", C2I, "c2i")


# --- Training through non-finite batches ----------------------------------------------------


def _batch(seed: int, nan: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    if nan:
        x[1, 0, 2, 3] = np.nan
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 2, 4).astype(np.int32))


@pytest.fixture(scope="module")
def setup():
    optimizer = train.default_optimizer(1e-2)
    step = eqx.filter_jit(train.make_train_step(train.c2i_loss, optimizer, ema_decay=0.5))
    state = train.init_train_state(_tiny(jr.key(0)), optimizer, key=jr.key(1))
    return train, optimizer, step, state


def _bytes(tree):
    def raw(x):
        return np.asarray(jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x).tobytes()

    return [raw(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.mark.parametrize("donate", [False, True], ids=["select", "in-place"])
def test_a_non_finite_step_is_skipped_and_reported(setup, donate):
    """Both forms of the skip: the select of a plain jit, the loop of a donated state."""
    train, optimizer, _, state = setup
    step = train.jit_step(train.make_train_step(train.c2i_loss, optimizer, ema_decay=0.5), donate=donate)
    state = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, state)  # the fixture's stays valid
    state, _ = step(state, _batch(0))
    before = {field: _bytes(getattr(state, field)) for field in ("model", "ema", "opt_state")}
    count = int(state.step)
    after, metrics = step(state, _batch(1, nan=True))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    for field in ("model", "ema", "opt_state"):
        assert _bytes(getattr(after, field)) == before[field], field
    assert int(after.step) == count + 1
    again, metrics = step(after, _batch(2))
    assert float(metrics["skipped"]) == 0.0 and all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(eqx.filter(again.model, eqx.is_inexact_array))
    )


def test_skipping_can_be_switched_off():
    """With `skip_nonfinite=False` a NaN batch poisons the model (a toy: one cheap compile)."""

    def loss(model, batch, key):
        return jnp.mean((jax.vmap(model)(batch) - 1.0) ** 2)

    optimizer = train.default_optimizer(1e-2)
    state = train.init_train_state(eqx.nn.Linear(2, 2, key=jr.key(0)), optimizer, key=jr.key(1))
    x = jnp.asarray(np.array([[1.0, np.nan]], np.float32))
    for skip in (True, False):
        step = eqx.filter_jit(train.make_train_step(loss, optimizer, skip_nonfinite=skip))
        after, metrics = step(state, x)
        assert float(metrics["skipped"]) == 1.0
        assert np.isfinite(np.asarray(after.model.weight)).all() == skip


def test_fit_stops_after_too_many_consecutive_skips(setup):
    train, _, step, state = setup
    pattern = [False, True, True, False, True, True, True, False]
    batches = [_batch(i, nan) for i, nan in enumerate(pattern)]
    # Two in a row are tolerated with max_consecutive_skips=3; three are not.
    with pytest.raises(
        train.NonFiniteTrainingError, match=r"3 consecutive training steps \(steps 4-6 of this `fit`\)"
    ) as info:
        train.fit(step, state, batches, num_steps=8, progress=False, max_consecutive_skips=3, log_every=2)
    reached = info.value.state
    assert int(reached.step) in (7, 8)
    _, losses = train.fit(step, state, batches, num_steps=8, progress=False, max_consecutive_skips=4)
    assert np.isnan(losses[[1, 2, 4, 5, 6]]).all() and np.isfinite(losses[[0, 3, 7]]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": float("inf")}, "`lr` must be a finite number > 0"),
        ({"lr": float("nan")}, "`lr` must be a finite number > 0"),
        ({"lr": -1e-3}, "`lr` must be a finite number > 0"),
        ({"lr": 1e-3, "weight_decay": float("inf")}, "`weight_decay` must be a finite number >= 0"),
        ({"lr": 1e-3, "clip": float("nan")}, "`clip` must be a finite number > 0 or None"),
        ({"lr": 1e-3, "b1": 1.0}, "`b1` must be a finite number >= 0 and < 1"),
        ({"lr": 1e-3, "b2": -0.1}, "`b2` must be a finite number >= 0 and < 1"),
        ({"lr": 1e-3, "eps": float("inf")}, "`eps` must be a finite number >= 0"),
        ({"lr": 1e-3, "decay_steps": True}, "`decay_steps` must be an integer"),
        ({"lr": 1e-3, "warmup_steps": -1}, "`warmup_steps` must be an integer"),
    ],
)
def test_optimizer_numbers_are_validated(kwargs, message):
    lr = kwargs.pop("lr")
    with pytest.raises(ValueError, match=message):
        train.default_optimizer(lr, **kwargs)


# --- Resuming includes the data position ----------------------------------------------------


def test_resume_continues_the_batch_order_bit_exactly(setup, tmp_path):
    train, optimizer, step, state = setup

    def batches(i: int):
        return _batch(100 + i)  # A seeded, step-indexed order: every batch differs.

    straight, losses_straight = train.fit(step, state, batches, num_steps=5, progress=False)
    first, losses_first = train.fit(step, state, batches, num_steps=3, progress=False)
    train.save_checkpoint(tmp_path / "s.eqx", first)
    loaded = train.load_checkpoint(tmp_path / "s.eqx", eqx.filter_eval_shape(lambda: state))
    assert int(loaded.step) == 3
    resumed, losses_rest = train.fit(step, loaded, batches, num_steps=2, progress=False)
    assert _bytes(resumed) == _bytes(straight)
    np.testing.assert_array_equal(np.concatenate([losses_first, losses_rest]), losses_straight)

    # Replaying from batch 0 (what an iterable restarted after a resume does) differs...
    replayed, _ = train.fit(step, loaded, [batches(i) for i in range(5)], num_steps=2, progress=False)
    assert _bytes(replayed) != _bytes(straight)
    # ...and `start_step` skips an iterable's batches already trained on.
    skipped, _ = train.fit(
        step, loaded, iter([batches(i) for i in range(5)]), num_steps=2, progress=False, start_step=3
    )
    assert _bytes(skipped) == _bytes(straight)

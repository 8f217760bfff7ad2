"""The torch-free checkpoint reader: real torch files, hand-built archives, hostile pickles."""

import io
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from pixeldit_eqx import _torch_pickle
from pixeldit_eqx._torch_pickle import (
    CheckpointFormatError,
    load_torch_file,
    Placeholder,
    TorchDtype,
    UnsafeCheckpointError,
)

from .helpers import FIXTURES


CHECKPOINTS = FIXTURES / "checkpoints"
LIGHTNING = CHECKPOINTS / "model_c2i_lightning.ckpt"
BF16 = CHECKPOINTS / "model_c2i_bf16.pt"
VIEWS = CHECKPOINTS / "model_c2i_views.pt"


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(FIXTURES / "model_c2i.safetensors")


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], dtype: Any) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert isinstance(got[key], np.ndarray), key
        assert got[key].dtype == np.dtype(dtype), key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------
# Hand-built checkpoints: torch's pickle layout, written without torch.


class Global:
    """`module.name`, written into a pickle as a GLOBAL without importing it."""

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    def __call__(self, *args: Any) -> Any:
        raise AssertionError("never called while pickling")


class Call:
    """An object that pickles as `func(*args)` (then `__setstate__(state)` if given)."""

    def __init__(self, func: Global, *args: Any, state: Any = None):
        self.func = func
        self.args = args
        self.state = state

    def __reduce__(self) -> Any:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


class Storage:
    """A storage record: pickled as torch's persistent id, its bytes go in `data/<key>`."""

    def __init__(self, key: str, storage_type: Global | str, numel: int):
        self.key = key
        if isinstance(storage_type, str):
            storage_type = Global("torch", storage_type)
        self.storage_type = storage_type
        self.numel = numel


class TorchLikePickler(pickle._Pickler):
    """The pure-Python pickler, taught to write `Global`s and storage persistent ids."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def tensor(storage: Storage, offset: int, size: tuple, stride: tuple) -> Call:
    rebuild = Global("torch._utils", "_rebuild_tensor_v2")
    return Call(rebuild, storage, offset, size, stride, False, OrderedDict())


def write_zip(path: Path, records: dict[str, bytes], archive: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(f"{archive}/{name}", data)
    return path


def write_checkpoint(
    path: Path,
    obj: Any,
    storages: dict[str, bytes],
    byteorder: str = "little",
) -> Path:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump(obj)
    records = {"data.pkl": buffer.getvalue(), "byteorder": byteorder.encode()}
    records |= {f"data/{key}": data for key, data in storages.items()}
    return write_zip(path, records)


# ---------------------------------------------------------------------------------------
# The real torch-produced fixtures.


def test_lightning_checkpoint(weights: dict[str, np.ndarray]) -> None:
    ckpt = load_torch_file(LIGHTNING)
    assert set(ckpt) >= {
        "epoch",
        "global_step",
        "state_dict",
        "optimizer_states",
        "callbacks",
    }
    assert ckpt["epoch"] == 7 and ckpt["global_step"] == 1234
    state = ckpt["state_dict"]
    assert set(state) == {f"{p}.{k}" for p in ("ema_denoiser", "denoiser") for k in weights}
    ema = {k.removeprefix("ema_denoiser."): v for k, v in state.items() if k.startswith("ema_")}
    raw = {k.removeprefix("denoiser."): v for k, v in state.items() if k.startswith("denoiser.")}
    assert_same(ema, weights, np.float32)
    assert_same(raw, {k: v + np.float32(1.0) for k, v in weights.items()}, np.float32)
    # Tensors elsewhere in the dict come back too, 0-d ones included.
    adam = ckpt["optimizer_states"][0]["state"][0]
    assert adam["step"].shape == () and adam["step"] == 1234
    assert "torch" not in sys.modules


def test_lightning_hyper_parameters_are_an_inert_placeholder() -> None:
    hparams = load_torch_file(LIGHTNING)["hyper_parameters"]
    assert isinstance(hparams, Placeholder)
    assert (type(hparams).module, type(hparams).name) == (
        "lightning.fabric.utilities.data",
        "AttributeDict",
    )
    assert hparams.items == {"lr": 1e-4, "num_classes": 10, "note": "not weights"}
    assert hparams["num_classes"] == 10 and "lr" in hparams and dict(hparams) == hparams.items
    assert "AttributeDict" in repr(hparams)
    assert not any(m == "lightning" or m.startswith("lightning.") for m in sys.modules)


def test_bf16_checkpoint(weights: dict[str, np.ndarray]) -> None:
    state = load_torch_file(BF16)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    assert_same(state, bf16, ml_dtypes.bfloat16)


def test_views_into_one_shared_storage(weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read_member = _torch_pickle._Archive._read_member

    def counting(self: Any, info: zipfile.ZipInfo) -> np.ndarray:
        reads.append(info.filename)
        return read_member(self, info)

    monkeypatch.setattr(_torch_pickle._Archive, "_read_member", counting)
    state = load_torch_file(VIEWS)
    assert_same(state, weights, np.float32)
    assert reads == ["model_c2i_views/data/0"]  # 70 tensors, one storage read once.
    for value in state.values():
        assert value.flags.owndata and value.flags.c_contiguous and value.flags.writeable


def test_compressed_members_are_read_too(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(VIEWS) as src:
        records = {info.filename: src.read(info) for info in src.infolist()}
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name, data in records.items():
            dst.writestr(name, data)
    assert_same(load_torch_file(os.fspath(deflated)), weights, np.float32)


# ---------------------------------------------------------------------------------------
# Layouts of other torch versions and edge cases, built by hand.


def test_storage_and_rebuild_variants(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32)
    halves = np.arange(4, dtype=np.float16)
    floats = Storage("0", "FloatStorage", 12)
    untyped = Storage("1", Global("torch.storage", "UntypedStorage"), 8)
    by_dtype = Storage("2", Global("torch", "float16"), 4)
    v3 = Global("torch._utils", "_rebuild_tensor_v3")
    parameter = Global("torch._utils", "_rebuild_parameter")
    with_state = Global("torch._utils", "_rebuild_parameter_with_state")
    from_type = Global("torch._tensor", "_rebuild_from_type_v2")
    obj = {
        "transposed": tensor(floats, 1, (4, 2), (1, 4)),
        "scalar": tensor(floats, 5, (), ()),
        "expanded": tensor(floats, 2, (3, 2), (0, 1)),
        "empty": tensor(floats, 0, (0, 3), (3, 1)),
        "parameter": Call(parameter, tensor(floats, 0, (12,), (1,)), True, OrderedDict()),
        "with_state": Call(with_state, tensor(floats, 0, (2,), (1,)), True, OrderedDict(), {}),
        "subclass": Call(
            from_type,
            Global("torch._utils", "_rebuild_tensor_v2"),
            Global("torch._tensor", "Tensor"),
            (floats, 3, (2,), (1,), False, OrderedDict()),
            {"attribute": 1},
        ),
        "v3_half": Call(v3, untyped, 1, (3,), (1,), False, OrderedDict(), Global("torch", "float16")),
        "dtype_in_storage": tensor(by_dtype, 0, (2, 2), (2, 1)),
        "dtype": Global("torch", "bfloat16"),
        "size": Call(Global("torch", "Size"), (2, 3)),
    }
    path = write_checkpoint(
        tmp_path / "variants.pt",
        obj,
        {"0": values.tobytes(), "1": halves.tobytes(), "2": halves.tobytes()},
    )
    got = load_torch_file(path)
    np.testing.assert_array_equal(got["transposed"], values[1:9].reshape(2, 4).T)
    assert got["scalar"].shape == () and got["scalar"] == 5
    np.testing.assert_array_equal(got["expanded"], np.broadcast_to(values[2:4], (3, 2)))
    assert got["expanded"].flags.owndata and got["expanded"].flags.writeable
    assert got["empty"].shape == (0, 3) and got["empty"].dtype == np.float32
    np.testing.assert_array_equal(got["parameter"], values)
    np.testing.assert_array_equal(got["with_state"], values[:2])
    np.testing.assert_array_equal(got["subclass"], values[3:5])
    assert got["v3_half"].dtype == np.float16
    np.testing.assert_array_equal(got["v3_half"], halves[1:4])
    np.testing.assert_array_equal(got["dtype_in_storage"], halves.reshape(2, 2))
    assert got["dtype"] == TorchDtype("bfloat16", np.dtype(ml_dtypes.bfloat16))
    assert got["size"] == (2, 3)


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    storage = Storage("0", "FloatStorage", 3)
    path = write_checkpoint(
        tmp_path / "big.pt",
        {"w": tensor(storage, 0, (3,), (1,))},
        {"0": values.astype(">f4").tobytes()},
        byteorder="big",
    )
    got = load_torch_file(path)["w"]
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_plain_python_and_numpy_values(tmp_path: Path) -> None:
    obj = {
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"ab"),
        "complex": 1 + 2j,
        "slice": slice(1, 5, 2),
        "range": range(3),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalar": np.float32(0.5),
        "ordered": OrderedDict(a=1),
        "path": Path("runs") / "x",
    }
    path = write_checkpoint(tmp_path / "plain.pt", obj, {})
    got = load_torch_file(path)
    for key in (
        "set",
        "frozen",
        "bytes",
        "bytearray",
        "complex",
        "slice",
        "range",
        "ordered",
    ):
        assert got[key] == obj[key], key
    np.testing.assert_array_equal(got["array"], obj["array"])
    assert got["array"].dtype == np.int16
    assert got["scalar"] == np.float32(0.5) and got["scalar"].dtype == np.float32
    assert str(got["path"]) == str(obj["path"])
    assert not hasattr(got["path"], "read_text")  # A pure path: no file-system access.


def test_foreign_classes_become_placeholders(tmp_path: Path) -> None:
    module = "not_installed_trainer.config"
    built = Call(Global(module, "Config"), 1, "two", state={"depth": 3})
    obj = {"config": built, "same_class": Call(Global(module, "Config"))}
    path = write_checkpoint(tmp_path / "foreign.pt", obj, {})
    got = load_torch_file(path)
    config = got["config"]
    assert isinstance(config, Placeholder)
    assert (config.module, config.name) == (module, "Config")
    assert config.args == (1, "two") and config.state == {"depth": 3}
    assert type(got["same_class"]) is type(config)
    assert not any(m.startswith("not_installed_trainer") for m in sys.modules)


def test_placeholder_records_dict_and_list_items(tmp_path: Path) -> None:
    # GLOBAL, EMPTY_TUPLE, NEWOBJ, then SETITEMS / APPENDS, as for dict and list subclasses.
    dict_like = b"cfaraway.pkg\nAttrs\n)\x81(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02u"
    list_like = b"cfaraway.pkg\nItems\n)\x81(K\x01K\x02K\x03e"
    data = b"\x80\x02(" + dict_like + list_like + b"l."
    path = write_zip(tmp_path / "items.pt", {"data.pkl": data})
    attrs, items = load_torch_file(path)
    assert attrs.items == {"a": 1, "b": 2} and attrs["b"] == 2 and attrs.get("c") is None
    assert items.list_items == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# Hostile pickles.


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


def test_malicious_reduce_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps({"w": RunsACommand(f"touch {marker}")}, protocol=2)
    path = write_zip(tmp_path / "evil.pt", {"data.pkl": data})
    with pytest.raises(UnsafeCheckpointError, match=rf"{os.system.__module__}\.system") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("nt", "system"),
        ("subprocess", "Popen"),
        ("subprocess", "run"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("__builtin__", "exec"),
        ("__builtin__", "eval"),
        ("builtins", "__import__"),
        ("builtins", "open"),
        ("sys", "exit"),
        ("shutil", "rmtree"),
        ("importlib", "import_module"),
        ("pickle", "loads"),
        ("socket", "socket"),
        ("runpy", "_run_code"),
        ("codecs", "open"),
        ("functools", "partial"),
        ("operator", "attrgetter"),
        ("io", "FileIO"),
        ("pathlib", "Path.write_text"),
        ("ctypes", "CDLL"),
        ("types", "FunctionType"),
        ("numpy", "load"),
        ("numpy.testing._private.utils", "runstring"),
        ("torch", "load"),
        ("torch.jit", "load"),
        ("torch.hub", "load"),
        ("torch._utils", "_import_dotted_name"),
        ("some.package", "eval"),
    ],
)
def test_dangerous_globals_are_refused(tmp_path: Path, module: str, name: str) -> None:
    # GLOBAL module.name, then a REDUCE calling it: refused when the global is looked up.
    data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x02\x00\x00\x00hi\x85R."
    path = write_zip(tmp_path / "evil.pt", {"data.pkl": data})
    with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
        load_torch_file(path)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x05\x96\x00\x00\x00\x00\x00\x01\x00\x00abc.",  # BYTEARRAY8 of 2**40 bytes
        b"\x80\x05\x8e\x00\x00\x00\x00\x00\x01\x00\x00abc.",  # BINBYTES8 of 2**40 bytes
    ],
)
def test_hostile_lengths_allocate_nothing(tmp_path: Path, data: bytes) -> None:
    path = write_zip(tmp_path / "lengths.pt", {"data.pkl": data})
    with pytest.raises(CheckpointFormatError, match="cannot unpickle"):
        load_torch_file(path)


def test_hostile_memo_index_allocates_nothing(tmp_path: Path) -> None:
    data = b"\x80\x02K\x01r\xff\xff\xff\xff0j\xff\xff\xff\xff."  # memo index 2**32 - 1
    assert load_torch_file(write_zip(tmp_path / "memo.pt", {"data.pkl": data})) == 1


def test_vetted_callables_cannot_be_altered(tmp_path: Path) -> None:
    # BUILD (None, {"__defaults__": ()}) on the allowed `_codecs.encode`.
    data = b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    path = write_zip(tmp_path / "build.pt", {"data.pkl": data})
    with pytest.raises(CheckpointFormatError, match="AttributeError"):
        load_torch_file(path)
    assert load_torch_file(write_checkpoint(tmp_path / "ok.pt", b"\x01", {})) == b"\x01"


def test_views_past_the_storage_are_refused(tmp_path: Path) -> None:
    storage = Storage("0", "FloatStorage", 4)
    obj = {"w": tensor(storage, 2, (3,), (1,))}
    path = write_checkpoint(tmp_path / "oob.pt", obj, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointFormatError, match="past the end of storage"):
        load_torch_file(path)


# ---------------------------------------------------------------------------------------
# Files that are not (whole) checkpoints.


def test_random_bytes_are_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointFormatError, match="not a zip archive") as info:
        load_torch_file(path)
    assert str(path) in str(info.value) and "re-save" in str(info.value)
    assert info.value.__cause__ is not None


def test_legacy_torch_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointFormatError, match="legacy") as info:
        load_torch_file(path)
    assert str(path) in str(info.value) and "recent torch" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        load_torch_file(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = LIGHTNING.read_bytes()
    path = tmp_path / "half.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "other.zip", {"notes.txt": b"hello"})
    with pytest.raises(CheckpointFormatError, match="data.pkl") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_missing_storage_record(tmp_path: Path) -> None:
    storage = Storage("7", "FloatStorage", 3)
    path = write_checkpoint(tmp_path / "missing.pt", {"w": tensor(storage, 0, (3,), (1,))}, {})
    with pytest.raises(CheckpointFormatError, match="archive/data/7") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_short_storage_record(tmp_path: Path) -> None:
    storage = Storage("0", "FloatStorage", 8)
    obj = {"w": tensor(storage, 0, (8,), (1,))}
    path = write_checkpoint(tmp_path / "short.pt", obj, {"0": np.zeros(3, np.float32).tobytes()})
    with pytest.raises(CheckpointFormatError, match="fewer than") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_corrupt_pickle(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "corrupt.pt", {"data.pkl": b"\x80\x02}(Xgarbage"})
    with pytest.raises(CheckpointFormatError, match="cannot unpickle") as info:
        load_torch_file(path)
    assert str(path) in str(info.value) and info.value.__cause__ is not None

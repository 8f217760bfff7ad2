"""Hand-made hostile checkpoint files: one per attack class the reader must survive.

Each builder returns the bytes of a file; `ATTACKS` maps a name to `(suffix, builder)`.
Used by `test_checkpoint_safety.py` (each attack once) and `test_fuzz.py` (as seeds).
"""

import io
import pickle
import struct
import zipfile

import numpy as np


KEY = "final_layer.linear.bias"


def zip_records(records: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch-style zip: records under `archive/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in records.items():
            zf.writestr(f"archive/{name}", data)
    return buffer.getvalue()


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _persistent_storage(key: str, numel: int) -> bytes:
    """A protocol-2 pickle fragment pushing `("storage", FloatStorage, key, "cpu", numel)` as a persistent id."""
    return (
        b"("
        + pickle.dumps("storage", 2)[2:-1]
        + _global("torch", "FloatStorage")
        + pickle.dumps(key, 2)[2:-1]
        + pickle.dumps("cpu", 2)[2:-1]
        + pickle.dumps(numel, 2)[2:-1]
        + b"tQ"
    )


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...], numel: int, offset: int = 0) -> bytes:
    """`{KEY: _rebuild_tensor_v2(storage "0", offset, size, stride, False, OrderedDict())}`."""
    args = (
        b"("
        + _persistent_storage("0", numel)
        + pickle.dumps(offset, 2)[2:-1]
        + pickle.dumps(size, 2)[2:-1]
        + pickle.dumps(stride, 2)[2:-1]
        + b"\x89"
        + _global("collections", "OrderedDict")
        + b")R"
        + b"t"
    )
    body = b"}" + pickle.dumps(KEY, 2)[2:-1] + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs"
    return b"\x80\x02" + body + b"."


def structured_dtype() -> bytes:
    """numpy array whose dtype `__setstate__` puts a field 1 GiB past its buffer (issue finding 1)."""
    d = np.dtype("V4")
    d.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("<f4"), 2**30)}, 4, 1, 16))
    a = np.zeros(0)
    a.__setstate__((1, (3,), d, False, b"\0" * 12))
    return zip_records({"data.pkl": pickle.dumps({KEY: a}, protocol=2)})


def structured_dtype_small_offset() -> bytes:
    """The same with a field 8 bytes in: an out-of-bounds read that does not crash."""
    d = np.dtype("V4")
    d.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("<f4"), 8)}, 4, 1, 16))
    a = np.zeros(0)
    a.__setstate__((1, (3,), d, False, b"\0" * 12))
    return zip_records({"data.pkl": pickle.dumps({KEY: a}, protocol=2)})


def dtype_setstate() -> bytes:
    """A plain `numpy.dtype("f4")` followed by a BUILD whose state declares a field: refused."""
    d = np.dtype("V4")
    d.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("<f4"), 2**30)}, 4, 1, 16))
    data = pickle.dumps({KEY: d}, protocol=2)
    assert data.count(b"V4") == 1
    return zip_records({"data.pkl": data.replace(b"V4", b"f4")})


def stride_zero_view() -> bytes:
    """A 4-byte storage viewed as 20000 x 20000 with stride 0: 1.6 GB if copied."""
    return zip_records({"data.pkl": _tensor_pickle((20000, 20000), (0, 0), 1), "data/0": b"\0" * 4})


def list_of_range() -> bytes:
    """`list(range(10**8))` through the allowed `list` and `range` globals (3.9 GB)."""
    data = b"\x80\x02}" + pickle.dumps(KEY, 2)[2:-1]
    data += _global("builtins", "list") + _global("builtins", "range") + b"J\x00\xe1\xf5\x05\x85R\x85Rs."
    return zip_records({"data.pkl": data})


def tuple_copies() -> bytes:
    """`tuple(L)` of one 10^5-element list, 10^3 times (10^8 elements copied, from a small file)."""
    body = b"]q\x00(" + b"K\x01" * 100_000 + b"e"
    body += b"(" + (_global("builtins", "tuple") + b"h\x00\x85R") * 1000 + b"l"
    return zip_records({"data.pkl": b"\x80\x02}" + pickle.dumps(KEY, 2)[2:-1] + body + b"s."})


def repeated_copies() -> bytes:
    """One 1 MB string encoded to bytes 10^4 times (10 GB of copies from a 1 MB file)."""
    body = pickle.dumps("x" * 1_000_000, 2)[2:-1] + b"q\x000("
    body += (_global("_codecs", "encode") + b"h\x00" + b"X\x06\x00\x00\x00latin1" + b"\x86R") * 10_000
    body += b"l"
    return zip_records({"data.pkl": b"\x80\x02}" + pickle.dumps(KEY, 2)[2:-1] + body + b"s."})


def zip_bomb_pickle() -> bytes:
    """A `data.pkl` of 20 MB of NONE/POP opcodes, deflated to 20 KB."""
    data = b"\x80\x02" + b"N0" * 10_000_000 + b"}."
    return zip_records({"data.pkl": data}, zipfile.ZIP_DEFLATED)


def zip_bomb_storage() -> bytes:
    """A deflated storage that inflates to 40 MB."""
    pkl = _tensor_pickle((10_000_000,), (1,), 10_000_000)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", b"\0" * 40_000_000, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def shared_references() -> bytes:
    """Lists of shared references nested 40 deep: 608 bytes, 2^40 paths."""
    x: list = []
    for _ in range(40):
        x = [x, x]
    return zip_records({"data.pkl": pickle.dumps({KEY: x}, protocol=2)})


def deep_nesting() -> bytes:
    """Lists nested 100,000 deep (a recursive walk or `repr` would overflow the stack)."""
    body = b"]" * 100_000 + b"a" * 99_999
    return zip_records({"data.pkl": b"\x80\x02}" + pickle.dumps(KEY, 2)[2:-1] + body + b"s."})


def long_dotted_key() -> bytes:
    """One key of 10^6 dots (prefix inference used to be quadratic in it)."""
    return zip_records({"data.pkl": pickle.dumps({"." * 1_000_000 + KEY: 1.0}, protocol=2)})


def none_pop_flood() -> bytes:
    """3 million NONE/POP opcodes (over the opcode budget), stored."""
    return zip_records({"data.pkl": b"\x80\x02" + b"N0" * 1_500_000 + b"}."})


def lzma_member() -> bytes:
    """A stored `data.pkl` whose zip headers claim LZMA compression (one byte each)."""
    data = bytearray(zip_records({"data.pkl": pickle.dumps({KEY: 1.0}, protocol=2)}))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, local + 8, zipfile.ZIP_LZMA)
    struct.pack_into("<H", data, central + 10, zipfile.ZIP_LZMA)
    return bytes(data)


def bad_crc_storage() -> bytes:
    """A stored tensor whose bytes no longer match the zip CRC-32 (a flipped bit)."""
    pkl = _tensor_pickle((4,), (1,), 4)
    data = bytearray(zip_records({"data.pkl": pkl, "data/0": np.arange(4, dtype="<f4").tobytes()}))
    at = data.find(np.arange(4, dtype="<f4").tobytes()) + 5
    data[at] ^= 0x10
    return bytes(data)


def hostile_global(module: str = "os", name: str = "system", canary: str = "canary") -> bytes:
    """`module.name("touch <canary>")`: must be refused before anything runs."""
    data = b"\x80\x02" + _global(module, name) + pickle.dumps(f"touch {canary}", 2)[2:-1] + b"\x85R."
    return zip_records({"data.pkl": data})


ATTACKS = {
    "structured-dtype": structured_dtype,
    "structured-dtype-small-offset": structured_dtype_small_offset,
    "dtype-setstate": dtype_setstate,
    "stride-zero-view": stride_zero_view,
    "list-of-range": list_of_range,
    "tuple-copies": tuple_copies,
    "repeated-copies": repeated_copies,
    "zip-bomb-pickle": zip_bomb_pickle,
    "zip-bomb-storage": zip_bomb_storage,
    "shared-references": shared_references,
    "deep-nesting": deep_nesting,
    "long-dotted-key": long_dotted_key,
    "none-pop-flood": none_pop_flood,
    "lzma-member": lzma_member,
    "bad-crc-storage": bad_crc_storage,
    "hostile-global": hostile_global,
}

"""Read PyTorch checkpoints (`torch.save`'s zip format) without torch, and safely.

A `torch.save` file is a zip archive: `<archive>/data.pkl` is a pickle of the saved
object, in which every tensor is a call to `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` and every storage is a *persistent id*
`("storage", storage_type, key, location, numel)` naming the raw little-endian bytes in
`<archive>/data/<key>`. This module rebuilds such files as numpy arrays, never
importing torch, and never running anything the file names.

**Safety.** Unpickling normally imports and calls whatever globals the pickle names,
which lets a crafted checkpoint run code (`os.system` through `__reduce__`). Here the
unpickler's `find_class` decides every global:

1. A short allow table maps the globals a checkpoint legitimately needs onto this
   module's own implementations or onto vetted, data-only constructors: torch's
   tensor/parameter rebuild functions, storage types and dtypes, `collections.OrderedDict`
   and `defaultdict`, the harmless builtins `set`, `frozenset`, `slice`, `complex`,
   `range`, `dict`, `list`, `tuple`, `object`, `Ellipsis`, `NotImplemented` and a guarded
   `bytearray`, the `_codecs.encode(str, "latin1")` that protocol 2 uses for `bytes`,
   `copyreg`'s reconstructors (reimplemented for placeholders and plain containers),
   numpy arrays/scalars/dtypes, `datetime` values, and `pathlib` paths (as pure paths,
   which cannot touch the file system).
2. Everything else from a module that reaches the interpreter, the operating system,
   the network or another deserialiser (`os`, `posix`, `subprocess`, `builtins`, `sys`,
   `importlib`, `pickle`, `functools`, `operator`, `io`, `pathlib`, `ctypes`, `numpy`,
   ..., torch's code-loading namespaces such as `torch.jit` or `torch.hub`, and names such
   as `eval`, `exec`, `system` or `load` in any module) is refused with
   [`UnsafeCheckpointError`][], before anything from the file runs.
3. Any other global (a class from Lightning, argparse, the training script's
   `__main__`, ...) becomes an inert [`Placeholder`][] subclass: never imported, and
   recording, rather than running, whatever the pickle does to build it.

Placeholders never execute anything, so the deny list of rule 2 is not what keeps the
reader safe: it makes an overtly hostile file fail loudly instead of loading quietly.

Storages stored uncompressed (as `torch.save` writes them) are memory-mapped, each read
at most once however many tensors view it; every returned array is a contiguous copy
that owns its memory, so nothing refers to the file once `load_torch_file` returns.
Every record read is checked against its zip CRC-32, memory-mapped storages included.

**Budgets.** A small file must not be able to take unbounded memory or time, so reading
is metered against [`BUDGET`][] (a [`ReadBudget`][]): pickle opcodes run, objects built
(counting a shared reference once per place it is used), nesting depth, bytes
materialised by tensors relative to the bytes of the storages read, decompressed bytes
relative to the file's size (zip bombs), and key lengths. Numpy dtypes are rebuilt from an
allow-list of plain numeric types (never a structured, void or object dtype, never through
`dtype.__setstate__`), and every tensor view is checked against its storage's bounds. Every
step is linear in the file's size. A file over a budget raises [`CheckpointFormatError`][]
naming the budget; `MemoryError`, `RecursionError` and decoder errors never escape.
"""

import _compat_pickle
import dataclasses
import datetime
import io
import mmap
import os
import pathlib
import pickle
import reprlib
import struct
import sys
import zipfile
import zlib
from collections import defaultdict, OrderedDict
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import Any, ClassVar, NamedTuple, no_type_check

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided


__all__ = [
    "BUDGET",
    "CheckpointFormatError",
    "Placeholder",
    "ReadBudget",
    "TorchDtype",
    "UnsafeCheckpointError",
    "load_torch_file",
]


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names a global that could run code; nothing was executed."""


class CheckpointFormatError(ValueError):
    """The file is not a readable `torch.save` zip checkpoint (wrong format, truncated, corrupt)."""


@dataclasses.dataclass(frozen=True)
class ReadBudget:
    """The limits that reading one untrusted checkpoint is held to.

    Each is far above what a real checkpoint needs (a PixelDiT-XL state dict runs about
    20,000 opcodes and builds about 5,000 objects) and far below what exhausts a machine.

    **Fields:**

    - `max_opcodes`: pickle opcodes run while unpickling `data.pkl`.
    - `max_objects`: objects built, counting every element a container constructor
        copies and every use of a shared reference (a small pickle can otherwise describe
        a structure with 2^40 paths).
    - `max_depth`: the nesting depth of containers.
    - `max_key_length`: the length of a dictionary key (or state-dict key), in characters.
    - `materialise_ratio`, `materialise_slack`: tensor bytes built may not exceed
        `materialise_ratio` times the bytes of the storages read, plus `materialise_slack`.
    - `decompress_ratio`, `decompress_slack`: decompressed record bytes may not exceed
        `decompress_ratio` times the file's size, plus `decompress_slack` (zip bombs).
    """

    max_opcodes: int = 2_000_000
    max_objects: int = 2_000_000
    max_depth: int = 100
    max_key_length: int = 4096
    materialise_ratio: int = 4
    materialise_slack: int = 16 << 20
    decompress_ratio: int = 100
    decompress_slack: int = 1 << 20


#: The budget [`load_torch_file`][] enforces (replace it to change the limits).
BUDGET = ReadBudget()


def _over_budget(path: str, what: str, value: int, limit: int, name: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path}: over the reading budget for {what}: {value} > {limit} (`ReadBudget.{name}`); a hostile or "
        "corrupt checkpoint, or one far larger than a model's weights need"
    )


class _ShortRepr(reprlib.Repr):
    """A bounded `repr` for messages: an untrusted object's own `repr` may be huge or recursive."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxstring = self.maxother = self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if abs(x) < 10**40 else f"<int of {x.bit_length()} bits>"

    def repr_instance(self, x: Any, level: int) -> str:
        if isinstance(x, type):
            return f"<class {x.__name__[:60]}>"
        if isinstance(x, Placeholder):
            return f"<Placeholder {type(x).module}.{type(x).name}>"
        if isinstance(x, np.ndarray):
            return f"<array {x.dtype.str} {x.shape}>"
        if isinstance(x, int | float | complex | str | bytes | TorchDtype | np.generic):
            return super().repr_instance(x, level)
        return f"<{type(x).__name__}>"

    def repr_tuple(self, x: tuple, level: int) -> str:
        return self.repr_instance(x, level) if hasattr(x, "_fields") else super().repr_tuple(x, level)


_short = _ShortRepr().repr


class TorchDtype(NamedTuple):
    """A `torch.dtype` named in a checkpoint, as its torch name and numpy equivalent.

    Found wherever the saved object held a dtype (for example in hyper-parameters).
    """

    name: str
    numpy_dtype: np.dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageType(NamedTuple):
    """A torch storage class (`torch.FloatStorage`, `torch.UntypedStorage`, ...) as its element dtype."""

    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    """One storage record of the archive, as a persistent id describes it."""

    key: str
    dtype: np.dtype
    numel: int


class _NdarrayType(NamedTuple):
    """Stands for `numpy.ndarray` as the subtype argument of numpy's `_reconstruct`."""


_BF16 = np.dtype(ml_dtypes.bfloat16)

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": _BF16,
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

_STORAGE_TYPES: dict[str, np.dtype] = {
    "FloatStorage": _TORCH_DTYPES["float32"],
    "DoubleStorage": _TORCH_DTYPES["float64"],
    "HalfStorage": _TORCH_DTYPES["float16"],
    "BFloat16Storage": _BF16,
    "LongStorage": _TORCH_DTYPES["int64"],
    "IntStorage": _TORCH_DTYPES["int32"],
    "ShortStorage": _TORCH_DTYPES["int16"],
    "CharStorage": _TORCH_DTYPES["int8"],
    "ByteStorage": _TORCH_DTYPES["uint8"],
    "BoolStorage": _TORCH_DTYPES["bool"],
    "ComplexFloatStorage": _TORCH_DTYPES["complex64"],
    "ComplexDoubleStorage": _TORCH_DTYPES["complex128"],
    # Bytes; `_rebuild_tensor_v3` gives the tensor's dtype.
    "UntypedStorage": _TORCH_DTYPES["uint8"],
}

# torch layouts this reader knows but does not rebuild: a clear format error, not a refusal.
_UNSUPPORTED_TORCH = frozenset(
    "_rebuild_qtensor _rebuild_sparse_tensor _rebuild_sparse_csr_tensor "
    "_rebuild_nested_tensor _rebuild_meta_tensor_no_storage "
    "_rebuild_wrapper_subclass _rebuild_xla_tensor _rebuild_mtia_tensor "
    "_rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor "
    "QUInt8Storage QInt8Storage QInt32Storage QUInt4x2Storage QUInt2x4Storage".split()
)

# Rule 2: modules (matched on the first component of the module path, after Python 2
# names are mapped) that reach the interpreter, the OS, the network or a deserialiser.
_DENIED_ROOTS = frozenset(
    "builtins __builtin__ __builtins__ exceptions os posix nt posixpath ntpath "
    "subprocess _posixsubprocess _winapi msvcrt winreg pty sys shutil tempfile "
    "glob fileinput io _io pathlib importlib imp pkgutil zipimport runpy site "
    "sysconfig code codeop compileall py_compile ast inspect types gc weakref "
    "_weakref atexit signal threading _thread multiprocessing concurrent asyncio "
    "pickle _pickle pickletools copyreg copy_reg shelve marshal dill cloudpickle "
    "joblib codecs _codecs functools _functools operator _operator ctypes _ctypes "
    "cffi socket _socket ssl select selectors http urllib urllib2 xmlrpc ftplib "
    "smtplib telnetlib webbrowser platform pdb bdb trace timeit profile cProfile "
    "doctest logging setuptools distutils pip numpy".split()
)

# torch namespaces that load or compile code (`torch.jit.load`, `torch.hub.load`, FX's
# generated code, C++ extensions, ...), matched as module prefixes.
_DENIED_TORCH_MODULES = tuple(
    "torch._C torch._utils torch._ops torch.ops torch._classes torch.classes "
    "torch.library torch.hub torch.jit torch.fx torch.package torch.serialization "
    "torch.utils.cpp_extension torch._dynamo torch._inductor torch.compiler "
    "torch.export torch._export torch.distributed.rpc torch.multiprocessing".split()
)

# Names refused in any module (checked on every dotted component of the name).
_DENIED_NAMES = frozenset(
    "eval exec execfile compile __import__ import_module system popen Popen spawn "
    "check_call check_output run_path run_module getattr setattr delattr open "
    "input breakpoint load loads runstring from_file".split()
)

_SAFE_BUILTINS: dict[str, Any] = {
    "set": set,
    "frozenset": frozenset,
    "slice": slice,
    "complex": complex,
    "range": range,
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "object": object,
    "Ellipsis": Ellipsis,
    "NotImplemented": NotImplemented,
}

# Types that `copyreg`'s reconstructors may build besides placeholders.
_SAFE_NEW_TYPES = (dict, list, tuple, set, frozenset, OrderedDict, defaultdict, object)

_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
# A zip member's local file header (30 bytes), which precedes its data.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")

_MISSING = object()
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_SCALAR: Any = np.float64(0).__reduce__()[0]


class Placeholder:
    """Inert stand-in for a class that a checkpoint names but this reader will not import.

    Each foreign global (say `lightning.fabric.utilities.data.AttributeDict`) gets its own
    subclass, whose class attributes `module` and `name` say what it stands for. Building
    an instance runs nothing: the pickle's construction steps are recorded instead, so the
    data stays reachable:

    - `args`, `kwargs`: the arguments the pickle constructed it with (`__reduce__`,
        `__new__`/`__init__` arguments);
    - `state`: what the pickle passed to `__setstate__` (often the object's `__dict__`,
        e.g. the values of an `argparse.Namespace`), or `None`;
    - `items`: a dict of the key/value pairs the pickle set on it (what a dict subclass,
        such as Lightning's `AttributeDict` of hyper-parameters, holds);
    - `list_items`: a list of what the pickle appended to it (a list subclass).

    For convenience `placeholder[key]`, `key in placeholder`, `placeholder.get(key)` and
    `placeholder.keys()` read `items`, so `dict(placeholder)` copies them out.
    """

    module: ClassVar[str] = ""
    name: ClassVar[str] = ""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    list_items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = {}
        self.list_items = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Does nothing: `__new__` has recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        """Record a pickled list item."""
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        """Record pickled list items."""
        self.list_items.extend(values)

    def __getitem__(self, key: Any) -> Any:
        return self.items[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.items

    def get(self, key: Any, default: Any = None) -> Any:
        """`items.get(key, default)`."""
        return self.items.get(key, default)

    def keys(self) -> Any:
        """`items.keys()`."""
        return self.items.keys()

    def __repr__(self) -> str:
        fields = [f"{type(self).module}.{type(self).name}"]
        for field in ("args", "kwargs", "state", "items", "list_items"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, tuple | dict | list) or value):
                fields.append(f"{field}={_short(value)}")
        return f"Placeholder({', '.join(fields)})"


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    """A fresh `Placeholder` subclass standing for `module.name`."""
    return type(
        f"Placeholder[{module}.{name}]",
        (Placeholder,),
        {"module": module, "name": name, "__module__": __name__},
    )


def _is_placeholder_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


def _decode(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _diagnose_not_zip(path: str, head: bytes, size: int) -> str:
    """Why `path`, whose first bytes are `head`, is not a zip checkpoint."""
    resave = (
        "re-save it with a recent torch (`torch.save(torch.load(old), new)`, torch >= 1.6 "
        "writes the zip format) and load that"
    )
    if size == 0:
        return f"{path}: the file is empty"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return (
            f"{path}: this is PyTorch's legacy (pre-1.6, non-zip) checkpoint format, which "
            f"this reader does not support; {resave}"
        )
    if head[:1] == b"\x80":
        return f"{path}: this is a bare pickle, not a torch zip checkpoint (possibly the legacy torch format); {resave}"
    if len(head) > 262 and head[257:262] == b"ustar":
        return f"{path}: this is a tar archive (torch's oldest checkpoint format); {resave}"
    if size >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return (
            f"{path}: this looks like a safetensors file, not a torch checkpoint; read it "
            "with `safetensors.numpy.load_file`"
        )
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{path}: the zip archive is incomplete or damaged (its end, with the zip "
            "directory, is missing or unreadable): the file is probably truncated; was the "
            "download or the save interrupted?"
        )
    return (
        f"{path}: not a zip archive, so not a `torch.save` checkpoint of torch >= 1.6; "
        f"if it is an older torch checkpoint, {resave}"
    )


class _Archive:
    """An open torch zip checkpoint: its pickle and its storage records."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        self._mmap: mmap.mmap | None = None
        self._storages: dict[str, np.ndarray] = {}
        self.budget = BUDGET
        self.file_size = 0
        self.decompressed = 0  # Bytes of records read (decompressed), for the zip-bomb budget.
        self.storage_bytes = 0  # Bytes of storages read, for the materialisation budget.
        try:
            try:
                self._zip = zipfile.ZipFile(self._file)
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                OSError,
                EOFError,
                ValueError,
                NotImplementedError,  # A zip feature or version zipfile lacks.
            ) as e:
                self._file.seek(0)
                head = self._file.read(512)
                size = os.fstat(self._file.fileno()).st_size
                raise CheckpointFormatError(_diagnose_not_zip(path, head, size)) from e
            self.file_size = os.fstat(self._file.fileno()).st_size
            self.prefix = self._find_prefix()
            self.byteorder = self._read_byteorder()
            try:
                self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self._mmap = None  # Not mappable (a pipe, ...): read members instead.
        except BaseException:
            self.close()
            raise

    def _find_prefix(self) -> str:
        names = self._zip.namelist()
        prefixes = [n[: -len("data.pkl")] for n in names if n.rsplit("/", 1)[-1] == "data.pkl"]
        prefixes = [p for p in prefixes if p.count("/") <= 1]
        if not prefixes:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise CheckpointFormatError(
                f"{self.path}: a zip archive but not a `torch.save` checkpoint: it has no "
                f"'<archive>/data.pkl' record (records: {shown or 'none'})"
            )
        first = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
        return first if first in prefixes else prefixes[0]

    def _read_byteorder(self) -> str:
        name = self.prefix + "byteorder"
        if name not in self._zip.namelist():
            return "little"  # What torch assumes for files without the record.
        order = self._read_record(name).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointFormatError(f"{self.path}: invalid byteorder record {_short(order)}")
        return order

    def _read_record(self, name: str) -> bytes:
        """A record's bytes, decompressed within the budget and checked against its CRC-32.

        Any decoder's error (zlib, bz2, LZMA, a CRC mismatch, ...) is a format error.
        """
        info = self._zip.getinfo(name)
        limit = self.budget.decompress_ratio * self.file_size + self.budget.decompress_slack
        if self.decompressed + info.file_size > limit:
            raise _over_budget(
                self.path,
                f"decompressed bytes (record {_short(name)} declares {info.file_size})",
                self.decompressed + info.file_size,
                limit,
                "decompress_ratio",
            )
        self.decompressed += info.file_size
        try:
            # `ZipFile.read` stops at the declared size and checks the CRC-32 at the end.
            data = self._zip.read(info)
        except MemoryError as e:
            raise CheckpointFormatError(f"{self.path}: out of memory reading the record {_short(name)}") from e
        except Exception as e:  # zipfile, zlib, bz2 and lzma raise a variety of errors.
            raise CheckpointFormatError(
                f"{self.path}: cannot read the record {_short(name)} (truncated, corrupt or unsupported zip "
                f"member): {type(e).__name__}: {str(e)[:200]}"
            ) from e
        if len(data) != info.file_size:
            raise CheckpointFormatError(
                f"{self.path}: the record {_short(name)} holds {len(data)} bytes, not the {info.file_size} its "
                "zip entry declares (truncated or corrupt file)"
            )
        return data

    def pickle_bytes(self) -> bytes:
        """The bytes of `<archive>/data.pkl`."""
        return self._read_record(self.prefix + "data.pkl")

    def storage(self, key: str) -> np.ndarray:
        """The bytes of storage `key` as a read-only `uint8` array, read once and cached."""
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        name = f"{self.prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointFormatError(
                f"{self.path}: the pickle uses storage {_short(key)}, but the archive has no record "
                f"'{name}' (incomplete or corrupt checkpoint)"
            ) from None
        data = self._read_member(info)
        self.storage_bytes += data.size
        self._storages[key] = data
        return data

    def _read_member(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A member's bytes: a view into the memory map if stored uncompressed, else read."""
        if self._mmap is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            return np.frombuffer(self._read_record(info.filename), dtype=np.uint8)
        start = info.header_offset
        header = self._mmap[start : start + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointFormatError(
                f"{self.path}: the record '{info.filename}' has no valid zip header (corrupt file)"
            )
        fields = _LOCAL_HEADER.unpack(header)
        data_start = start + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if info.compress_size != info.file_size or data_start + info.file_size > len(self._mmap):
            raise CheckpointFormatError(
                f"{self.path}: the record {_short(info.filename)} runs past the end of the file (truncated file)"
            )
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.file_size, offset=data_start)
        if zlib.crc32(data.data) != info.CRC:
            raise CheckpointFormatError(
                f"{self.path}: the record {_short(info.filename)} fails its CRC-32 check: the file is corrupt "
                "(flipped bits: a damaged download or disk)"
            )
        return data

    def close(self) -> None:
        """Release the cache, the memory map and the file."""
        self._storages.clear()
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # Only on error paths, where a traceback still holds a view of the map;
                # it is unmapped when that view is collected.
                pass
        self._file.close()


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointFormatError(f"invalid tensor {what} {_short(value)}")
    return value


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise CheckpointFormatError(f"invalid tensor {what} {_short(value)}")
    return tuple(_as_index(v, what) for v in value)


class _Vetted:
    """A vetted callable handed to the pickle, immutable so that no BUILD opcode alters it."""

    __slots__ = ("_func",)

    def __init__(self, func: Callable[..., Any]):
        object.__setattr__(self, "_func", func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot set {name!r} on a vetted checkpoint callable")

    def __repr__(self) -> str:
        return f"<vetted {self._func.__name__}>"


# The pure-Python unpickler, not the C one: given a crafted memo index or length field,
# CPython's C unpickler allocates (and zeroes) memory in proportion to it, which a small
# hostile file can use to exhaust memory. `data.pkl` only holds the structure (the
# tensor bytes are separate records), so the slower unpickler costs little.
# typeshed types `pickle._Unpickler` as the C class, which lacks the pure-Python internals used here.
_PyUnpickler: Any = pickle._Unpickler  # pyright: ignore[reportAttributeAccessIssue]


class _RestrictedUnpickler(_PyUnpickler):
    """Unpickles a checkpoint's `data.pkl` under the allow/deny/placeholder rule."""

    dispatch = dict(_PyUnpickler.dispatch)

    def _load_bytearray8(self) -> None:
        # The stock BYTEARRAY8 handler allocates the declared length before reading.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def _load_reduce(self) -> None:
        # A constructor copies its argument (`list(range(10**8))`, `tuple(a_big_list)`):
        # charge what it copies before it runs.
        self._charge_args(self.stack[-1])
        _PyUnpickler.load_reduce(self)

    dispatch[pickle.REDUCE[0]] = _load_reduce

    def _load_newobj(self) -> None:
        self._charge_args(self.stack[-1])
        _PyUnpickler.load_newobj(self)

    dispatch[pickle.NEWOBJ[0]] = _load_newobj

    def _load_newobj_ex(self) -> None:
        self._charge_args(self.stack[-2])
        _PyUnpickler.load_newobj_ex(self)

    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex

    def _instantiate(self, klass: Any, args: Any) -> None:
        self._charge_args(tuple(args))
        _PyUnpickler._instantiate(self, klass, args)

    def _load_build(self) -> None:
        # numpy arrays and dtypes are built here, from an allow-list, never by numpy's
        # own `__setstate__` on a state the file chose.
        inst = self.stack[-2]
        if isinstance(inst, _PickledArray | _DtypeSpec):
            state = self.stack.pop()
            if isinstance(inst, _DtypeSpec):
                inst.set_byteorder(state)
            else:
                self._build_array(inst, state)
            return
        # Setting a memoised state on many objects copies it each time: charged.
        state = self.stack[-1]
        self._charge_args(state if isinstance(state, tuple) else (state,))
        _PyUnpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, file: io.BytesIO, archive: _Archive):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._budget = archive.budget
        self._pickle_size = len(file.getbuffer())
        self._opcodes = 0
        self._objects = 0
        self._materialised = 0
        self._placeholders: dict[tuple[str, str], type[Placeholder]] = {}
        self._allowed = self._allow_table()

    def _count_opcode(self) -> None:
        """Called once the count `_opcodes` passes the budget."""
        if self._opcodes > self._budget.max_opcodes:
            raise _over_budget(
                self._archive.path, "pickle opcodes", self._opcodes, self._budget.max_opcodes, "max_opcodes"
            )

    def _charge(self, count: int) -> None:
        self._objects += count
        if self._objects > self._budget.max_objects:
            raise _over_budget(
                self._archive.path, "objects built", self._objects, self._budget.max_objects, "max_objects"
            )

    def _charge_args(self, args: Any) -> None:
        """Charge a call: its arguments (a memoised argument tuple may be used many times),
        the elements a constructor would copy, and the text or bytes it would copy."""
        if not isinstance(args, tuple):
            self._charge(1)
            return
        self._charge(1 + len(args) + sum(map(_length, args)))
        copied = sum(len(a) for a in args if isinstance(a, str | bytes | bytearray))
        if copied:
            self._materialise(copied)

    def _materialise(self, nbytes: int) -> None:
        """Charge `nbytes` of array data about to be built."""
        self._materialised += nbytes
        budget = self._budget
        limit = budget.materialise_ratio * (self._archive.storage_bytes + self._pickle_size) + budget.materialise_slack
        if self._materialised > limit:
            raise _over_budget(
                self._archive.path,
                "bytes materialised by tensors, arrays and copies (relative to the storages and pickle read)",
                self._materialised,
                limit,
                "materialise_ratio",
            )

    def _build_array(self, array: "_PickledArray", state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DtypeSpec)):
            raise CheckpointFormatError(f"unsupported numpy array state {_short(state)}")
        _, shape, spec, fortran, raw = state
        shape = _as_shape(shape, "numpy array shape")
        if len(shape) > _MAX_NDIM or not isinstance(raw, bytes | bytearray):
            raise CheckpointFormatError(f"unsupported numpy array state {_short(state)}")
        nbytes = spec.dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes != len(raw):
            raise CheckpointFormatError(
                f"a pickled numpy array of shape {_short(shape)} and dtype {spec.dtype} holds {len(raw)} bytes, "
                f"not {nbytes}"
            )
        self._materialise(nbytes)
        # In native byte order, as the tensors are.
        native = np.frombuffer(bytes(raw), spec.dtype).astype(spec.dtype.newbyteorder("="))
        np.ndarray.__setstate__(array, (1, shape, native.dtype, bool(fortran), native.tobytes()))  # pyright: ignore[reportArgumentType]

    def _allow_table(self) -> dict[tuple[str, str], Any]:
        table: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("collections", "defaultdict"): defaultdict,
            ("_codecs", "encode"): _codecs_encode,
            ("builtins", "bytearray"): _bytearray,
            ("copyreg", "_reconstructor"): _copyreg_reconstructor,
            ("copyreg", "__newobj__"): _copyreg_newobj,
            ("copyreg", "__newobj_ex__"): _copyreg_newobj_ex,
            ("torch", "Size"): tuple,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            (
                "torch._utils",
                "_rebuild_parameter_with_state",
            ): _rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
            ("builtins", "range"): self._range,
        }
        for name, value in _SAFE_BUILTINS.items():
            table.setdefault(("builtins", name), value)
        for name, dtype in _TORCH_DTYPES.items():
            table["torch", name] = TorchDtype(name, dtype)
        for name, dtype in _STORAGE_TYPES.items():
            for module in ("torch", "torch.cuda", "torch.storage"):
                table[module, name] = _StorageType(name, dtype)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            table[module, "_reconstruct"] = _np_reconstruct
            table[module, "scalar"] = _np_scalar
        table["numpy", "ndarray"] = _NdarrayType()
        table["numpy", "dtype"] = _np_dtype
        for name in ("datetime", "date", "time", "timedelta", "timezone"):
            table["datetime", name] = getattr(datetime, name)
        for module in ("pathlib", "pathlib._local"):
            for name in ("PosixPath", "PurePosixPath"):
                table[module, name] = _pure_path(pathlib.PurePosixPath)
            for name in ("WindowsPath", "PureWindowsPath"):
                table[module, name] = _pure_path(pathlib.PureWindowsPath)
            for name in ("Path", "PurePath"):
                table[module, name] = _pure_path(pathlib.PurePath)
        return {
            key: _Vetted(value) if isinstance(value, FunctionType | MethodType) else value
            for key, value in table.items()
        }

    def _refuse(self, module: str, name: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self._archive.path}: refusing to unpickle the global '{module}.{name}' that the "
            "checkpoint names: it can run code or reach the system, and this reader only "
            "rebuilds tensors, plain containers and inert placeholders. Nothing from the "
            "file was executed."
        )

    def find_class(self, module: str, name: str) -> Any:
        written = (module, name)
        # Python 2 names (`__builtin__`, `copy_reg`, ...) are mapped as pickle does, but
        # for every protocol, so that they cannot slip past the deny list.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = self._allowed.get((module, name), _MISSING)
        if allowed is not _MISSING:
            return allowed
        if module.split(".", 1)[0] == "torch" and name in _UNSUPPORTED_TORCH:
            raise CheckpointFormatError(
                f"{self._archive.path}: the checkpoint holds '{module}.{name}' "
                "(quantized, sparse, nested, meta or device-specific tensor data), which "
                "this reader does not support"
            )
        if (
            module.split(".", 1)[0] in _DENIED_ROOTS
            or any(module == m or module.startswith(m + ".") for m in _DENIED_TORCH_MODULES)
            or any(part in _DENIED_NAMES for part in name.split("."))
        ):
            raise self._refuse(*written)
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = _placeholder_class(module, name)
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _decode(pid[0]) == "storage"):
            raise CheckpointFormatError(
                f"{self._archive.path}: unsupported persistent id {_short(pid)} (expected "
                "('storage', type, key, location, numel))"
            )
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, TorchDtype):
            dtype = storage_type.numpy_dtype
        else:
            raise CheckpointFormatError(f"{self._archive.path}: unsupported storage type {_short(storage_type)}")
        key = _decode(key)
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{self._archive.path}: invalid storage key {_short(key)}")
        return _StorageRef(key, dtype, _as_index(numel, "storage size"))

    def _range(self, *args: Any) -> range:
        """`range`, refused when longer than the object budget (a constructor may expand it)."""
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise CheckpointFormatError(f"invalid pickled range arguments {_short(args)}")
        value = range(*args)
        if _length(value) > self._budget.max_objects:
            raise _over_budget(
                self._archive.path, "objects built (a range)", _length(value), self._budget.max_objects, "max_objects"
            )
        return value

    def _tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        dtype: np.dtype | None = None,
    ) -> np.ndarray:
        """The view `storage[offset]` with `size` and `stride` (in elements), as a copy."""
        path = self._archive.path
        if not isinstance(storage, _StorageRef):
            raise CheckpointFormatError(f"{path}: tensor data {_short(storage)} is not a storage")
        offset = _as_index(offset, "storage offset")
        size = _as_shape(size, "size")
        stride = _as_shape(stride, "stride")
        if len(size) != len(stride) or len(size) > _MAX_NDIM:
            raise CheckpointFormatError(
                f"{path}: tensor size {_short(size)} and stride {_short(stride)} differ in length or have "
                f"more than {_MAX_NDIM} dimensions"
            )
        dtype = storage.dtype if dtype is None else dtype
        raw = self._archive.storage(storage.key)
        nbytes = storage.numel * storage.dtype.itemsize
        if raw.size < nbytes:
            raise CheckpointFormatError(
                f"{path}: storage {_short(storage.key)} holds {raw.size} bytes, fewer than the "
                f"{nbytes} its tensors need (truncated or corrupt file)"
            )
        if 0 in size:
            return np.zeros(size, dtype)
        count = nbytes // dtype.itemsize
        # A stride-0 (or overlapping) view copies more than its storage holds: charged.
        out_bytes = dtype.itemsize
        for n in size:
            out_bytes *= n
        self._materialise(out_bytes)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= count:
            raise CheckpointFormatError(
                f"{path}: a tensor of size {_short(size)}, stride {_short(stride)} at offset {offset} reaches "
                f"past the end of storage {_short(storage.key)} ({count} elements)"
            )
        flat = raw[: count * dtype.itemsize].view(dtype)
        view = as_strided(
            flat[offset:],
            shape=size,
            # A dimension of size 1 never steps: its stride (any value) is irrelevant.
            strides=tuple(0 if n == 1 else s * dtype.itemsize for n, s in zip(size, stride)),
            writeable=False,
        )
        out = view.copy()
        if self._archive.byteorder != sys.byteorder and dtype.itemsize > 1:
            out = out.byteswap()
        return out

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray:
        del requires_grad, backward_hooks, metadata
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> np.ndarray:
        del requires_grad, backward_hooks, metadata
        if not isinstance(dtype, TorchDtype):
            raise CheckpointFormatError(f"{self._archive.path}: invalid tensor dtype {_short(dtype)}")
        return self._tensor(storage, offset, size, stride, dtype.numpy_dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    """`torch.nn.Parameter` comes back as its data."""
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    """A `torch.nn.Parameter` with Python attributes comes back as its data."""
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor subclass (or a tensor with attributes) comes back as its plain data.

    `func` must be one of the vetted rebuild functions (not, say, `list`, whose copy of
    `args` would go uncharged).
    """
    if not isinstance(func, _Vetted) or not isinstance(args, tuple):
        raise CheckpointFormatError(f"cannot rebuild a tensor subclass with {_short(func)}")
    return func(*args)


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """`_codecs.encode(text, "latin1")`, how protocol 2 pickles `bytes`, and nothing else."""
    if not isinstance(encoding, str):
        raise CheckpointFormatError(f"invalid pickled bytes encoding {_short(encoding)}")
    if isinstance(obj, str) and encoding.lower().replace("_", "-") in (
        "latin1",
        "latin-1",
        "iso-8859-1",
        "ascii",
        "utf-8",
        "utf8",
    ):
        return obj.encode(encoding)
    raise CheckpointFormatError(f"unsupported pickled bytes encoding {_short(encoding)}")


def _bytearray(*args: Any) -> bytearray:
    """`bytearray` from text and encoding, or from bytes, but not of a pickled length."""
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return bytearray(_codecs_encode(args[0], args[1]))
    raise CheckpointFormatError("unsupported pickled bytearray arguments")


def _is_safe_new_type(cls: Any) -> bool:
    return any(cls is t for t in _SAFE_NEW_TYPES)


def _safe_new(cls: Any, *args: Any, **kwargs: Any) -> Any:
    if _is_placeholder_class(cls) or _is_safe_new_type(cls):
        return cls.__new__(cls, *args, **kwargs)
    raise CheckpointFormatError(f"cannot reconstruct an object of type {_short(cls)}")


def _copyreg_newobj(cls: Any, *args: Any) -> Any:
    """`copyreg.__newobj__`, for placeholders and plain containers only."""
    return _safe_new(cls, *args)


def _copyreg_newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    """`copyreg.__newobj_ex__`, for placeholders and plain containers only."""
    return _safe_new(cls, *args, **kwargs)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects), for placeholders and containers."""
    if _is_placeholder_class(cls) or (_is_safe_new_type(cls) and _is_safe_new_type(base)):
        return cls() if state is None else cls(state)
    raise CheckpointFormatError(f"cannot reconstruct an object of type {_short(cls)}")


class _PickledArray(np.ndarray):
    """A numpy array rebuilt from a pickle; its data is set by the unpickler's BUILD, checked."""


class _DtypeSpec:
    """A pickled `numpy.dtype`: a plain numeric dtype from `_PLAIN_DTYPES`, and its byte order.

    Stands in for numpy's dtype during unpickling, so that the pickle's BUILD reaches
    `set_byteorder`, never `numpy.dtype.__setstate__` (which can declare fields at any
    offset: reading such an array reads outside its buffer).
    """

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def set_byteorder(self, state: Any) -> None:
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[1] in ("<", ">", "|", "=")
            and state[2] is None
            and state[3] is None
            and state[4] is None
        ):
            raise CheckpointFormatError(
                f"unsupported numpy dtype state {_short(state)}: only plain numeric dtypes are read"
            )
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])

    def __repr__(self) -> str:
        return f"<pickled dtype {self.dtype.str}>"


# numpy dtypes a pickle may name (as numpy pickles them): booleans, integers, floats, complex.
_PLAIN_DTYPES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16".split())
_MAX_NDIM = 64


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct`, for plain arrays; the pickle's BUILD then fills it, checked."""
    del shape, dtype
    if not isinstance(subtype, _NdarrayType):
        raise CheckpointFormatError(f"cannot reconstruct a numpy array of type {_short(subtype)}")
    return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


def _np_dtype(obj: Any, align: Any = False, copy: Any = False) -> _DtypeSpec:
    """`numpy.dtype`, for the plain numeric dtypes only."""
    del align, copy
    if not (isinstance(obj, str) and obj in _PLAIN_DTYPES):
        raise CheckpointFormatError(
            f"unsupported numpy dtype {_short(obj)}: only plain numeric dtypes ({', '.join(sorted(_PLAIN_DTYPES))}) "
            "are read"
        )
    return _DtypeSpec(np.dtype(obj))


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's `scalar` (a pickled numpy scalar), for the plain numeric dtypes only."""
    if not isinstance(dtype, _DtypeSpec) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise CheckpointFormatError(f"unsupported pickled numpy scalar of dtype {_short(dtype)}")
    return _NP_SCALAR(dtype.dtype, data)


def _length(value: Any) -> int:
    """How many elements a constructor given `value` would copy (0 for non-containers)."""
    if isinstance(value, range):
        try:
            return len(value)
        except OverflowError:
            return sys.maxsize
    if isinstance(value, list | tuple | dict | set | frozenset):
        return len(value)
    return 0


def _children(value: Any) -> Any:
    """What a loaded object holds (None for a leaf), for `_check_structure`."""
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return value
    if kind in (dict, OrderedDict, defaultdict):
        return [x for item in value.items() for x in item]
    if isinstance(value, Placeholder):
        return (value.args, value.kwargs, value.state, value.items, value.list_items)
    if isinstance(value, slice):
        return (value.start, value.stop, value.step)
    return None


def _check_structure(root: Any, path: str, budget: ReadBudget) -> None:
    """Refuse an object deeper than `max_depth`, with keys longer than `max_key_length`,
    or whose tree (every shared reference expanded) has more than `max_objects` nodes.

    One pass over the distinct objects (a DAG walk, each node's total memoised), so a
    pickle of shared references nested 40 deep is measured, not expanded.
    """
    done: dict[int, int] = {}
    active = {id(root)}
    frames: list[list[Any]] = []

    def push(value: Any, children: Any) -> None:
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str | bytes) and len(key) > budget.max_key_length:
                    raise _over_budget(path, "key length", len(key), budget.max_key_length, "max_key_length")
        frames.append([value, iter(children), 1])
        active.add(id(value))
        if len(frames) > budget.max_depth:
            raise _over_budget(path, "nesting depth", len(frames), budget.max_depth, "max_depth")

    children = _children(root)
    if children is None:
        return
    push(root, children)
    while frames:
        frame = frames[-1]
        child = next(frame[1], _MISSING)
        if child is _MISSING:
            frames.pop()
            active.discard(id(frame[0]))
            done[id(frame[0])] = frame[2]
            if frames:
                frames[-1][2] += frame[2]
            total = frame[2]
        elif id(child) in done:
            frame[2] += done[id(child)]
            total = frame[2]
        elif id(child) in active or (grand := _children(child)) is None:
            frame[2] += 1  # A leaf, or a reference back to an enclosing container.
            total = frame[2]
        else:
            push(child, grand)
            continue
        if total > budget.max_objects:
            raise _over_budget(
                path,
                "objects built (shared references counted at every use)",
                total,
                budget.max_objects,
                "max_objects",
            )


def _pure_path(kind: type[pathlib.PurePath]) -> Callable[..., pathlib.PurePath]:
    def make(*parts: Any) -> pathlib.PurePath:
        if not all(isinstance(p, str) for p in parts):
            raise CheckpointFormatError("a pickled path is not made of strings")
        return kind(*parts)

    return make


# What a corrupt or hostile pickle makes the unpickler (or a vetted constructor) raise.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    struct.error,
)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read a `torch.save` zip checkpoint without torch: tensors come back as numpy arrays.

    Works for `.pt`/`.pth` files and Lightning `.ckpt` files alike. Every tensor (and
    `torch.nn.Parameter`) becomes a contiguous numpy array that owns its memory, with the
    tensor's dtype (`ml_dtypes.bfloat16` for bfloat16); views into shared storages are
    resolved. Containers come back as they were saved (dicts, `OrderedDict`s, lists, ...);
    `torch.dtype`s as [`TorchDtype`][]; any other class as an inert [`Placeholder`][] that
    records its data (see the module docstring for the full rule).

    **Arguments:**

    - `path`: the checkpoint file.

    **Returns:**

    The saved object, typically a state dict `{name: array}` or a Lightning dict whose
    `"state_dict"` holds the weights.

    **Raises:**

    - `UnsafeCheckpointError`: the pickle names a global that could run code (for
        example `os.system`); raised before anything from the file executes.
    - `CheckpointFormatError`: not a zip checkpoint (legacy torch format, another kind of
        file), truncated, corrupt (a record failing its CRC-32, a decoder's error), missing
        a record, holding a non-numeric numpy dtype or a view outside its storage, or over
        a budget of `BUDGET` (named in the message). Both are `ValueError`s whose
        messages name `path`; no `MemoryError` or `RecursionError` escapes.
    """
    path_str = os.fsdecode(path)
    try:
        archive = _Archive(path_str)
    except MemoryError as e:
        raise CheckpointFormatError(f"{path_str}: out of memory opening the zip archive") from e
    try:
        data = archive.pickle_bytes()
        unpickler = _RestrictedUnpickler(io.BytesIO(data), archive)
        try:
            result = unpickler.load()
            _check_structure(result, path_str, archive.budget)
            return result
        except UnsafeCheckpointError:
            raise
        except (MemoryError, RecursionError) as e:
            raise CheckpointFormatError(
                f"{path_str}: cannot unpickle '{archive.prefix}data.pkl': {type(e).__name__} (a hostile or corrupt "
                "checkpoint)"
            ) from e
        except CheckpointFormatError as e:
            if str(e).startswith(path_str):
                raise
            raise CheckpointFormatError(f"{path_str}: {e}") from e
        except _PICKLE_ERRORS as e:
            raise CheckpointFormatError(
                f"{path_str}: cannot unpickle '{archive.prefix}data.pkl' (corrupt or "
                f"unsupported checkpoint): {type(e).__name__}: {str(e)[:200]}"
            ) from e
    finally:
        archive.close()


def _counted(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    # Runs once per opcode: `no_type_check`, so that a runtime type checker's import hook
    # (the test suite's jaxtyping + beartype) leaves it unwrapped.
    @no_type_check
    def run(self):
        self._opcodes += 1
        if self._opcodes > self._budget.max_opcodes:
            self._count_opcode()
        handler(self)

    return run


# Every opcode counts against `ReadBudget.max_opcodes`.
_RestrictedUnpickler.dispatch = {op: _counted(handler) for op, handler in _RestrictedUnpickler.dispatch.items()}

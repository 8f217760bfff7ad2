"""Atomic, verifiable writes: the one path by which this package writes a file.

[`atomic_write`][] writes to a temporary file in the target's folder, fsyncs it,
`os.replace`s it onto the target and fsyncs the folder: a reader (or a crash, or
`kill -9`) sees the previous file or the new one, never a part or a mix; two writers to
one path leave one whole file. A writer killed mid-write leaves its temporary file
(`.<name>.<random>.tmp`) behind, never a damaged target.

[`write_checksummed`][] / [`read_checksummed`][] frame a file as one line of JSON, holding
the sha256 of the header's other fields and of the data and the data's size, then the
data: loading reports truncation, flipped bits and trailing bytes as such.
"""

import contextlib
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._torch_pickle import CheckpointFormatError


_CHUNK = 1 << 20
_SIZE_DIGITS = 20
# The safetensors `__metadata__` key holding the checksum that `save_safetensors` writes.
SAFETENSORS_CHECKSUM_KEY = "pixeldit_eqx.sha256"


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # A platform whose folders cannot be opened (Windows).
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Any]:
    """A binary file to write that replaces `path` whole, or not at all.

    On leaving the block without an error the data is fsynced, moved onto `path` with
    `os.replace` and the folder fsynced; on an error the temporary file is removed and
    `path` is untouched. The new file keeps the mode of the one it replaces (0o644 for
    a new file).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


class _HashingWriter:
    """Forwards writes to `f`, hashing and counting them."""

    def __init__(self, f: Any, digest: Any):
        self._f = f
        self.digest = digest
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self._f.write(view)


def _canonical(header: dict[str, Any]) -> bytes:
    """The header's fields other than the checksum's own, as the digest covers them."""
    fields = {k: v for k, v in header.items() if k not in ("sha256", "size")}
    return json.dumps(fields, sort_keys=True).encode() + b"\n"


def _header_line(header: dict[str, Any], sha256: str, size: int) -> bytes:
    full = header | {"sha256": sha256, "size": str(size).zfill(_SIZE_DIGITS)}
    return (json.dumps(full, sort_keys=True) + "\n").encode()


def write_checksummed(f: Any, header: dict[str, Any], write_data: Callable[[Any], None]) -> None:
    """Write `header` (with `sha256` and `size` added) as one line of JSON, then the data.

    `write_data(g)` writes the data to `g`. The header is written first with a
    placeholder checksum of the same length and rewritten in place once the data is
    written, so nothing is held in memory (a file object that cannot seek is buffered).
    """
    if not f.seekable():
        buffer = io.BytesIO()
        write_checksummed(buffer, header, write_data)
        f.write(buffer.getvalue())
        return
    start = f.tell()
    f.write(_header_line(header, "0" * 64, 0))
    digest = hashlib.sha256(_canonical(header))
    writer = _HashingWriter(f, digest)
    write_data(writer)
    end = f.tell()
    f.seek(start)
    f.write(_header_line(header, digest.hexdigest(), writer.size))
    f.seek(end)


def read_checksummed(f: Any, header: dict[str, Any], where: str) -> Any:
    """Check the data after `header` (read from `f`, which is at the data's start).

    Returns a stream at the data's start (`f` itself when it can seek). Raises
    `CheckpointFormatError` for a truncated file, for bytes after the declared data, and
    for a checksum mismatch (flipped bits).
    """
    sha256, size = header.get("sha256"), header.get("size")
    if not (isinstance(sha256, str) and len(sha256) == 64 and isinstance(size, str) and size.isdigit()):
        raise CheckpointFormatError(
            f"{where}: the header's checksum fields are damaged (sha256={str(sha256)[:80]!r}, "
            f"size={str(size)[:40]!r}): the file is corrupt"
        )
    declared = int(size)
    if not f.seekable():
        f = io.BytesIO(f.read())
    start = f.tell()
    digest = hashlib.sha256(_canonical(header))
    left = declared
    while left:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            raise CheckpointFormatError(
                f"{where}: the file is truncated: its header declares {declared} bytes of data, the file holds "
                f"{declared - left}; the save was interrupted or the copy is incomplete"
            )
        digest.update(chunk)
        left -= len(chunk)
    extra = 0
    while chunk := f.read(_CHUNK):
        extra += len(chunk)
    if extra:
        raise CheckpointFormatError(
            f"{where}: {extra} unexpected byte(s) after the {declared} bytes of data its header declares "
            "(trailing garbage: a damaged or concatenated file)"
        )
    if digest.hexdigest() != sha256:
        raise CheckpointFormatError(
            f"{where}: the data fails its sha256 checksum: the file is corrupt (flipped bits: a damaged "
            "disk, download or copy)"
        )
    f.seek(start)
    return f


def safetensors_checksum(tensors: dict[str, np.ndarray]) -> str:
    """The sha256 of a state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode() + b"\n")
        digest.update(value.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()

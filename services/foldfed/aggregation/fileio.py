"""Positional reads/writes of numpy arrays, and files that appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType

import blake3
import numpy as np

from foldfed.errors import StoreError

# Big enough that writing a model is a few thousand syscalls, small next to a slice.
_WRITE_BUFFER = 4 << 20


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill `out` with the bytes at `offset` of `fd`; preadv writes the array's own memory."""
    view = out.view(np.uint8).data
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise StoreError(f"short read at byte {offset + done}: file truncated under us")
        done += n


def pwrite_from(fd: int, data: np.ndarray, offset: int) -> None:
    """Write the bytes of `data` at `offset` of `fd`."""
    view = np.ascontiguousarray(data).view(np.uint8).data
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by name (a directory's, to make a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file written to a temporary name and renamed to `path` by `commit()`.

    Keeps the blake3 digest of everything written, so the caller gets the content id
    without reading the file again. Leaving the `with` block without commit deletes it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self._hash = blake3.blake3()
        self._done = False

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        view = data.view(np.uint8).data if isinstance(data, np.ndarray) else data
        self._file.write(view)
        self._hash.update(view)

    def digest(self) -> bytes:
        return self._hash.digest()

    def sync_written(self) -> None:
        """Flush and fdatasync what was written so far, under the temporary name. Not a
        commit: it only leaves less for `commit`'s fsync to wait for."""
        self._file.flush()
        os.fdatasync(self._file.fileno())

    def commit(self) -> bytes:
        """fsync, rename into place, fsync the directory; returns the digest."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        fsync_path(self.path.parent)
        self._done = True
        return self.digest()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self._file.close()
            self._tmp.unlink(missing_ok=True)

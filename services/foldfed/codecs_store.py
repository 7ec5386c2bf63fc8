"""The durable error-feedback residual: one file, replaced atomically, checked on read.

The adapter of codecs/feedback.py (whose docstring holds the crash rules: chunks of step t
first, then the residual tagged t, as the commit point). Layout of the file, all integers
little-endian:

| offset | size | content |
|---|---|---|
| 0 | 8 | magic `FFRESID1` |
| 8 | 4 | H: header length (uint32) |
| 12 | H | header: compact UTF-8 JSON, keys sorted (below) |
| 12 + H | 4·elements | the residual, float32 |
| end - 32 | 32 | blake3 of every byte before it |

Header keys: `cycle`, `dtype` ("<f4"), `elements`, `format` (1), `step`.

Writes go to a temporary `.<name>.<random>.tmp` beside the file, fsynced, renamed over it,
and the folder fsynced: a crash leaves the old residual or the new one, never half. A
writer (`ResidualStore.writer`) takes the values front to back as a coder produces them,
and a reader (`ResidualStore.open`) checks the digest in one streamed pass and then hands
out slices, so a coder that works chunk by chunk (the hub's progressive downlink) holds
O(chunk) of the residual, never O(model); the bytes are `save`'s. A read
rejects (StoreError) a file that is short, long, torn or altered: wrong magic, header,
size or digest. No pickle, no torch: raw bytes a second implementation can read.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import blake3
import numpy as np

from foldfed.codecs.feedback import Residual
from foldfed.durable import fsync_dir
from foldfed.errors import StoreError

MAGIC = b"FFRESID1"
FORMAT = 1
DIGEST_SIZE = 32
MAX_HEADER = 4096
_READ = 1 << 20


class ResidualStore:
    """The residual of one coder (a participant's uplink, or the hub's downlink) at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, residual: Residual) -> None:
        """Replace the stored residual with `residual`, atomically and durably."""
        writer = self.writer(residual.cycle, residual.step, int(residual.values.size))
        try:
            writer.write(residual.values)
            writer.commit()
        finally:
            writer.discard()

    def writer(self, cycle: int, step: int, elements: int) -> ResidualWriter:
        """A new residual written front to back; it replaces the stored one at `commit`."""
        return ResidualWriter(self.path, cycle, step, elements)

    def load(self) -> Residual | None:
        """The stored residual, None if there is none; StoreError if it is damaged."""
        try:
            f = open(self.path, "rb")  # closed by the `with` below
        except FileNotFoundError:
            return None
        with f:
            reader = ResidualReader(f, self.path, checked=False)
            values = np.empty(reader.elements, dtype="<f4")
            reader.check(into=values)  # one pass: hashed while read
        return Residual(reader.cycle, reader.step, values.astype(np.float32, copy=False))

    def open(self) -> ResidualReader | None:
        """The stored residual, checked whole (digest included) and then read slice by
        slice: memory O(slice). None if there is none; StoreError if it is damaged."""
        try:
            f = open(self.path, "rb")  # owned by the reader, or closed below
        except FileNotFoundError:
            return None
        try:
            return ResidualReader(f, self.path, checked=True)
        except BaseException:
            f.close()
            raise


class ResidualWriter:
    """One residual file written in element order, hashed as it goes, under a temporary
    name beside `path`; `commit` renames it over `path` (the commit point), `discard`
    deletes it. Memory O(what one `write` is given), whatever the model size."""

    def __init__(self, path: Path, cycle: int, step: int, elements: int) -> None:
        self.path, self.elements = Path(path), elements
        header = _header(cycle, step, elements)
        prefix = MAGIC + struct.pack("<I", len(header)) + header
        self._hasher = blake3.blake3(max_threads=1)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._tmp: Path | None = Path(tmp)
        self._file = os.fdopen(fd, "wb", buffering=_READ)
        self._written = 0
        self._put(prefix)

    def write(self, values: np.ndarray) -> None:
        """Append the next `values.size` elements (float32)."""
        flat = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        if self._written + flat.size > self.elements:
            raise ValueError(f"residual of {self.elements} elements: too many values")
        self._put(memoryview(flat).cast("B"))
        self._written += flat.size

    def sync_written(self) -> None:
        """fdatasync what was written so far (not a commit: it leaves `commit` less to wait)."""
        self._file.flush()
        os.fdatasync(self._file.fileno())

    def commit(self) -> None:
        """The digest, fsync, rename over the stored residual, fsync the folder."""
        if self._tmp is None:
            raise ValueError("residual writer already committed or discarded")
        if self._written != self.elements:
            raise ValueError(f"{self._written} of {self.elements} residual elements written")
        self._file.write(self._hasher.digest())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        self._tmp = None
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Delete the temporary file if it was not committed (safe to call twice)."""
        self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _put(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._file.write(data)


class ResidualReader:
    """A stored residual, its whole file checked when opened, then read by slices."""

    def __init__(self, f: BinaryIO, path: Path, *, checked: bool) -> None:
        """Parse the header and size; with `checked`, also the digest over the whole file
        (else the caller must call `check` before trusting a value)."""
        self._file, self.path = f, path
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise StoreError(f"{path}: not a residual file (bad magic or truncated)")
        (length,) = struct.unpack("<I", head[8:])
        if length > MAX_HEADER:
            raise StoreError(f"{path}: header of {length} bytes is too long")
        header = f.read(length)
        meta = _parse_header(header, path)
        self.cycle, self.step, self.elements = meta["cycle"], meta["step"], meta["elements"]
        self._values_at = 12 + length
        want = self._values_at + 4 * self.elements + DIGEST_SIZE
        if size != want:
            raise StoreError(f"{path}: {size} bytes, expected {want} (torn write?)")
        self._prefix = head + header
        if checked:
            self.check()

    def check(self, into: np.ndarray | None = None) -> None:
        """Read every value once and check the file's digest (StoreError if it is wrong);
        `into` (float32, one per element), if given, receives the values."""
        hasher = blake3.blake3(self._prefix, max_threads=1)
        keep = into is not None
        view = memoryview(into if keep else bytearray(_READ)).cast("B")
        left, at = 4 * self.elements, 0
        self._file.seek(self._values_at)
        while left:
            piece = view[at : at + min(left, _READ)]
            n = self._file.readinto(piece)
            if not n:
                raise StoreError(f"{self.path}: truncated residual values")
            hasher.update(piece[:n])
            left -= n
            at = at + n if keep else 0  # without `into`, one buffer reused
        if self._file.read(DIGEST_SIZE) != hasher.digest():
            raise StoreError(f"{self.path}: digest mismatch: the residual is corrupt")

    def read(self, begin: int, end: int) -> np.ndarray:
        """Elements [begin, end) as float32."""
        if not 0 <= begin <= end <= self.elements:
            raise ValueError(f"elements [{begin}, {end}) of a residual of {self.elements}")
        values = np.empty(end - begin, dtype="<f4")
        view = memoryview(values).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], self._values_at + 4 * begin + done)
            if n == 0:
                raise StoreError(f"{self.path}: truncated residual values")
            done += n
        return values.astype(np.float32, copy=False)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResidualReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header(cycle: int, step: int, elements: int) -> bytes:
    meta = {
        "cycle": cycle,
        "dtype": "<f4",
        "elements": elements,
        "format": FORMAT,
        "step": step,
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_header(header: bytes, path: Path) -> dict[str, int]:
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: a header of nested brackets (MAX_HEADER allows ~4000 levels).
        raise StoreError(f"{path}: unreadable header: {exc}") from None
    keys = {"cycle", "dtype", "elements", "format", "step"}
    if not isinstance(meta, dict) or set(meta) != keys:
        raise StoreError(f"{path}: header must have exactly {sorted(keys)}")
    if meta["format"] != FORMAT or meta["dtype"] != "<f4":
        raise StoreError(f"{path}: format {meta['format']!r}, dtype {meta['dtype']!r} unsupported")
    for key in ("cycle", "elements", "step"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StoreError(f"{path}: header {key} must be a non-negative integer")
    return {k: meta[k] for k in ("cycle", "elements", "step")}

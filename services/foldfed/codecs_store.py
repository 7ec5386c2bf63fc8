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
and the folder fsynced: a crash leaves the old residual or the new one, never half. A read
rejects (StoreError) a file that is short, long, torn or altered: wrong magic, header,
size or digest. No pickle, no torch: raw bytes a second implementation can read.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

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
        header = _header(residual)
        values = np.ascontiguousarray(residual.values, dtype="<f4")
        prefix = MAGIC + struct.pack("<I", len(header)) + header
        hasher = blake3.blake3(max_threads=1)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in (prefix, memoryview(values).cast("B")):
                    hasher.update(piece)
                    f.write(piece)
                f.write(hasher.digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)

    def load(self) -> Residual | None:
        """The stored residual, None if there is none; StoreError if it is damaged."""
        try:
            f = open(self.path, "rb")  # closed by the `with` below
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if len(head) < 12 or head[:8] != MAGIC:
                raise StoreError(f"{self.path}: not a residual file (bad magic or truncated)")
            (length,) = struct.unpack("<I", head[8:])
            if length > MAX_HEADER:
                raise StoreError(f"{self.path}: header of {length} bytes is too long")
            header = f.read(length)
            meta = _parse_header(header, self.path)
            want = 12 + length + 4 * meta["elements"] + DIGEST_SIZE
            if size != want:
                raise StoreError(f"{self.path}: {size} bytes, expected {want} (torn write?)")
            hasher = blake3.blake3(head, max_threads=1)
            hasher.update(header)
            values = np.empty(meta["elements"], dtype="<f4")
            view = memoryview(values).cast("B")
            for start in range(0, len(view), _READ):
                piece = view[start : start + _READ]
                if f.readinto(piece) != len(piece):
                    raise StoreError(f"{self.path}: truncated residual values")
                hasher.update(piece)
            if f.read(DIGEST_SIZE) != hasher.digest():
                raise StoreError(f"{self.path}: digest mismatch: the residual is corrupt")
        return Residual(meta["cycle"], meta["step"], values.astype(np.float32, copy=False))


def _header(residual: Residual) -> bytes:
    meta = {
        "cycle": residual.cycle,
        "dtype": "<f4",
        "elements": int(residual.values.size),
        "format": FORMAT,
        "step": residual.step,
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

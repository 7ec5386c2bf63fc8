"""Durable file writes, the one way foldfed does them: write a temporary file in the same
folder, fsync it, rename it over the final name, fsync the folder. A reader (or a process
restarted after a SIGKILL or a power cut) sees the old file or the new one, never half.

Temporary names start with "." so folder scanners can skip them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable: without it a power cut can undo it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Replace `path` with `data`, atomically and durably."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_file(path: Path) -> int:
    """Delete `path`; the bytes it freed (0 when it was already gone). Retention deletes
    with this; a deletion needs no fsync (a crash that undoes it leaves garbage, not loss)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size

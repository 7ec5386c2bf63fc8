"""The uploader's local journal: which delta it is sending and which chunks the broker
has confirmed, so a killed uploader resumes where it stopped.

Layout under <spool>/uploads/step-<step>/:
  manifest.pb   the serialized manifest being sent (atomic write)
  source        "<size> <mtime_ns> <path>" of the delta file the manifest describes
  confirmed     4-byte little-endian chunk indices, appended as confirms arrive

Appends are not fsynced: they survive a process crash (the page cache outlives the
process), and after a power loss the hub's have-reply, which is authoritative, makes up
for a journal that lags behind. The journal only saves re-sending; it never decides what
the hub holds.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from foldfed.durable import atomic_write

_INDEX = struct.Struct("<I")


class UploadJournal:
    def __init__(self, spool_dir: Path, step: int) -> None:
        self.dir = spool_dir / "uploads" / f"step-{step:012d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    @staticmethod
    def source_stamp(delta_path: Path) -> str:
        st = delta_path.stat()
        return f"{st.st_size} {st.st_mtime_ns} {delta_path.resolve()}"

    def load_manifest(self, delta_path: Path) -> bytes | None:
        """The journaled manifest, if it describes this very delta file."""
        try:
            source = (self.dir / "source").read_text()
            manifest = (self.dir / "manifest.pb").read_bytes()
        except FileNotFoundError:
            return None
        return manifest if source == self.source_stamp(delta_path) else None

    def start(self, delta_path: Path, manifest: bytes) -> None:
        """Begin a fresh journal for a new manifest (forgets earlier confirms)."""
        self.close()  # an open append handle would keep writing to the unlinked file
        (self.dir / "confirmed").unlink(missing_ok=True)
        atomic_write(self.dir / "manifest.pb", manifest)
        atomic_write(self.dir / "source", self.source_stamp(delta_path).encode())

    def retire(self) -> None:
        """Forget the upload's progress once its delta is sent: `confirmed` and `source`
        go, `manifest.pb` stays (the manifest is kept for audit, docs/retention.md)."""
        self.close()
        for name in ("confirmed", "source"):
            (self.dir / name).unlink(missing_ok=True)

    def confirmed(self) -> set[int]:
        try:
            data = (self.dir / "confirmed").read_bytes()
        except FileNotFoundError:
            return set()
        whole = len(data) - len(data) % _INDEX.size  # a torn last record is ignored
        return {i for (i,) in _INDEX.iter_unpack(data[:whole])}

    def mark_confirmed(self, index: int) -> None:
        if self._fd is None:
            path = self.dir / "confirmed"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            # Cut a torn last record (a crash mid-append), or every later record would
            # be read shifted.
            size = os.fstat(self._fd).st_size
            if size % _INDEX.size:
                os.ftruncate(self._fd, size - size % _INDEX.size)
        os.write(self._fd, _INDEX.pack(index))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""Server-optimizer state on disk, one generation per step, streamed slice by slice.

    state_dir/step-000000000007/m.f64     float64 little-endian, one per model element
    state_dir/step-000000000007/v.f64     (FedAdam only)
    state_dir/step-000000000007/meta.json {"format", "kind", "elements", "step",
                                           "model_digest"}

Generation t is the state that goes with model θ_t (whose digest its meta records): it is
what finalizing step t reads. Finalizing step t never modifies generation t; it writes
generation t + 1 into a temporary directory and renames it into place. So finalizing step
t again — after a crash, or a redelivered request — reads the same state and writes the
same bytes, and a crash at any point leaves either the old generation or both. Once t + 1
is in place, generations before t are deleted: t stays, for such a repeat.

With no generation at all, the optimizer starts from its initial state (the first step),
and committing records that as generation t ("initial" in its meta, no arrays), so a
repeat of the first step finds it too. A state directory that has generations but not the
one asked for is an error: silently restarting momentum would change the run unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from foldfed.aggregation.fileio import fsync_path, pread_into, pwrite_from
from foldfed.aggregation.server_opt import ServerOptimizer
from foldfed.errors import StoreError

FORMAT = 1
_GENERATION = re.compile(r"step-(\d{12})")
_ITEM = np.dtype("<f8")


def generation_name(step: int) -> str:
    return f"step-{step:012d}"


def generations(state_dir: Path) -> list[int]:
    """The steps whose state `state_dir` holds, ascending."""
    if not state_dir.is_dir():
        return []
    found = (_GENERATION.fullmatch(p.name) for p in state_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


class OptimizerState:
    """Reads generation `step` (or the initial state) and writes generation `step + 1`."""

    def __init__(
        self, state_dir: Path, optimizer: ServerOptimizer, elements: int, step: int
    ) -> None:
        self._dir = state_dir
        self._optimizer = optimizer
        self._elements = elements
        self._step = step
        self._readers: dict[str, int] = {}
        self._writers: dict[str, int] = {}
        self._tmp: Path | None = None
        self.expected_model_digest: bytes | None = None
        if optimizer.state_names:
            self._open()

    def _open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        held = generations(self._dir)
        if self._step in held:
            self._open_generation(self._dir / generation_name(self._step))
        elif held:
            raise StoreError(
                f"no optimizer state for step {self._step} in {self._dir} "
                f"(it holds steps {held}): refusing to restart the optimizer silently"
            )
        self._tmp = Path(tempfile.mkdtemp(dir=self._dir, prefix=".tmp-"))
        for name in self._optimizer.state_names:
            fd = os.open(self._tmp / f"{name}.f64", os.O_RDWR | os.O_CREAT, 0o600)
            self._writers[name] = fd
            size = self._elements * _ITEM.itemsize
            os.ftruncate(fd, size)
            if size and hasattr(os, "posix_fallocate"):
                # Allocated blocks: writing into a sparse file is several times slower,
                # and a full disk fails here rather than halfway.
                os.posix_fallocate(fd, 0, size)

    def _open_generation(self, path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text())
        wanted = {"format": FORMAT, "kind": self._optimizer.kind, "elements": self._elements}
        found = {key: meta.get(key) for key in wanted}
        if found != wanted:
            raise StoreError(f"optimizer state {path} is {found}, this step needs {wanted}")
        if meta.get("initial"):
            return  # no arrays: reads give the initial state
        self.expected_model_digest = bytes.fromhex(meta["model_digest"])
        for name in self._optimizer.state_names:
            self._readers[name] = os.open(path / f"{name}.f64", os.O_RDONLY)

    def read(self, offset: int, count: int) -> dict[str, np.ndarray]:
        """State of elements [offset, offset + count) before this step."""
        if not self._readers:
            return self._optimizer.initial_state(count)
        out = {}
        for name, fd in self._readers.items():
            out[name] = np.empty(count, dtype=_ITEM)
            pread_into(fd, out[name], offset * _ITEM.itemsize)
        return out

    def write(self, offset: int, arrays: Mapping[str, np.ndarray]) -> None:
        """State of elements [offset, offset + len) after this step."""
        for name, fd in self._writers.items():
            pwrite_from(fd, arrays[name].astype(_ITEM, copy=False), offset * _ITEM.itemsize)

    def commit(self, model_digest: bytes) -> None:
        """Make the written state generation `step + 1`, going with model `model_digest`."""
        if self._tmp is None:
            return
        if not self._readers:
            self._record_initial()
        for fd in self._writers.values():
            os.fsync(fd)
        meta = self._meta(self._step + 1) | {"model_digest": model_digest.hex()}
        _write_synced(self._tmp / "meta.json", json.dumps(meta, sort_keys=True).encode())
        fsync_path(self._tmp)
        self._replace_generation(self._tmp, self._dir / generation_name(self._step + 1))
        self._tmp = None
        self._prune()
        self.close()

    def _meta(self, step: int) -> dict[str, object]:
        return {
            "format": FORMAT,
            "kind": self._optimizer.kind,
            "elements": self._elements,
            "step": step,
        }

    def _record_initial(self) -> None:
        final = self._dir / generation_name(self._step)
        if final.exists():
            return
        tmp = Path(tempfile.mkdtemp(dir=self._dir, prefix=".tmp-"))
        meta = self._meta(self._step) | {"initial": True}
        _write_synced(tmp / "meta.json", json.dumps(meta, sort_keys=True).encode())
        fsync_path(tmp)
        self._replace_generation(tmp, final)

    def _replace_generation(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # A repeat of this step: its old result goes aside first, since a directory
            # cannot be renamed onto a non-empty one.
            aside = Path(tempfile.mkdtemp(dir=self._dir, prefix=".old-"))
            os.replace(final, aside / "gen")
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        fsync_path(self._dir)

    def _prune(self) -> None:
        for step in generations(self._dir):
            if step < self._step:
                shutil.rmtree(self._dir / generation_name(step))
        # Leftovers of a finalize that crashed (one aggregator owns a state directory).
        for leftover in (*self._dir.glob(".tmp-*"), *self._dir.glob(".old-*")):
            shutil.rmtree(leftover, ignore_errors=True)

    def discard(self) -> None:
        """Forget the written state: generation `step` stays the current one."""
        self.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def close(self) -> None:
        for fd in (*self._readers.values(), *self._writers.values()):
            os.close(fd)
        self._readers.clear()
        self._writers.clear()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

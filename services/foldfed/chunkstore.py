"""A content-addressed chunk store on local disk, with the manifests that reference chunks.

On-disk layout under the store's root::

    chunks/<hh>/<hex>                       a chunk; <hex> = blake3-256 of its bytes (64 hex
                                            digits), <hh> = its first two, to keep
                                            directories small
    manifests/<step:012d>/<participant>.manifest
                                            the manifest bytes a participant sent for a step
    tmp/<random>.tmp                        writes in progress; anything here at open is a
                                            crash's leftover and is deleted
    quarantine/<hex>.<random>               chunk files that failed verification on read,
                                            kept for inspection; never read again

Rules:

- A file under `chunks/` is complete and its name is the digest of its bytes. Writes go to
  `tmp/`, are fsynced, renamed into place and the directory fsynced, so a crash (SIGKILL,
  power cut) leaves either the whole chunk or nothing. `stage` + `commit` do the same for
  a group of chunks with one fsync pass (ingest's group commit): all files, then each
  folder once. A chunk found corrupt anyway (disk
  rot, a hand edit) is moved to `quarantine/` so that the next put of it heals the store.
- A chunk is stored once. Putting it again writes nothing, but refreshes its mtime: that
  restarts its grace period, so a redelivered chunk whose manifest is still arriving is
  not collected in between.
- `collect_garbage`: a manifest is deleted only when its step falls behind
  `keep_from_step`. A chunk is deleted only when no remaining manifest references it and
  its file is older than the grace period (a chunk may arrive before its manifest after a
  redelivery). The services do not use it: their retention policy (foldfed.retention,
  docs/retention.md) keeps manifests for ever and deletes chunks one by one (`delete`).
- The store never parses manifests: `collect_garbage` is given a function that lists a
  manifest's digests, so the wire format stays out of this module.
- One process owns a store root: opening it deletes `tmp/`'s contents, and
  `collect_garbage` must not run while that process is putting chunks.

Everything here blocks (disk, hashing): async callers run it in a worker thread.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from foldfed.digests import DIGEST_SIZE, digest_of, short
from foldfed.durable import fsync_dir, remove_file
from foldfed.errors import IntegrityError, StoreError

_PARTICIPANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_CHUNK_NAME = re.compile(r"^[0-9a-f]{64}$")
_STEP_NAME = re.compile(r"^[0-9]{12}$")
_MANIFEST_SUFFIX = ".manifest"
_MAX_STEP = 10**12 - 1  # 12 digits keep step directories in numeric order when sorted


@dataclass(frozen=True)
class StagedChunk:
    """A chunk written to `tmp/` by `ChunkStore.stage`, waiting for `commit`."""

    digest: bytes
    tmp: Path
    path: Path


@dataclass(frozen=True)
class GcReport:
    """What one `collect_garbage` did.

    `chunks_kept` counts every chunk left in the store; `chunks_young` those of them that
    no manifest references but that are still within their grace period.
    """

    manifests_deleted: int
    chunks_deleted: int
    bytes_freed: int
    chunks_kept: int
    chunks_young: int


class ChunkStore:
    """Chunks named by their blake3 digest, and manifests by (step, participant)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._chunks = root / "chunks"
        self._manifests = root / "manifests"
        self._tmp = root / "tmp"
        self._quarantine = root / "quarantine"
        try:
            for directory in (self._chunks, self._manifests, self._tmp, self._quarantine):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create chunk store at {root}: {exc}") from exc
        self._clean_tmp()

    # --- chunks ----------------------------------------------------------------------

    def put(
        self, digest: bytes, body: bytes | bytearray | memoryview, *, verified: bool = False
    ) -> bool:
        """Store `body` under `digest`; False when it was already there.

        Raises IntegrityError, writing nothing, when `body` does not hash to `digest`.
        `verified=True`: the caller has just hashed `body` itself (hashing twice costs a
        tenth of the hub's ingest time); the store then trusts it.
        """
        _check_digest(digest)
        actual = digest if verified else digest_of(body)
        if actual != digest:
            raise IntegrityError(f"chunk {short(digest)}: body hashes to {short(actual)}")
        staged = self.stage(digest, body, verified=verified)
        if staged is None:
            return False
        self.commit([staged])
        return True

    def stage(
        self, digest: bytes, body: bytes | bytearray | memoryview, *, verified: bool = False
    ) -> StagedChunk | None:
        """The first half of a put: check `body` and write it to `tmp/`, not yet fsynced
        nor in place. None when the chunk is stored already (its mtime refreshed, as by
        `put`). Nothing is durable until `commit`; a crash before it leaves only `tmp/`
        files, which the next open deletes."""
        _check_digest(digest)
        actual = digest if verified else digest_of(body)
        if actual != digest:
            raise IntegrityError(f"chunk {short(digest)}: body hashes to {short(actual)}")
        path = self.path_of(digest)
        if self._touch(path):
            return None
        self._ensure_dir(path.parent)
        tmp = self._tmp / f"{secrets.token_hex(16)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(body)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedChunk(digest, tmp, path)

    def commit(self, staged: Sequence[StagedChunk]) -> None:
        """The second half: make staged chunks durable with one fsync pass (every file,
        then each folder they are renamed into, once), the group commit of ingest. On an
        error the staged files not yet in place are deleted."""
        try:
            for chunk in staged:
                _fsync_file(chunk.tmp)
            for chunk in staged:
                os.replace(chunk.tmp, chunk.path)
        except BaseException:
            self.discard(staged)
            raise
        for directory in sorted({chunk.path.parent for chunk in staged}):
            fsync_dir(directory)

    def discard(self, staged: Sequence[StagedChunk]) -> None:
        """Delete staged files that were not committed (a batch that failed)."""
        for chunk in staged:
            chunk.tmp.unlink(missing_ok=True)

    def has(self, digest: bytes) -> bool:
        return self.path_of(digest).is_file()

    def get(self, digest: bytes) -> bytes:
        """The chunk's bytes, verified. A corrupt file is quarantined (IntegrityError)."""
        path = self.path_of(digest)
        try:
            body = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"chunk {short(digest)} is not in the store") from exc
        if digest_of(body) != digest:
            moved = self._quarantine_file(path)
            raise IntegrityError(f"chunk {short(digest)} is corrupt on disk; moved to {moved}")
        return body

    def delete(self, digest: bytes) -> int:
        """Delete the chunk; the bytes freed (0 when it was not there). The caller decides
        that nothing needs it any more (foldfed.retention)."""
        return remove_file(self.path_of(digest))

    def size_of(self, digest: bytes) -> int:
        try:
            return self.path_of(digest).stat().st_size
        except FileNotFoundError as exc:
            raise StoreError(f"chunk {short(digest)} is not in the store") from exc

    def path_of(self, digest: bytes) -> Path:
        _check_digest(digest)
        name = digest.hex()
        return self._chunks / name[:2] / name

    def digests(self) -> Iterator[bytes]:
        """Every stored chunk's digest, in hex order."""
        for _, path in self._chunk_files():
            yield bytes.fromhex(path.name)

    def _chunk_files(self) -> Iterator[tuple[bytes, Path]]:
        for fan in sorted(self._chunks.iterdir()):
            if not fan.is_dir():
                continue
            for path in sorted(fan.iterdir()):
                if _CHUNK_NAME.match(path.name) and path.name.startswith(fan.name):
                    yield bytes.fromhex(path.name), path

    def _touch(self, path: Path) -> bool:
        # Refreshing mtime restarts the chunk's GC grace period (see module doc). If GC
        # removed the file meanwhile, the caller writes it anew.
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def _quarantine_file(self, path: Path) -> Path:
        target = self._quarantine / f"{path.name}.{secrets.token_hex(4)}"
        os.replace(path, target)
        fsync_dir(path.parent)
        return target

    # --- manifests -------------------------------------------------------------------

    def put_manifest(self, step: int, participant: str, manifest: bytes) -> None:
        """Store the manifest of (step, participant); a later one replaces it."""
        path = self._manifest_path(step, participant)
        if path.is_file() and path.read_bytes() == manifest:
            return  # a redelivery: spare the fsyncs
        self._ensure_dir(path.parent)
        self._write_atomic(path, manifest)

    def delete_manifest(self, step: int, participant: str) -> None:
        """Remove the manifest of (step, participant), if any (a withdrawn delta's)."""
        self._manifest_path(step, participant).unlink(missing_ok=True)

    def get_manifest(self, step: int, participant: str) -> bytes | None:
        try:
            return self._manifest_path(step, participant).read_bytes()
        except FileNotFoundError:
            return None

    def manifests(self) -> Iterator[tuple[int, str, bytes]]:
        """(step, participant, manifest bytes), by step then participant."""
        for step, participant, path in self._manifest_files():
            try:
                yield step, participant, path.read_bytes()
            except FileNotFoundError:
                continue  # deleted by a GC since listed

    def _manifest_files(self) -> Iterator[tuple[int, str, Path]]:
        for step_dir in sorted(self._manifests.iterdir()):
            if not (step_dir.is_dir() and _STEP_NAME.match(step_dir.name)):
                continue
            for path in sorted(step_dir.iterdir()):
                participant = path.name.removesuffix(_MANIFEST_SUFFIX)
                if path.name.endswith(_MANIFEST_SUFFIX) and _PARTICIPANT.match(participant):
                    yield int(step_dir.name), participant, path

    def _manifest_path(self, step: int, participant: str) -> Path:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
            raise StoreError(f"step {step!r} outside [0, {_MAX_STEP}]")
        # The participant id becomes a file name: no separators, dots or upper case.
        if not isinstance(participant, str) or not _PARTICIPANT.match(participant):
            raise StoreError(f"participant id {participant!r} is not [a-z0-9][a-z0-9_-]{{,62}}")
        return self._manifests / f"{step:012d}" / f"{participant}{_MANIFEST_SUFFIX}"

    # --- garbage collection ----------------------------------------------------------

    def collect_garbage(
        self,
        keep_from_step: int,
        digests_of: Callable[[bytes], Iterable[bytes]],
        grace_seconds: float = 3600.0,
    ) -> GcReport:
        """Delete manifests of steps before `keep_from_step`, then unreferenced chunks.

        The live set is computed before anything is deleted, so a `digests_of` that raises
        (say, on a manifest it cannot parse) leaves the store untouched.
        """
        doomed = [p for step, _, p in self._manifest_files() if step < keep_from_step]
        live: set[bytes] = set()
        for step, _, manifest in self.manifests():
            if step >= keep_from_step:
                live.update(digests_of(manifest))
        freed = sum(remove_file(path) for path in doomed)
        self._remove_empty_step_dirs()
        deleted, kept, young, chunk_bytes = self._sweep_chunks(live, time.time() - grace_seconds)
        return GcReport(len(doomed), deleted, freed + chunk_bytes, kept, young)

    def _sweep_chunks(self, live: set[bytes], cutoff: float) -> tuple[int, int, int, int]:
        deleted = kept = young = freed = 0
        for digest, path in self._chunk_files():
            if digest in live:
                kept += 1
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime > cutoff:
                kept += 1
                young += 1
                continue
            freed += remove_file(path)
            deleted += 1
        return deleted, kept, young, freed

    def _remove_empty_step_dirs(self) -> None:
        for step_dir in self._manifests.iterdir():
            if step_dir.is_dir() and not any(step_dir.iterdir()):
                step_dir.rmdir()

    # --- files -----------------------------------------------------------------------

    def _clean_tmp(self) -> None:
        # Only a crash leaves files here: a finished write renamed its file away.
        for leftover in self._tmp.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        directory.mkdir(exist_ok=True)
        # The new directory's own entry must be durable before files are renamed into it.
        fsync_dir(directory.parent)

    def _write_atomic(self, path: Path, body: bytes | bytearray | memoryview) -> None:
        tmp = self._tmp / f"{secrets.token_hex(16)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise IntegrityError(f"a digest is {DIGEST_SIZE} bytes, got {digest!r:.80}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

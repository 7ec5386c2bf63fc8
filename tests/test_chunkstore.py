"""The content-addressed chunk store: integrity, idempotence, crash safety, GC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from foldfed.chunkstore import ChunkStore
from foldfed.digests import digest_of
from foldfed.errors import IntegrityError, StoreError

HOUR = 3600.0


def _chunk(seed: int, size: int = 1000) -> tuple[bytes, bytes]:
    body = (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]
    return digest_of(body), body


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _manifest_of(digests: Iterable[bytes]) -> bytes:
    # A stand-in manifest format: the store must not care what manifests look like.
    return b"".join(digests)


def _digests_of(manifest: bytes) -> list[bytes]:
    return [manifest[i : i + 32] for i in range(0, len(manifest), 32)]


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "store")


# --- chunks ------------------------------------------------------------------------------


def test_put_then_get_has_size_and_listing(store: ChunkStore) -> None:
    digest, body = _chunk(1)
    assert not store.has(digest)
    assert store.put(digest, memoryview(body)) is True
    assert store.has(digest)
    assert store.get(digest) == body
    assert store.size_of(digest) == len(body)
    hexed = digest.hex()
    assert store.path_of(digest) == store.root / "chunks" / hexed[:2] / hexed
    assert list(store.digests()) == [digest]


def test_a_wrong_digest_is_rejected_and_nothing_is_written(store: ChunkStore) -> None:
    digest, _ = _chunk(1)
    with pytest.raises(IntegrityError, match="hashes to"):
        store.put(digest, b"something else")
    assert not store.has(digest)
    assert _files(store.root) == []


def test_a_digest_of_the_wrong_length_is_rejected(store: ChunkStore) -> None:
    with pytest.raises(IntegrityError, match="32 bytes"):
        store.put(b"\x01" * 31, b"x")
    with pytest.raises(IntegrityError):
        store.has(b"")


def test_a_duplicate_put_returns_false_and_does_not_rewrite(store: ChunkStore) -> None:
    digest, body = _chunk(2)
    assert store.put(digest, body)
    path = store.path_of(digest)
    inode = path.stat().st_ino
    _age(path, 2 * HOUR)
    assert store.put(digest, bytearray(body)) is False
    assert path.stat().st_ino == inode
    # ...but restarts the grace period: its manifest may be on its way.
    assert time.time() - path.stat().st_mtime < 60


def test_a_corrupt_chunk_is_quarantined_and_a_resend_heals_it(store: ChunkStore) -> None:
    digest, body = _chunk(3)
    store.put(digest, body)
    path = store.path_of(digest)
    path.write_bytes(b"bit rot" + body[7:])
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get(digest)
    assert not store.has(digest)
    quarantined = _files(store.root / "quarantine")
    assert len(quarantined) == 1 and quarantined[0].name.startswith(digest.hex())
    assert store.put(digest, body) is True
    assert store.get(digest) == body


def test_a_missing_chunk_is_a_store_error(store: ChunkStore) -> None:
    digest, _ = _chunk(4)
    with pytest.raises(StoreError, match="not in the store"):
        store.get(digest)
    with pytest.raises(StoreError, match="not in the store"):
        store.size_of(digest)


def test_stale_temporary_files_are_cleaned_at_open(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ChunkStore(root)
    digest, body = _chunk(5)
    store.put(digest, body)
    (root / "tmp" / "deadbeef.tmp").write_bytes(body[:100])
    reopened = ChunkStore(root)
    assert list((root / "tmp").iterdir()) == []
    assert reopened.get(digest) == body


# --- manifests ---------------------------------------------------------------------------


def test_manifests_are_stored_by_step_and_participant(store: ChunkStore) -> None:
    store.put_manifest(12, "site-b", b"m12b")
    store.put_manifest(3, "site_a", b"m3a")
    store.put_manifest(12, "site-a", b"m12a")
    store.put_manifest(12, "site-a", b"m12a")  # a redelivery
    assert store.get_manifest(12, "site-a") == b"m12a"
    assert store.get_manifest(4, "site-a") is None
    assert (store.root / "manifests" / "000000000012" / "site-b.manifest").is_file()
    assert list(store.manifests()) == [
        (3, "site_a", b"m3a"),
        (12, "site-a", b"m12a"),
        (12, "site-b", b"m12b"),
    ]
    store.put_manifest(12, "site-a", b"newer")
    assert store.get_manifest(12, "site-a") == b"newer"


@pytest.mark.parametrize("participant", ["", "Site", "../etc", "a/b", "a.b", "-a", "a" * 64])
def test_a_participant_id_that_is_not_a_safe_file_name_is_refused(
    store: ChunkStore, participant: str
) -> None:
    with pytest.raises(StoreError, match="participant id"):
        store.put_manifest(1, participant, b"m")
    with pytest.raises(StoreError, match="participant id"):
        store.get_manifest(1, participant)


@pytest.mark.parametrize("step", [-1, 10**12, True])
def test_a_step_out_of_range_is_refused(store: ChunkStore, step: int) -> None:
    with pytest.raises(StoreError, match="step"):
        store.put_manifest(step, "site-a", b"m")


# --- garbage collection ------------------------------------------------------------------


def test_gc_deletes_old_unreferenced_chunks_and_keeps_referenced_and_young(
    store: ChunkStore,
) -> None:
    a, b, c, d, e = (_chunk(i) for i in range(10, 15))
    for digest, body in (a, b, c, d, e):
        store.put(digest, body)
    for digest, _ in (a, b, c, d):
        _age(store.path_of(digest), 2 * HOUR)
    old_manifest = _manifest_of([a[0], b[0]])
    store.put_manifest(1, "site-a", old_manifest)
    store.put_manifest(2, "site-a", _manifest_of([b[0], c[0]]))

    report = store.collect_garbage(2, _digests_of, grace_seconds=HOUR)

    assert report.manifests_deleted == 1
    assert report.chunks_deleted == 2  # a: only the dropped step used it; d: nobody did
    assert report.bytes_freed == len(a[1]) + len(d[1]) + len(old_manifest)
    assert report.chunks_kept == 3 and report.chunks_young == 1
    assert set(store.digests()) == {b[0], c[0], e[0]}
    assert [(s, p) for s, p, _ in store.manifests()] == [(2, "site-a")]
    assert not (store.root / "manifests" / "000000000001").exists()


def test_gc_spares_an_old_chunk_that_was_just_sent_again(store: ChunkStore) -> None:
    digest, body = _chunk(20)
    store.put(digest, body)
    _age(store.path_of(digest), 2 * HOUR)
    store.put(digest, body)  # redelivered before its manifest
    report = store.collect_garbage(0, _digests_of, grace_seconds=HOUR)
    assert report.chunks_deleted == 0 and store.has(digest)


def test_gc_deletes_nothing_when_a_manifest_cannot_be_read(store: ChunkStore) -> None:
    digest, body = _chunk(21)
    store.put(digest, body)
    _age(store.path_of(digest), 2 * HOUR)
    store.put_manifest(1, "site-a", b"old")
    store.put_manifest(2, "site-a", b"unparseable")

    def broken(manifest: bytes) -> list[bytes]:
        raise ValueError("cannot parse")

    with pytest.raises(ValueError, match="cannot parse"):
        store.collect_garbage(2, broken, grace_seconds=HOUR)
    assert store.has(digest)
    assert store.get_manifest(1, "site-a") == b"old"


# --- crash safety ------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from foldfed.chunkstore import ChunkStore
    from foldfed.digests import digest_of

    store = ChunkStore(Path(sys.argv[1]))
    for i in range(100_000):
        body = os.urandom(64 * 1024 * (1 + i % 16))
        store.put(digest_of(body), body)
        print(i, flush=True)
    """
)


@pytest.mark.parametrize(("kill_after", "delay"), [(3, 0.0), (17, 0.004), (40, 0.011)])
def test_sigkill_while_writing_leaves_only_whole_chunks(
    tmp_path: Path, kill_after: int, delay: float
) -> None:
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(kill_after):
            assert proc.stdout.readline(), "writer died early"
        time.sleep(delay)  # vary where in a put the kill lands
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    chunk_files = _files(root / "chunks")
    assert len(chunk_files) >= kill_after
    for path in chunk_files:
        assert digest_of(path.read_bytes()).hex() == path.name, f"torn chunk {path}"
    store = ChunkStore(root)
    assert list((root / "tmp").iterdir()) == []
    for digest in store.digests():
        store.get(digest)

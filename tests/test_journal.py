"""The uploader's local journal: it only saves re-sending, so it must never claim a
manifest for another file or a confirm that did not happen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from foldfed.uploader.journal import UploadJournal

MANIFEST = b"\x08\x01serialized manifest"


@pytest.fixture
def delta(tmp_path: Path) -> Path:
    path = tmp_path / "delta.safetensors"
    path.write_bytes(b"delta bytes " * 1000)
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def _confirmed_file(spool: Path, step: int) -> Path:
    return UploadJournal(spool, step).dir / "confirmed"


def test_no_manifest_before_start(spool: Path, delta: Path) -> None:
    assert UploadJournal(spool, 1).load_manifest(delta) is None


def test_the_manifest_is_returned_for_the_same_file_after_start(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    assert journal.load_manifest(delta) == MANIFEST
    assert UploadJournal(spool, 1).load_manifest(delta) == MANIFEST  # a restarted uploader


def test_the_manifest_is_per_step(spool: Path, delta: Path) -> None:
    UploadJournal(spool, 1).start(delta, MANIFEST)
    assert UploadJournal(spool, 2).load_manifest(delta) is None


def test_no_manifest_for_a_different_file(spool: Path, delta: Path, tmp_path: Path) -> None:
    UploadJournal(spool, 1).start(delta, MANIFEST)
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(delta.read_bytes())
    os.utime(twin, ns=(delta.stat().st_atime_ns, delta.stat().st_mtime_ns))
    assert UploadJournal(spool, 1).load_manifest(twin) is None


def test_no_manifest_for_a_file_that_grew(spool: Path, delta: Path) -> None:
    UploadJournal(spool, 1).start(delta, MANIFEST)
    stat = delta.stat()
    with open(delta, "ab") as f:
        f.write(b"more")
    os.utime(delta, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert UploadJournal(spool, 1).load_manifest(delta) is None


def test_no_manifest_for_a_file_rewritten_in_place(spool: Path, delta: Path) -> None:
    UploadJournal(spool, 1).start(delta, MANIFEST)
    stat = delta.stat()
    delta.write_bytes(b"DELTA BYTES " * 1000)  # same size
    os.utime(delta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert delta.stat().st_size == stat.st_size
    assert UploadJournal(spool, 1).load_manifest(delta) is None


def test_a_new_start_replaces_the_manifest(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    journal.start(delta, b"another manifest")
    assert UploadJournal(spool, 1).load_manifest(delta) == b"another manifest"


def test_confirms_round_trip(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    assert journal.confirmed() == set()
    for index in (0, 5, 3, 5, 2**32 - 1):
        journal.mark_confirmed(index)
    assert journal.confirmed() == {0, 3, 5, 2**32 - 1}
    journal.close()
    journal.close()  # twice is fine
    assert UploadJournal(spool, 1).confirmed() == {0, 3, 5, 2**32 - 1}


def test_a_torn_trailing_record_is_ignored(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    journal.mark_confirmed(1)
    journal.mark_confirmed(258)
    journal.close()
    with open(_confirmed_file(spool, 1), "ab") as f:
        f.write(b"\x07\x00")
    assert UploadJournal(spool, 1).confirmed() == {1, 258}


def test_confirms_appended_after_a_torn_record_are_read_back(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    journal.mark_confirmed(1)
    journal.close()
    with open(_confirmed_file(spool, 1), "ab") as f:
        f.write(b"\x07\x00")
    resumed = UploadJournal(spool, 1)
    resumed.mark_confirmed(2)
    resumed.close()
    assert UploadJournal(spool, 1).confirmed() == {1, 2}


def test_start_forgets_earlier_confirms(spool: Path, delta: Path) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    journal.mark_confirmed(4)
    journal.close()
    restarted = UploadJournal(spool, 1)
    restarted.start(delta, b"a re-planned manifest")
    assert restarted.confirmed() == set()
    restarted.mark_confirmed(7)
    restarted.close()
    assert UploadJournal(spool, 1).confirmed() == {7}


def test_confirms_after_a_second_start_on_the_same_journal_are_kept(
    spool: Path, delta: Path
) -> None:
    journal = UploadJournal(spool, 1)
    journal.start(delta, MANIFEST)
    journal.mark_confirmed(4)
    journal.start(delta, b"a re-planned manifest")
    journal.mark_confirmed(7)
    journal.close()
    assert UploadJournal(spool, 1).confirmed() == {7}


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from foldfed.uploader.journal import UploadJournal

    journal = UploadJournal(Path(sys.argv[1]), 1)
    journal.start(Path(sys.argv[2]), b"manifest")
    index = 0
    while True:
        journal.mark_confirmed(index)
        index += 1
        if index % 100 == 0:
            print(index, flush=True)
    """
)


def test_confirms_survive_a_sigkilled_writer(spool: Path, delta: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(spool), str(delta)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        reported = 0
        while reported < 2000:
            line = proc.stdout.readline()
            assert line, f"writer exited early with {proc.poll()}"
            reported = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    confirmed = UploadJournal(spool, 1).confirmed()
    # Every append made before the kill is there, and nothing else: a prefix 0..n-1.
    assert len(confirmed) >= reported
    assert confirmed == set(range(len(confirmed)))
    assert UploadJournal(spool, 1).load_manifest(delta) == b"manifest"

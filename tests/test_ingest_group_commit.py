"""Ingest's group commit: how batches are cut and settled (pure), and the ledger making a
batch of chunks durable together with the same outcome as one by one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_ledger import (
    Delta,
    ask,
    assert_receipt,
    assert_stored,
    chunk_of,
    deltas,  # noqa: F401  (the fixture)
    manifest_for,
    open_ledger,
    receipts_of,
)

from foldfed.digests import digest_of
from foldfed.errors import Reject
from foldfed.ingest.batching import CHUNK_TYPE, Group, Outcome, Settlement, groups, settlement
from foldfed.ingest.ledger import ChunkBatch, IngestLedger
from foldfed.ingest.rules import Effects

MANIFEST = "foldfed.v1.DeltaManifest"
HAVE = "foldfed.v1.HaveRequest"

# ------------------------------------------------------------------------ batching (pure)


def test_consecutive_chunks_form_one_group_and_other_messages_stand_alone() -> None:
    types = [CHUNK_TYPE, CHUNK_TYPE, HAVE, CHUNK_TYPE, MANIFEST, MANIFEST, CHUNK_TYPE]
    assert groups(types) == [
        Group(0, 2, True),
        Group(2, 3, False),
        Group(3, 4, True),
        Group(4, 5, False),
        Group(5, 6, False),
        Group(6, 7, True),
    ]
    assert groups([]) == []


def test_groups_cover_the_batch_in_order() -> None:
    types = [CHUNK_TYPE, HAVE, HAVE, CHUNK_TYPE, CHUNK_TYPE, CHUNK_TYPE]
    cut = groups(types)
    assert [i for g in cut for i in range(g.start, g.stop)] == list(range(len(types)))
    assert all(g.stop - g.start == 1 for g in cut if not g.chunks)


def test_rejected_messages_are_settled_before_the_multiple_ack() -> None:
    d, r, f = Outcome.DURABLE, Outcome.REJECTED, Outcome.FAILED
    assert settlement([d, d, d]) == Settlement((), 2)
    # A bad message after the last durable one, or between: settled alone, first; the
    # multiple-ack (on the last durable message) then covers only durable ones.
    assert settlement([d, r, d, f]) == Settlement((1, 3), 2)
    assert settlement([r, f]) == Settlement((0, 1), None)
    assert settlement([]) == Settlement((), None)


# ------------------------------------------------------------------------ the ledger


def _batch(ledger: IngestLedger, delta: Delta, indices: list[int]) -> list[Effects]:
    batch = ChunkBatch()
    staged = [ledger.stage_chunk(batch, chunk_of(delta, i)) for i in indices]
    ledger.commit_chunks(batch)
    return [ledger.apply_chunk(s) for s in staged]


def test_a_batch_gives_the_receipt_one_by_one_would(tmp_path: Path, deltas) -> None:  # noqa: F811
    delta = deltas[0]
    ledger = open_ledger(tmp_path / "hub")
    try:
        m, ser = manifest_for(delta)
        ledger.on_manifest(m, ser)
        # Chunk 1 twice in one batch: written once, counted once, then a duplicate.
        effects = _batch(ledger, delta, [0, 1, 1, 2, 3])
        assert [e.duplicate for e in effects] == [False, False, True, False, False]
        (receipt,) = receipts_of(effects)
        assert effects[-1].receipts == [receipt]  # from the chunk that completed it
        assert_receipt(receipt, m, ser, duplicates=1)
        assert_stored(ledger, delta)
        assert ledger.delivered(1) == {"org-a"}
        assert list((tmp_path / "hub" / "store" / "tmp").iterdir()) == []
    finally:
        ledger.close()


def test_a_batch_staged_but_not_committed_leaves_nothing(tmp_path: Path, deltas) -> None:  # noqa: F811
    """The crash window between the writes and the fsync pass: after a restart nothing
    of the batch is held, so the broker's redelivery stores and counts it all."""
    delta = deltas[0]
    before = open_ledger(tmp_path / "hub")
    m, ser = manifest_for(delta)
    before.on_manifest(m, ser)
    batch = ChunkBatch()
    for i in range(4):
        before.stage_chunk(batch, chunk_of(delta, i))
    assert len(os.listdir(tmp_path / "hub" / "store" / "tmp")) == 4
    before.close()  # no commit: as if SIGKILLed here

    after = open_ledger(tmp_path / "hub")
    try:
        assert list((tmp_path / "hub" / "store" / "tmp").iterdir()) == []  # cleaned at open
        assert not any(after.store.has(d) for d in delta.digests)
        missing, _ = ask(after, m)
        assert missing == (0, 1, 2, 3)
        (receipt,) = receipts_of(_batch(after, delta, list(missing)))
        assert_receipt(receipt, m, ser, duplicates=0)
    finally:
        after.close()


def test_a_committed_batch_redelivered_is_all_duplicates(tmp_path: Path, deltas) -> None:  # noqa: F811
    """The crash window between the commit and the acks: the redelivered batch changes
    nothing and yields no second receipt."""
    delta = deltas[0]
    ledger = open_ledger(tmp_path / "hub")
    try:
        m, ser = manifest_for(delta)
        ledger.on_manifest(m, ser)
        assert len(receipts_of(_batch(ledger, delta, [0, 1, 2, 3]))) == 1
        again = _batch(ledger, delta, [0, 1, 2, 3])
        assert all(e.duplicate for e in again) and not receipts_of(again)
        assert ledger.receipt(1, "org-a").duplicate_chunks == 4
    finally:
        ledger.close()


def test_a_bad_chunk_in_a_batch_is_rejected_alone(tmp_path: Path, deltas) -> None:  # noqa: F811
    delta = deltas[0]
    ledger = open_ledger(tmp_path / "hub")
    try:
        m, ser = manifest_for(delta)
        ledger.on_manifest(m, ser)
        batch = ChunkBatch()
        good = [ledger.stage_chunk(batch, chunk_of(delta, i)) for i in (0, 1)]
        bad = chunk_of(delta, 2)
        tampered = bad.body[:-1] + bytes([bad.body[-1] ^ 1])
        with pytest.raises(Reject):
            ledger.stage_chunk(batch, type(bad)(1, "org-a", 2, bad.digest, tampered))
        assert not ledger.store.has(digest_of(tampered))
        ledger.commit_chunks(batch)
        assert [ledger.apply_chunk(s) for s in good] == [Effects(), Effects()]
        missing, _ = ask(ledger, m)
        assert missing == (2, 3)
    finally:
        ledger.close()

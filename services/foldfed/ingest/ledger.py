"""The hub's durable record of what each participant delivered.

`IngestLedger` turns one verified message into effects (replies, receipts) after making
its consequences durable: chunk bytes in the content-addressed store (fsynced), facts in
SQLite (WAL, synchronous=FULL). Handlers are idempotent: a redelivered message changes
nothing and is counted as a duplicate. Blocking: the service calls it from a worker
thread, one message at a time.

What "held" means is scoped per participant: the hub answers a have-request with the
chunks *this* participant delivered before, never with what another participant holds,
so nobody can probe another company's update by digest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from foldfed.chunkstore import ChunkStore
from foldfed.digests import digest_of, short
from foldfed.errors import Reject
from foldfed.ingest.checks import check_body_size, check_chunk_body, check_manifest
from foldfed.messages import (
    Chunk,
    DeliveryReceipt,
    HaveReply,
    HaveRequest,
    Manifest,
    StepReleased,
    decode,
    encode,
    now_ms,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hub_state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (
    step INTEGER NOT NULL,
    participant TEXT NOT NULL,
    manifest_id BLOB NOT NULL,
    chunk_count INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    completed_ms INTEGER,
    duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (step, participant)
);
CREATE TABLE IF NOT EXISTS manifest_chunks (
    step INTEGER NOT NULL,
    participant TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest BLOB NOT NULL,
    present INTEGER NOT NULL,
    PRIMARY KEY (step, participant, idx)
);
CREATE TABLE IF NOT EXISTS owned (
    participant TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (participant, digest)
);
"""


class DeltaSink(Protocol):
    """What the aggregator adds to ingest: content checks and the running sum.

    `validate` must raise Reject for bad content *before* anything is stored, and return
    what `apply` needs; `apply` runs once per chunk that newly counts."""

    def check_manifest(self, m: Manifest) -> None: ...

    def validate(self, m: Manifest, index: int, body: bytes) -> object: ...

    def apply(self, m: Manifest, index: int, prepared: object) -> None: ...


class _NoSink:
    def check_manifest(self, m: Manifest) -> None:
        pass

    def validate(self, m: Manifest, index: int, body: bytes) -> object:
        return None

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        pass


@dataclass
class Effects:
    """What the service must publish once the ledger has made a message durable."""

    replies: list[HaveReply] = field(default_factory=list)
    receipts: list[DeliveryReceipt] = field(default_factory=list)
    released: list[StepReleased] = field(default_factory=list)
    duplicate: bool = False


class IngestLedger:
    def __init__(
        self,
        state_dir: Path,
        participants: tuple[str, ...],
        first_step: int,
        max_payload_bytes: int,
        sink: DeltaSink | None = None,
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.sink: DeltaSink = sink or _NoSink()
        self._manifests: dict[tuple[int, str], Manifest] = {}
        self.store = ChunkStore(state_dir / "store")
        self.participants = frozenset(participants)
        self.max_payload_bytes = max_payload_bytes
        self._db = sqlite3.connect(
            state_dir / "ingest.sqlite3", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a fact we acked must survive power loss, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO hub_state VALUES ('open_step', ?)", (first_step,)
            )
            self._db.execute("INSERT OR IGNORE INTO hub_state VALUES ('model_digest', x'')")
            # The open step's members, as its release named them ('' = every configured
            # participant). A configured participant outside the cycle (a late joiner
            # waiting for the next one) must not reach the running sum: finalize weights
            # only members, so its delta would skew the average unseen.
            self._db.execute("INSERT OR IGNORE INTO hub_state VALUES ('members', '')")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic, durable transaction. (The connection is in autocommit mode, where
        `with connection:` would not open one: each statement would commit alone.)"""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- state

    @property
    def open_step(self) -> int:
        return int(self._state("open_step"))

    @property
    def model_digest(self) -> bytes:
        return bytes(self._state("model_digest"))

    @property
    def members(self) -> frozenset[str]:
        named = str(self._state("members"))
        return frozenset(named.split(",")) if named else self.participants

    def _state(self, key: str) -> int | bytes | str:
        row = self._db.execute("SELECT value FROM hub_state WHERE key = ?", (key,)).fetchone()
        return row[0]

    def manifest(self, step: int, participant: str) -> Manifest | None:
        # Cached: every chunk needs its manifest, and manifests never change once stored.
        key = (step, participant)
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        raw = self.store.get_manifest(step, participant)
        if raw is None:
            return None
        decoded = decode("foldfed.v1.DeltaManifest", raw)
        assert isinstance(decoded, Manifest)
        if len(self._manifests) > 1024:
            self._manifests.clear()
        self._manifests[key] = decoded
        return decoded

    def delivered(self, step: int) -> set[str]:
        rows = self._db.execute(
            "SELECT participant FROM manifests WHERE step = ? AND completed_ms IS NOT NULL",
            (step,),
        )
        return {r[0] for r in rows}

    # ---------------------------------------------------------------- checks

    def _check_sender(self, step: int, participant: str, delivered: bytes = b"") -> None:
        """Reject unknown participants and steps that are not open. `delivered`: a
        manifest id the message refers to; if that very delta was delivered in full, a
        closed step is fine (a restarted uploader re-asking for its receipt)."""
        if participant not in self.participants:
            raise Reject(f"unknown participant {participant!r}")
        open_step = self.open_step
        if step < open_step and delivered and self._completed_id(step, participant) == delivered:
            return
        if step < open_step:
            raise Reject(f"step {step} is closed (step {open_step} is open): replay?")
        if step > open_step:
            raise Reject(f"unknown step {step}: step {open_step} is open")
        if participant not in self.members:
            raise Reject(
                f"{participant!r} is not a member of the cycle of step {open_step}: "
                "a participant joins at a cycle boundary"
            )

    # ---------------------------------------------------------------- handlers

    def on_step_released(self, msg: StepReleased) -> Effects:
        """Open `msg.step` for deltas. Releases only move forward; a replay is a no-op."""
        open_step, model_digest = self.open_step, self.model_digest
        if msg.step < open_step or (msg.step == open_step and msg.model_digest == model_digest):
            return Effects(duplicate=True)
        if msg.step == open_step and model_digest:
            raise Reject(f"step {msg.step} was already released with model {short(model_digest)}")
        with self._transaction():
            self._db.execute("UPDATE hub_state SET value = ? WHERE key = 'open_step'", (msg.step,))
            self._db.execute(
                "UPDATE hub_state SET value = ? WHERE key = 'model_digest'", (msg.model_digest,)
            )
            self._db.execute(
                "UPDATE hub_state SET value = ? WHERE key = 'members'",
                (",".join(sorted(msg.participants)),),
            )
        return Effects(released=[msg])

    def on_manifest(self, m: Manifest, serialized: bytes) -> Effects:
        new_id = digest_of(serialized)
        self._check_sender(m.step, m.participant, delivered=new_id)
        check_manifest(m, self.max_payload_bytes)
        row = self._db.execute(
            "SELECT manifest_id FROM manifests WHERE step = ? AND participant = ?",
            (m.step, m.participant),
        ).fetchone()
        if row is not None:
            if bytes(row[0]) != new_id:
                raise Reject(
                    f"conflicting manifest for step {m.step}: {short(bytes(row[0]))} already "
                    f"accepted, got {short(new_id)} (replay or forgery?)"
                )
            return Effects(duplicate=True)
        released = self.model_digest
        if released and m.base_model_digest != released:
            raise Reject(
                f"delta was computed against model {short(m.base_model_digest) or '(none)'}, "
                f"but step {m.step} released {short(released)}"
            )
        if encode(m)[1] != serialized:
            # Ids are hashes of canonical bytes: anything else (unknown fields, another
            # encoder's ordering) would give one delta two ids.
            raise Reject("manifest is not in canonical form (unknown fields?)")
        self.sink.check_manifest(m)
        held = [i for i, d in enumerate(m.chunk_digests) if self._holds(m.participant, d)]
        for index in held:  # chunks it delivered before: their content must pass too
            self.sink.validate(m, index, self.store.get(m.chunk_digests[index]))
        # Write the manifest file first: the row that points to it is the commit point.
        self.store.put_manifest(m.step, m.participant, serialized)
        with self._transaction():
            self._db.execute(
                "INSERT INTO manifests (step, participant, manifest_id, chunk_count, received_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (m.step, m.participant, new_id, len(m.chunk_digests), now_ms()),
            )
            self._db.executemany(
                "INSERT INTO manifest_chunks VALUES (?, ?, ?, ?, ?)",
                [
                    (m.step, m.participant, i, d, int(i in held))
                    for i, d in enumerate(m.chunk_digests)
                ],
            )
        for index in held:
            self._apply_stored(m, index)
        return self._complete_if_done(m.step, m.participant)

    def on_have_request(self, r: HaveRequest) -> Effects:
        self._check_sender(r.step, r.participant, delivered=r.manifest_id)
        row = self._db.execute(
            "SELECT manifest_id FROM manifests WHERE step = ? AND participant = ?",
            (r.step, r.participant),
        ).fetchone()
        if row is None or bytes(row[0]) != r.manifest_id:
            reply = HaveReply(
                r.step, r.participant, r.manifest_id, r.request_id, (), "unknown manifest"
            )
            return Effects(replies=[reply])
        missing = tuple(
            i
            for (i,) in self._db.execute(
                "SELECT idx FROM manifest_chunks WHERE step = ? AND participant = ? AND present = 0"
                " ORDER BY idx",
                (r.step, r.participant),
            )
        )
        reply = HaveReply(r.step, r.participant, r.manifest_id, r.request_id, missing)
        # Delivered already: send the receipt again, the asker may have lost the first one
        # (an uploader killed after completion). Receipts are idempotent.
        receipts = [] if missing else [self.receipt(r.step, r.participant)]
        return Effects(replies=[reply], receipts=receipts)

    def on_chunk(self, c: Chunk) -> Effects:
        self._check_sender(c.step, c.participant)
        check_body_size(len(c.body))
        manifest = self.manifest(c.step, c.participant)
        if manifest is not None:
            check_chunk_body(manifest, c.index, c.digest, len(c.body))
        actual = digest_of(c.body)
        if actual != c.digest:
            raise Reject(
                f"digest mismatch: chunk {c.index} hashes to {short(actual)}, "
                f"message claims {short(c.digest)}"
            )
        prepared = None if manifest is None else self.sink.validate(manifest, c.index, c.body)
        # A chunk may arrive before its manifest (redelivery reorders): it is verified and
        # stored, and the manifest counts it when it comes.
        self.store.put(c.digest, c.body, verified=True)  # hashed just above
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO owned VALUES (?, ?)", (c.participant, c.digest))
            if manifest is None:
                return Effects()
            marked = self._db.execute(
                "UPDATE manifest_chunks SET present = 1"
                " WHERE step = ? AND participant = ? AND idx = ? AND present = 0",
                (c.step, c.participant, c.index),
            ).rowcount
            if not marked:
                self._db.execute(
                    "UPDATE manifests SET duplicates = duplicates + 1"
                    " WHERE step = ? AND participant = ?",
                    (c.step, c.participant),
                )
                return Effects(duplicate=True)
        self.sink.apply(manifest, c.index, prepared)
        return self._complete_if_done(c.step, c.participant)

    def replay_open_step(self) -> int:
        """Re-apply every chunk that counts for the open step (a fresh sink after a
        restart rebuilds the exact same running sum). Returns the chunks applied."""
        step, applied = self.open_step, 0
        for (participant,) in self._db.execute(
            "SELECT participant FROM manifests WHERE step = ? ORDER BY participant", (step,)
        ).fetchall():
            manifest = self.manifest(step, participant)
            assert manifest is not None
            for (index,) in self._db.execute(
                "SELECT idx FROM manifest_chunks"
                " WHERE step = ? AND participant = ? AND present = 1 ORDER BY idx",
                (step, participant),
            ).fetchall():
                self._apply_stored(manifest, index)
                applied += 1
        return applied

    def weights(self, step: int) -> dict[str, float]:
        """Aggregation weight of every participant whose delta for `step` is complete."""
        out: dict[str, float] = {}
        for participant in self.delivered(step):
            manifest = self.manifest(step, participant)
            assert manifest is not None
            out[participant] = manifest.weight
        return out

    # ---------------------------------------------------------------- helpers

    def _apply_stored(self, m: Manifest, index: int) -> None:
        body = self.store.get(m.chunk_digests[index])
        self.sink.apply(m, index, self.sink.validate(m, index, body))

    def _completed_id(self, step: int, participant: str) -> bytes:
        row = self._db.execute(
            "SELECT manifest_id FROM manifests"
            " WHERE step = ? AND participant = ? AND completed_ms IS NOT NULL",
            (step, participant),
        ).fetchone()
        return b"" if row is None else bytes(row[0])

    def _holds(self, participant: str, digest: bytes) -> bool:
        owned = self._db.execute(
            "SELECT 1 FROM owned WHERE participant = ? AND digest = ?", (participant, digest)
        ).fetchone()
        return owned is not None and self.store.has(digest)

    def _complete_if_done(self, step: int, participant: str) -> Effects:
        (missing,) = self._db.execute(
            "SELECT count(*) FROM manifest_chunks"
            " WHERE step = ? AND participant = ? AND present = 0",
            (step, participant),
        ).fetchone()
        if missing:
            return Effects()
        completed = now_ms()
        with self._transaction():
            first_time = self._db.execute(
                "UPDATE manifests SET completed_ms = ?"
                " WHERE step = ? AND participant = ? AND completed_ms IS NULL",
                (completed, step, participant),
            ).rowcount
        if not first_time:
            return Effects(duplicate=True)
        return Effects(receipts=[self.receipt(step, participant)])

    def receipt(self, step: int, participant: str) -> DeliveryReceipt:
        manifest = self.manifest(step, participant)
        assert manifest is not None
        manifest_id, duplicates, completed = self._db.execute(
            "SELECT manifest_id, duplicates, completed_ms FROM manifests"
            " WHERE step = ? AND participant = ?",
            (step, participant),
        ).fetchone()
        return DeliveryReceipt(
            step=step,
            participant=participant,
            manifest_id=bytes(manifest_id),
            payload_digest=manifest.payload_digest,
            chunk_count=len(manifest.chunk_digests),
            payload_size=manifest.payload_size,
            duplicate_chunks=duplicates,
            completed_unix_ms=completed or 0,
        )

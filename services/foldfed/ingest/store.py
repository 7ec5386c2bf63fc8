"""The ingest ledger's facts in SQLite (WAL, synchronous=FULL): the open step, which
manifest each participant sent for a step, which of its chunks are present, and which
chunk digests each participant delivered.

Persistence only: what the facts mean is decided by ingest/rules.py. Each method that
changes something is one transaction, so a crash leaves a fact entirely or not at all;
`batch` groups several into one (ingest's group commit).

Tables:
  hub_state(key, value)       'open_step', 'model_digest', 'members' (comma-separated
                              names of the open step's cycle; '' = every participant),
                              'released' (1 once a release opened 'open_step'; 0 for
                              the configured first step before its release, when no
                              delta counts), 'coding' (the open step's CycleCoding as
                              JSON; absent: the reference, fp32:v1), 'weights' (the
                              agreed weight of each member as a JSON object; absent or
                              {}: none fixed), 'norm_bound' (the open step's update
                              bound; absent: 0.0, none)
  manifests(step, participant, manifest_id, chunk_count, received_ms, completed_ms,
            duplicates)       one row per accepted manifest; completed_ms set once
  manifest_chunks(step, participant, idx, digest, present)
                              one row per chunk of an accepted manifest
  owned(participant, digest)  chunk digests a participant delivered (have-requests are
                              answered per participant, never across participants)

Blocking: the ledger calls it from a worker thread, one message or batch at a time.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from foldfed.codedvector import REFERENCE_CODING, CycleCoding
from foldfed.ingest.rules import OpenStep

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


class IngestStore:
    def __init__(self, path: Path, participants: frozenset[str], first_step: int) -> None:
        self.participants = participants
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
            # The configured first step waits for its release: a delta counted before it
            # would be checked against no model, members or codec (ingest/rules.py).
            self._db.execute("INSERT OR IGNORE INTO hub_state VALUES ('released', 0)")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction around several changes (ingest's group commit): the methods
        called inside it commit together, with one fsync of the log, or not at all."""
        with self._transaction():
            yield

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic, durable transaction. (The connection is in autocommit mode, where
        `with connection:` would not open one: each statement would commit alone.) Inside
        `batch` it is part of the batch's transaction."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- the open step

    def open_step(self) -> OpenStep:
        rows = dict(self._db.execute("SELECT key, value FROM hub_state").fetchall())
        named = str(rows["members"])
        members = frozenset(named.split(",")) if named else self.participants
        coding = _coding_from_json(rows.get("coding"))
        weights = json.loads(str(rows.get("weights", "{}")))
        return OpenStep(
            int(rows["open_step"]),
            bytes(rows["model_digest"]),
            members,
            coding,
            released=bool(int(rows["released"])),
            weights=tuple(sorted((str(p), float(w)) for p, w in weights.items())),
            norm_bound=float(rows.get("norm_bound", 0.0)),
        )

    def open(
        self,
        step: int,
        model_digest: bytes,
        members: Sequence[str],
        coding: CycleCoding = REFERENCE_CODING,
        weights: Sequence[tuple[str, float]] = (),
        norm_bound: float = 0.0,
    ) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO hub_state VALUES ('norm_bound', ?)", (norm_bound,)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO hub_state VALUES ('coding', ?)", (_coding_to_json(coding),)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO hub_state VALUES ('weights', ?)",
                (json.dumps(dict(weights), sort_keys=True),),
            )
            self._db.execute("UPDATE hub_state SET value = ? WHERE key = 'open_step'", (step,))
            self._db.execute(
                "UPDATE hub_state SET value = ? WHERE key = 'model_digest'", (model_digest,)
            )
            self._db.execute(
                "UPDATE hub_state SET value = ? WHERE key = 'members'",
                (",".join(sorted(members)),),
            )
            self._db.execute("UPDATE hub_state SET value = 1 WHERE key = 'released'")

    # ---------------------------------------------------------------- manifests

    def accepted_id(self, step: int, participant: str) -> bytes | None:
        """The id of the manifest accepted for (step, participant), if any."""
        row = self._db.execute(
            "SELECT manifest_id FROM manifests WHERE step = ? AND participant = ?",
            (step, participant),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def completed_id(self, step: int, participant: str) -> bytes:
        """The id of the manifest delivered in full for (step, participant), or b""."""
        row = self._db.execute(
            "SELECT manifest_id FROM manifests"
            " WHERE step = ? AND participant = ? AND completed_ms IS NOT NULL",
            (step, participant),
        ).fetchone()
        return b"" if row is None else bytes(row[0])

    def add_manifest(
        self,
        step: int,
        participant: str,
        manifest_id: bytes,
        digests: Sequence[bytes],
        present: frozenset[int],
        received_ms: int,
    ) -> None:
        """Record an accepted manifest; `present`: indices already held."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO manifests (step, participant, manifest_id, chunk_count, received_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (step, participant, manifest_id, len(digests), received_ms),
            )
            self._db.executemany(
                "INSERT INTO manifest_chunks VALUES (?, ?, ?, ?, ?)",
                [(step, participant, i, d, int(i in present)) for i, d in enumerate(digests)],
            )

    def withdraw(self, step: int, participant: str) -> list[int]:
        """Forget the incomplete manifest of (step, participant) and its chunk rows, so
        its chunks count no more and the participant may send another manifest. Returns
        the indices that were present (counted). A complete delivery is never withdrawn."""
        with self._transaction():
            done = self._db.execute(
                "SELECT 1 FROM manifests WHERE step = ? AND participant = ?"
                " AND completed_ms IS NOT NULL",
                (step, participant),
            ).fetchone()
            if done is not None:
                raise ValueError(f"step {step}'s delivery of {participant!r} is complete")
            present = [
                i
                for (i,) in self._db.execute(
                    "SELECT idx FROM manifest_chunks"
                    " WHERE step = ? AND participant = ? AND present = 1 ORDER BY idx",
                    (step, participant),
                )
            ]
            for table in ("manifest_chunks", "manifests"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE step = ? AND participant = ?", (step, participant)
                )
            return present

    def participants_with_manifest(self, step: int) -> list[str]:
        rows = self._db.execute(
            "SELECT participant FROM manifests WHERE step = ? ORDER BY participant", (step,)
        ).fetchall()
        return [r[0] for r in rows]

    def delivered(self, step: int) -> set[str]:
        rows = self._db.execute(
            "SELECT participant FROM manifests WHERE step = ? AND completed_ms IS NOT NULL",
            (step,),
        )
        return {r[0] for r in rows}

    def receipt_facts(self, step: int, participant: str) -> tuple[bytes, int, int | None]:
        """(manifest id, duplicate chunks, completed ms) of an accepted manifest."""
        manifest_id, duplicates, completed = self._db.execute(
            "SELECT manifest_id, duplicates, completed_ms FROM manifests"
            " WHERE step = ? AND participant = ?",
            (step, participant),
        ).fetchone()
        return bytes(manifest_id), int(duplicates), completed

    def mark_complete(self, step: int, participant: str, completed_ms: int) -> bool:
        """Set the completion time once; True the first time only."""
        with self._transaction():
            return bool(
                self._db.execute(
                    "UPDATE manifests SET completed_ms = ?"
                    " WHERE step = ? AND participant = ? AND completed_ms IS NULL",
                    (completed_ms, step, participant),
                ).rowcount
            )

    # ---------------------------------------------------------------- chunks

    def missing(self, step: int, participant: str) -> tuple[int, ...]:
        rows = self._db.execute(
            "SELECT idx FROM manifest_chunks WHERE step = ? AND participant = ? AND present = 0"
            " ORDER BY idx",
            (step, participant),
        )
        return tuple(i for (i,) in rows)

    def missing_count(self, step: int, participant: str) -> int:
        (missing,) = self._db.execute(
            "SELECT count(*) FROM manifest_chunks"
            " WHERE step = ? AND participant = ? AND present = 0",
            (step, participant),
        ).fetchone()
        return int(missing)

    def present(self, step: int, participant: str) -> list[int]:
        rows = self._db.execute(
            "SELECT idx FROM manifest_chunks"
            " WHERE step = ? AND participant = ? AND present = 1 ORDER BY idx",
            (step, participant),
        ).fetchall()
        return [i for (i,) in rows]

    def owns(self, participant: str, digest: bytes) -> bool:
        """Whether `participant` delivered a chunk with this digest before."""
        row = self._db.execute(
            "SELECT 1 FROM owned WHERE participant = ? AND digest = ?", (participant, digest)
        ).fetchone()
        return row is not None

    def record_chunk(
        self, step: int, participant: str, index: int, digest: bytes, *, counted: bool
    ) -> bool:
        """Record that `participant` delivered `digest`, and, if `counted` (its manifest is
        accepted), mark chunk `index` present, or count a duplicate if it already was.
        Returns whether the chunk became present now."""
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO owned VALUES (?, ?)", (participant, digest))
            if not counted:
                return False
            marked = self._db.execute(
                "UPDATE manifest_chunks SET present = 1"
                " WHERE step = ? AND participant = ? AND idx = ? AND present = 0",
                (step, participant, index),
            ).rowcount
            if not marked:
                self._db.execute(
                    "UPDATE manifests SET duplicates = duplicates + 1"
                    " WHERE step = ? AND participant = ?",
                    (step, participant),
                )
            return bool(marked)


def _coding_to_json(coding: CycleCoding) -> str:
    return json.dumps(
        {
            "cycle": coding.cycle,
            "ranges_digest": coding.ranges_digest.hex(),
            "seed": coding.seed,
            "spec": coding.spec,
            **({"choices": list(coding.choices)} if coding.choices else {}),
        },
        sort_keys=True,
    )


def _coding_from_json(raw: object) -> CycleCoding:
    if raw is None:
        return REFERENCE_CODING
    data = json.loads(str(raw))
    return CycleCoding(
        data["spec"],
        int(data["seed"]),
        int(data["cycle"]),
        bytes.fromhex(data["ranges_digest"]),
        tuple(str(c) for c in data.get("choices", ())),  # absent in rows from before choices
    )

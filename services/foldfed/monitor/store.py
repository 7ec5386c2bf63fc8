"""The monitor's durable memory: SQLite (WAL), so a restarted monitor rebuilds its state.

Tables:
  meta(key, value)                         'format' = FORMAT_VERSION, checked on open
  messages(seq, message_id, received_ms, type, body)
                                           every believed message from foldfed.events,
                                           raw protobuf bytes, in arrival order; a
                                           redelivered message (same message_id) is kept once
  heartbeats(service, participant, received_ms, body)
                                           the latest heartbeat per sender only
  alerts(key, published_ms)                alerts already published (not raised twice)

Replaying `messages` (then `heartbeats`) through a fresh MonitorModel gives the state the
monitor had: the model is a pure fold, and receipt times are stored with each message.
synchronous=NORMAL: a SIGKILL loses nothing committed; a power cut may lose the last
messages, which the broker redelivers anyway (the monitor acks only after commit).

Blocking: the service calls it from a worker thread, one call at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from foldfed.errors import StoreError

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    message_id TEXT UNIQUE,
    received_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS heartbeats (
    service TEXT NOT NULL,
    participant TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (service, participant)
);
CREATE TABLE IF NOT EXISTS alerts (key TEXT PRIMARY KEY, published_ms INTEGER NOT NULL);
"""


class MonitorStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('format', ?)", (str(FORMAT_VERSION),)
                )
            elif row[0] != str(FORMAT_VERSION):
                raise StoreError(f"{path}: monitor store format {row[0]}, expected 1")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{path}: not a usable monitor store: {exc}") from exc
        except BaseException:
            self._db.close()
            raise

    def add_message(
        self, message_id: str | None, received_ms: int, type_name: str, body: bytes
    ) -> bool:
        """Keep one message; False if its message_id was kept before (a redelivery)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO messages (message_id, received_ms, type, body) "
            "VALUES (?, ?, ?, ?)",
            (message_id or None, received_ms, type_name, body),
        )
        return cursor.rowcount == 1

    def messages(self) -> Iterator[tuple[int, str, bytes]]:
        """(received_ms, type, body) in arrival order."""
        rows = self._db.execute("SELECT received_ms, type, body FROM messages ORDER BY seq")
        for received_ms, type_name, body in rows:
            yield int(received_ms), str(type_name), bytes(body)

    def put_heartbeat(self, service: str, participant: str, received_ms: int, body: bytes) -> None:
        self._db.execute(
            "INSERT INTO heartbeats (service, participant, received_ms, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (service, participant) DO UPDATE SET received_ms = excluded.received_ms,"
            " body = excluded.body WHERE excluded.received_ms >= heartbeats.received_ms",
            (service, participant, received_ms, body),
        )

    def heartbeats(self) -> Iterator[tuple[int, bytes]]:
        rows = self._db.execute("SELECT received_ms, body FROM heartbeats ORDER BY received_ms")
        for received_ms, body in rows:
            yield int(received_ms), bytes(body)

    def published(self, key: str) -> bool:
        row = self._db.execute("SELECT 1 FROM alerts WHERE key = ?", (key,)).fetchone()
        return row is not None

    def mark_published(self, key: str, at_ms: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO alerts (key, published_ms) VALUES (?, ?)", (key, at_ms)
        )

    def close(self) -> None:
        self._db.close()

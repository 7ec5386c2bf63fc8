"""The barrier's durable state: SQLite (WAL, synchronous=FULL), one transaction per event.

Tables:
  meta(key, value)                      'format' = FORMAT_VERSION, checked on open
  state(id = 1, seq, body)              the BarrierState after event `seq` (JSON, 'null'
                                        before the first cycle)
  events(seq, at_ms, kind, event, effects)
                                        append-only: every applied event, ignored ones
                                        included, and the effects it produced
  steps(step, cycle, record)            one StepRecord per global step, for the monitor
  rounds(cycle, round, decision)        readiness gating (barrier/gating.py): each round as
                                        opened, and what it decided ('null' while open)
  readiness(seq, digest, cycle, participant, record)
                                        every verified readiness record, in arrival order,
                                        once per signed payload (a redelivery adds nothing)

`apply(event)` reads the state, runs `transition`, and writes the new state, the log row
and the changed step records in ONE transaction: after a crash the event happened
entirely or not at all, so the state is always the replay of the log (`verify` checks).
A gated cycle start (`start_gated`) writes the round's decision and applies its
CycleStarted in one transaction too, so a restarted barrier finds both or neither. The
gating tables were added without a format change: they are created when missing, and a
store without them simply has no rounds.

Crash semantics. The service calls `apply(event)`, then performs the effects it returns
(publishes), then acks the message that carried the event. Killed after `apply` commits
but before publishing, it has lost the effects but not the transition. On restart it calls
`apply(Recover(at_ms))` and performs what that returns: the pending Release,
RequestFinalize or CycleDone (see `machine.pending`); receivers are idempotent, so a
repeat is harmless. The unacked message is redelivered, and applying it again yields
`Ignored` with the state unchanged.

JSON, never pickle: bytes as lowercase hex, frozensets as sorted lists, tuples as lists,
enums by value, dataclasses as objects; events and effects carry their class in "type".

Blocking: the service calls it from a worker thread, one call at a time.

One concept, the barrier's durable state, in one module of over 400 lines: the cycle's
event log and the gating rounds share a file and a transaction (`start_gated`), and one
JSON codec serves both.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from foldfed.barrier.gating import Decision, GateRecord, Round
from foldfed.barrier.machine import (
    BarrierState,
    CycleDone,
    CycleStarted,
    Delivered,
    Effect,
    Effects,
    Event,
    Finalized,
    FlagMismatch,
    Ignored,
    ModelReported,
    Recover,
    Release,
    RequestFinalize,
    StepRecord,
    pending,
    transition,
)
from foldfed.errors import StoreError

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    effects TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,
    cycle INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    cycle INTEGER PRIMARY KEY,
    round TEXT NOT NULL,
    decision TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS readiness (
    seq INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    cycle INTEGER NOT NULL,
    participant TEXT NOT NULL,
    record TEXT NOT NULL
);
"""

_EVENTS: dict[str, type[Event]] = {
    cls.__name__: cls for cls in (CycleStarted, Delivered, Finalized, ModelReported, Recover)
}
_EFFECTS: dict[str, type[Effect]] = {
    cls.__name__: cls for cls in (RequestFinalize, Release, FlagMismatch, Ignored, CycleDone)
}


@dataclass(frozen=True)
class LoggedEvent:
    seq: int
    event: Event
    effects: Effects


class BarrierStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The state the last `_apply_locked` wrote (returned only once its commit is done).
        self._last_written: BarrierState | None = None
        try:
            self._prepare()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(f"{path}: not a usable barrier store: {e}") from e
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the service acks a message once `apply` returns; a commit lost to a power
        # cut would lose an event nobody sends again (a delivery, and the step never closes).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._check_format()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> BarrierStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writes

    def apply(self, event: Event) -> Effects:
        """Run `event` through the machine and make the outcome durable; return the effects
        the caller must now perform."""
        return self.apply_and_load(event)[0]

    def apply_and_load(self, event: Event) -> tuple[Effects, BarrierState | None]:
        """`apply`, also returning the state it made durable: what `load` would read next,
        without a second read (the service needs it on the release path, for traces)."""
        with self._transaction("IMMEDIATE"):
            return self._apply_locked(event), self._last_written

    def _apply_locked(self, event: Event) -> Effects:
        seq, state = self._read_state()
        new_state, effects = transition(state, event)
        self._last_written = new_state
        self._db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            (
                seq + 1,
                event.at_ms,
                type(event).__name__,
                _dump_tagged(event),
                _dump_effects(effects),
            ),
        )
        self._write_state(seq + 1, new_state)
        return effects

    # ---------------------------------------------------------------- gating

    def open_round(self, rnd: Round) -> Round:
        """Keep `rnd` unless its cycle's round is already stored; return the stored one, so
        a restarted barrier keeps the deadlines it announced whatever its settings say."""
        with self._transaction("IMMEDIATE"):
            self._db.execute(
                "INSERT OR IGNORE INTO rounds VALUES (?, ?, 'null')",
                (rnd.cycle, json.dumps(_to_json(rnd))),
            )
            found = self._round_row(rnd.cycle)
        if found is None:  # inserted or kept in this very transaction
            raise StoreError(f"{self.path}: the round of cycle {rnd.cycle} vanished")
        return found[0]

    def latest_round(self) -> tuple[Round, Decision | None] | None:
        """The round of the highest cycle, and its decision (None while it is open)."""
        row = self._db.execute("SELECT MAX(cycle) FROM rounds").fetchone()
        return None if row[0] is None else self._round_row(row[0])

    def round_of(self, cycle: int) -> tuple[Round, Decision | None] | None:
        return self._round_row(cycle)

    def _round_row(self, cycle: int) -> tuple[Round, Decision | None] | None:
        row = self._db.execute(
            "SELECT round, decision FROM rounds WHERE cycle = ?", (cycle,)
        ).fetchone()
        if row is None:
            return None
        decision = _parse(row[1])
        return (
            _decode(Round, _parse(row[0])),
            None if decision is None else _decode(Decision, decision),
        )

    def add_readiness(self, record: GateRecord) -> bool:
        """Keep a verified record; False when the same signed record is already kept."""
        with self._transaction("IMMEDIATE"):
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO readiness (digest, cycle, participant, record) "
                "VALUES (?, ?, ?, ?)",
                (record.digest, record.cycle, record.participant, json.dumps(_to_json(record))),
            )
        return cursor.rowcount == 1

    def readiness(self, cycle: int) -> list[GateRecord]:
        """The records for `cycle`, in arrival order."""
        rows = self._db.execute(
            "SELECT record FROM readiness WHERE cycle = ? ORDER BY seq", (cycle,)
        )
        return [_decode(GateRecord, _parse(record)) for (record,) in rows]

    def start_gated(self, decision: Decision, start: CycleStarted) -> Effects:
        """Record the round's decision and apply the cycle start it makes, atomically.
        A round decides once: a second call returns no effect and changes nothing."""
        with self._transaction("IMMEDIATE"):
            found = self._round_row(decision.cycle)
            if found is None:
                raise StoreError(f"no gating round for cycle {decision.cycle}")
            if found[1] is not None:
                return (Ignored(f"cycle {decision.cycle} was already decided"),)
            self._db.execute(
                "UPDATE rounds SET decision = ? WHERE cycle = ?",
                (json.dumps(_to_json(decision)), decision.cycle),
            )
            return self._apply_locked(start)

    def _write_state(self, seq: int, state: BarrierState | None) -> None:
        body = "null" if state is None else json.dumps(_to_json(state))
        self._db.execute("INSERT OR REPLACE INTO state VALUES (1, ?, ?)", (seq, body))
        # Only the recent records can have changed; older ones are final.
        for record in state.recent_steps if state else ():
            self._db.execute(
                "INSERT OR REPLACE INTO steps VALUES (?, ?, ?)",
                (record.step, record.cycle, json.dumps(_to_json(record))),
            )

    # ---------------------------------------------------------------- reads

    def load(self) -> BarrierState | None:
        return self._read_state()[1]

    def pending_effects(self) -> Effects:
        """What `Recover` would re-issue now, without logging anything."""
        return pending(self.load())

    def events(self, after_seq: int = 0) -> list[LoggedEvent]:
        rows = self._db.execute(
            "SELECT seq, event, effects FROM events WHERE seq > ? ORDER BY seq", (after_seq,)
        )
        return [LoggedEvent(seq, _load_event(event), _load_effects(fx)) for seq, event, fx in rows]

    def step_history(self, cycle: int | None = None) -> list[StepRecord]:
        """Per global step: when it opened, who delivered when, when it closed, when its
        update was released and which model that was."""
        rows = self._db.execute(
            "SELECT record FROM steps WHERE ? IS NULL OR cycle = ? ORDER BY step", (cycle, cycle)
        )
        return [_decode(StepRecord, _parse(record)) for (record,) in rows]

    def verify(self) -> None:
        """Raise StoreError unless state, effects and history equal a replay of the log."""
        with self._transaction("DEFERRED"):  # one snapshot for all the reads
            logged = self.events()
            seq, stored = self._read_state()
            history = self.step_history()
        state, records = _replay_checked(logged)
        if seq != (logged[-1].seq if logged else 0) or stored != state:
            raise StoreError(f"{self.path}: state disagrees with a replay of the event log")
        if history != [records[step] for step in sorted(records)]:
            raise StoreError(f"{self.path}: step history disagrees with the event log")

    # ---------------------------------------------------------------- helpers

    def _read_state(self) -> tuple[int, BarrierState | None]:
        row = self._db.execute("SELECT seq, body FROM state WHERE id = 1").fetchone()
        if row is None:
            return 0, None
        raw = _parse(row[1])
        return row[0], None if raw is None else _decode(BarrierState, raw)

    def _check_format(self) -> None:
        with self._transaction("IMMEDIATE"):
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),)
            )
            (found,) = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if found != str(FORMAT_VERSION):
            raise StoreError(
                f"{self.path}: barrier store format {found}, this code reads {FORMAT_VERSION}"
            )

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[None]:
        # IMMEDIATE takes the write lock before the state is read, so a second process on
        # the same file (a mistake) waits instead of transitioning from a stale state.
        self._db.execute(f"BEGIN {mode}")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _replay_checked(
    logged: list[LoggedEvent],
) -> tuple[BarrierState | None, dict[int, StepRecord]]:
    state: BarrierState | None = None
    records: dict[int, StepRecord] = {}
    for entry in logged:
        state, effects = transition(state, entry.event)
        if effects != entry.effects:
            raise StoreError(f"event {entry.seq}: logged effects differ from a replay")
        records.update((r.step, r) for r in (state.recent_steps if state else ()))
    return state, records


# ------------------------------------------------------------------------------- JSON


def _to_json(value: object) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, frozenset):
        return sorted(_to_json(v) for v in value)
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    return value  # int, str, None; a StrEnum is written as its value


def _dump_tagged(value: Event | Effect) -> str:
    return json.dumps({"type": type(value).__name__, **_to_json(value)})


def _dump_effects(effects: Effects) -> str:
    return json.dumps([{"type": type(e).__name__, **_to_json(e)} for e in effects])


def _load_event(text: str) -> Event:
    event: Event = _load_tagged(_EVENTS, _parse(text))
    return event


def _load_effects(text: str) -> Effects:
    raw = _parse(text)
    if not isinstance(raw, list):
        raise StoreError(f"stored effects are not a list but {type(raw).__name__}")
    return tuple(_load_tagged(_EFFECTS, one) for one in raw)


def _parse(text: Any) -> Any:
    """A stored JSON text; StoreError if a damaged row (or a hand edit) is not JSON."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise StoreError(f"a stored record is not JSON: {e}") from e


def _load_tagged(types: dict[str, Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise StoreError(f"a stored record is not an object but {type(raw).__name__}")
    fields_only = dict(raw)
    name = fields_only.pop("type", None)
    if not isinstance(name, str) or name not in types:
        raise StoreError(f"unknown record type {name!r}")
    return _decode(types[name], fields_only)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _decode(tp: Any, raw: Any) -> Any:
    try:
        return _from_json(tp, raw)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"cannot read {getattr(tp, '__name__', tp)} from the store: {e}") from e


def _from_json(tp: Any, raw: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is UnionType:  # `X | None` is the only union a stored dataclass has
        (inner,) = (a for a in args if a is not type(None))
        return None if raw is None else _from_json(inner, raw)
    if origin in (frozenset, tuple):
        return origin(_from_json(args[0], v) for v in _as(list, raw))
    if is_dataclass(tp):
        return _dataclass_from_json(tp, _as(dict, raw))
    if tp is bytes:
        return bytes.fromhex(_as(str, raw))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(raw)
    if tp in (int, str, bool):
        return _as(tp, raw)
    if tp is float:  # JSON writes 1.0 as 1.0, but a hand-edited 1 is still a number
        if type(raw) not in (int, float):
            raise TypeError(f"expected a number, stored {raw!r}")
        return float(raw)
    raise TypeError(f"no JSON form for {tp!r}")


def _dataclass_from_json(cls: Any, raw: dict[str, Any]) -> Any:
    hints = _hints(cls)
    # A field added later with a default (the cycle's codec) may be absent from older rows.
    optional = {f.name for f in fields(cls) if f.default is not MISSING}
    if not set(hints) - optional <= set(raw) <= set(hints):
        raise ValueError(f"{cls.__name__} fields {sorted(hints)}, stored {sorted(raw)}")
    return cls(**{name: _from_json(hint, raw[name]) for name, hint in hints.items() if name in raw})


def _as(tp: type, raw: Any) -> Any:
    # bool is an int to Python, never to us.
    if type(raw) is not tp:
        raise TypeError(f"expected {tp.__name__}, stored {raw!r}")
    return raw

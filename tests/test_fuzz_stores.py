"""Fuzzing the barrier's stored records: the state row, the event log and the step records
of barrier/store.py, as a damaged disk or a hand edit could leave them.

Contract (tests/fuzzing.py): `load`, `events`, `step_history` and `verify` return values
or raise StoreError with a reason, never a JSON or type error from deep inside the decoder.
One valid store is built per module; each example overwrites one row's text (through a
second connection, as another process would) with a mutation of its bytes or of its JSON,
reads, and puts the row back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzing import expect_clean, fuzz, json_mutated, mutated
from hypothesis import example, given
from hypothesis import strategies as st

from foldfed.barrier import CycleStarted, Delivered, Finalized
from foldfed.barrier.store import BarrierStore
from foldfed.digests import digest_of
from foldfed.errors import StoreError

MEMBERS = frozenset({"org-a", "org-b"})
ROWS = (  # (table, text column, key column, key)
    ("state", "body", "id", 1),
    ("events", "event", "seq", 1),
    ("events", "effects", "seq", 2),
    ("events", "event", "seq", 3),
    ("steps", "record", "step", 0),
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BarrierStore, Path]]:
    path = tmp_path_factory.mktemp("barrier") / "barrier.sqlite"
    with BarrierStore(path) as s:
        s.apply(CycleStarted(1, MEMBERS, 0, digest_of(b"model 0"), 2, 100))
        for i, member in enumerate(sorted(MEMBERS)):
            s.apply(Delivered(0, member, digest_of(member.encode()), 200 + i))
        s.apply(Finalized(0, b"update 0", digest_of(b"model 1"), 300))
        s.verify()
        yield s, path


def _read_everything(s: BarrierStore) -> None:
    s.load()
    s.events()
    s.step_history()
    s.pending_effects()
    s.verify()


def _texts(path: Path) -> dict[tuple[str, str, str, int], str]:
    with sqlite3.connect(path) as db:
        return {
            row: db.execute(
                f"SELECT {row[1]} FROM {row[0]} WHERE {row[2]} = ?", (row[3],)
            ).fetchone()[0]
            for row in ROWS
        }


@st.composite
def damaged_rows(draw: st.DrawFn, valid: dict[tuple[str, str, str, int], str]) -> tuple:
    row = draw(st.sampled_from(ROWS))
    text = valid[row]
    if draw(st.booleans()):
        damaged = draw(json_mutated(json.loads(text)))
        return row, json.dumps(damaged)
    raw = draw(mutated(text.encode()))
    return row, raw.decode("utf-8", errors="replace")


@fuzz(250)
@given(data=st.data())
@example(data=None)
def test_a_damaged_record_is_read_or_a_store_error(
    data: st.DataObject | None, store: tuple[BarrierStore, Path]
) -> None:
    s, path = store
    valid = _texts(path)
    if data is None:  # regressions: JSON that does not parse or is nested too deep, a record
        # that is a list, effects that are not a list, a record type that is not a string
        cases = [(ROWS[0], "{not json"), (ROWS[1], "[1, 2]"), (ROWS[2], "{}")]
        cases += [(ROWS[1], '{"type": []}'), (ROWS[0], "[" * 100_000)]
    else:
        cases = [data.draw(damaged_rows(valid))]
    for (table, column, key, value), text in cases:
        with sqlite3.connect(path) as db:
            db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (text, value))
        try:
            expect_clean("barrier.store", lambda: _read_everything(s), (StoreError,))
        finally:
            with sqlite3.connect(path) as db:
                db.execute(
                    f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                    (valid[(table, column, key, value)], value),
                )
    s.verify()

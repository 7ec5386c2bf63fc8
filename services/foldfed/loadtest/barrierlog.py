"""What the barrier recorded, read from its SQLite store without writing anything: its
current state (cycle, phase, step, model digest) and each step's history (opened,
delivered, closed, released; hub clock). The load-test runner measures a run from it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from foldfed.loadtest.timeline import StepObs


def _barrier_db(hub_dir: Path) -> Path:
    return hub_dir / "barrier.sqlite3"


def barrier_state(hub_dir: Path) -> dict[str, object] | None:
    """The barrier's current state as stored (JSON), read without writing anything."""
    path = _barrier_db(hub_dir)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT body FROM state WHERE id = 1").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    body = json.loads(row[0])
    return body if isinstance(body, dict) else None


def step_history(hub_dir: Path) -> list[StepObs]:
    from foldfed.barrier.store import BarrierStore

    with BarrierStore(_barrier_db(hub_dir)) as store:
        records = store.step_history()
    return [
        StepObs(
            step=r.step,
            cycle=r.cycle,
            opened_ms=r.opened_ms,
            delivered_ms=r.delivered_ms,
            closed_ms=r.closed_ms,
            released_ms=r.released_ms,
        )
        for r in records
    ]

"""The barrier's durable state: it survives reopening, a crash between persisting and
publishing loses no effect, and a process killed with SIGKILL mid-write never leaves the
state and the event log disagreeing.

Run as a script (`python test_barrier_store.py DB SEED`), this file is the child process
the SIGKILL test kills: a simulated consortium applying events as fast as it can.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foldfed.barrier import (
    BarrierState,
    CycleDone,
    CycleStarted,
    Delivered,
    Event,
    Finalized,
    Ignored,
    ModelReported,
    Phase,
    Recover,
    Release,
    RequestFinalize,
    pending,
    replay,
    transition,
)
from foldfed.barrier.store import BarrierStore, LoggedEvent
from foldfed.errors import StoreError

MEMBERS = frozenset({"org-a", "org-b", "org-c"})
ORGS = ("org-a", "org-b", "org-c", "org-d", "org-e")


def digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def model(step: int) -> bytes:
    return digest(f"model for step {step}")


def deliver(step: int, participant: str, at_ms: int) -> Delivered:
    return Delivered(step, participant, digest(f"manifest {step} {participant}"), at_ms)


def finalize(step: int, at_ms: int) -> Finalized:
    return Finalized(step, f"update {step}".encode(), model(step + 1), at_ms)


def start(cycle: int = 1, first: int = 0, steps: int = 2, at_ms: int = 100) -> CycleStarted:
    return CycleStarted(cycle, MEMBERS, first, model(first), steps, at_ms)


def closing(step: int, at_ms: int) -> list[Event]:
    return [deliver(step, p, at_ms + i) for i, p in enumerate(sorted(MEMBERS))]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "barrier" / "barrier.sqlite3"


def apply_all(store: BarrierStore, events: list[Event]) -> None:
    for event in events:
        store.apply(event)


def assert_log_matches_state(store: BarrierStore) -> None:
    logged = store.events()
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1))  # append-only, no gap
    assert store.load() == replay(e.event for e in logged)
    store.verify()


# ------------------------------------------------------------------------------- basics


def test_a_new_store_is_empty(db: Path) -> None:
    with BarrierStore(db) as store:
        assert store.load() is None
        assert store.pending_effects() == ()
        assert store.events() == []
        assert store.step_history() == []
        store.verify()


def test_state_and_log_survive_reopening(db: Path) -> None:
    events: list[Event] = [start(), *closing(0, 200), finalize(0, 300), deliver(1, "org-b", 400)]
    with BarrierStore(db) as store:
        apply_all(store, events)
        before = store.load()
    with BarrierStore(db) as store:
        assert store.load() == before == replay(events)
        assert [e.event for e in store.events()] == events
        assert store.events(after_seq=4)[0] == LoggedEvent(
            5, finalize(0, 300), (Release(1, 1, model(1), MEMBERS, b"update 0"),)
        )
        assert_log_matches_state(store)


def test_apply_returns_the_effects_of_the_transition(db: Path) -> None:
    state = None
    with BarrierStore(db) as store:
        for event in [start(), *closing(0, 200), finalize(0, 300), *closing(1, 400)]:
            state, expected = transition(state, event)
            assert store.apply(event) == expected
            assert store.load() == state


def test_a_replayed_event_is_ignored_and_changes_nothing(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(), deliver(0, "org-a", 200)])
        state = store.load()
        for event in (start(), deliver(0, "org-a", 250)):
            (effect,) = store.apply(event)
            assert isinstance(effect, Ignored)
            assert store.load() == state
        # Ignored events are logged too: the log is the audit trail of what arrived.
        assert len(store.events()) == 4
        assert_log_matches_state(store)


def test_step_history_has_the_timeline_of_every_step(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(at_ms=100), *closing(0, 200), finalize(0, 300)])
        apply_all(store, [*closing(1, 400), finalize(1, 500)])
        apply_all(store, [start(cycle=2, first=2, steps=1, at_ms=600), deliver(2, "org-c", 700)])
        history = store.step_history()
    assert [(r.cycle, r.step) for r in history] == [(1, 0), (1, 1), (2, 2)]
    zero, one, two = history
    assert (zero.opened_ms, zero.closed_ms, zero.released_ms) == (100, 202, 300)
    assert zero.delivered_ms == {"org-a": 200, "org-b": 201, "org-c": 202}
    assert (zero.base_digest, zero.model_digest) == (model(0), model(1))
    assert (one.opened_ms, one.closed_ms, one.released_ms) == (300, 402, 500)
    assert one.model_digest == model(2)
    assert (two.opened_ms, two.closed_ms, two.released_ms) == (600, None, None)
    assert two.delivered_ms == {"org-c": 700}
    with BarrierStore(db) as store:
        assert [r.step for r in store.step_history(cycle=2)] == [2]


def test_flagged_mismatches_are_durable(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(), ModelReported(0, "org-a", digest("diverged"), 150)])
    with BarrierStore(db) as store:
        state = store.load()
        assert state is not None
        assert [(m.step, m.participant) for m in state.mismatches] == [(0, "org-a")]


# ------------------------------------------------------------------------------- crash recovery


def test_recover_re_issues_a_finalize_request_that_was_never_published(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(), deliver(0, "org-a", 200), deliver(0, "org-b", 201)])
        effects = store.apply(deliver(0, "org-c", 202))
        assert isinstance(effects[0], RequestFinalize)
        # Killed here: the transition is durable, the publish never happened.
    with BarrierStore(db) as store:
        assert store.pending_effects() == effects
        state = store.load()
        assert store.apply(Recover(at_ms=999)) == effects
        assert store.load() == state
        # The unacked delivery comes back from the broker: a no-op now.
        (ignored,) = store.apply(deliver(0, "org-c", 1_000))
        assert isinstance(ignored, Ignored)
        assert_log_matches_state(store)


def test_recover_re_issues_a_release_that_was_never_published(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(), *closing(0, 200)])
        effects = store.apply(finalize(0, 300))
        assert effects == (Release(1, 1, model(1), MEMBERS, b"update 0"),)
    with BarrierStore(db) as store:
        assert store.apply(Recover(at_ms=999)) == effects
        (ignored,) = store.apply(finalize(0, 1_000))
        assert isinstance(ignored, Ignored)
        assert_log_matches_state(store)


def test_recover_re_issues_cycle_done(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(steps=1), *closing(0, 200)])
        effects = store.apply(finalize(0, 300))
        assert isinstance(effects[0], CycleDone)
    with BarrierStore(db) as store:
        assert store.apply(Recover(at_ms=999)) == effects


def test_a_failed_transaction_leaves_nothing_behind(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BarrierStore(db) as store:
        store.apply(start())
        state, logged = store.load(), store.events()

        def crash(*args: object) -> None:
            raise RuntimeError("disk full")

        # The log row is already inserted when the state write fails: both roll back.
        monkeypatch.setattr(store, "_write_state", crash)
        with pytest.raises(RuntimeError):
            store.apply(deliver(0, "org-a", 200))
        monkeypatch.undo()
        assert (store.load(), store.events()) == (state, logged)


# ------------------------------------------------------------------------------- bad stores


def test_a_store_of_another_format_is_refused(db: Path) -> None:
    BarrierStore(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    with pytest.raises(StoreError, match="format 99"):
        BarrierStore(db)


def test_a_file_that_is_not_a_database_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database, just some bytes" * 100)
    with pytest.raises(StoreError, match="not a usable barrier store"):
        BarrierStore(db)


def test_a_damaged_state_is_an_error_not_a_guess(db: Path) -> None:
    with BarrierStore(db) as store:
        store.apply(start())
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE state SET body = json_set(body, '$.step', 'seven')")
    with BarrierStore(db) as store, pytest.raises(StoreError, match="BarrierState"):
        store.load()


def test_verify_catches_a_state_that_disagrees_with_the_log(db: Path) -> None:
    with BarrierStore(db) as store:
        apply_all(store, [start(), deliver(0, "org-a", 200)])
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE state SET body = json_set(body, '$.step', 5)")
    with BarrierStore(db) as store, pytest.raises(StoreError, match="disagrees"):
        store.verify()


# ------------------------------------------------------------------------------- SIGKILL


def next_event(rng: random.Random, state: BarrierState | None) -> Event:
    """What a consortium might send next, noise included."""
    now = time.time_ns() // 1_000_000
    if state is None or state.phase is Phase.DONE:
        cycle, first = (state.cycle + 1, state.step) if state else (1, 0)
        members = frozenset(rng.sample(ORGS, rng.randint(1, len(ORGS))))
        return CycleStarted(cycle, members, first, model(first), rng.randint(1, 3), now)
    if state.phase is Phase.FINALIZING:
        return finalize(state.step, now)
    member = rng.choice(sorted(state.participants))
    roll = rng.random()
    if roll < 0.6:
        return deliver(state.step, member, now)
    if roll < 0.7:
        return deliver(state.step, "org-late", now)
    if roll < 0.8:
        return deliver(state.step + rng.choice((-1, 1)), member, now)
    if roll < 0.9:
        reported = rng.choice((state.model_digest, digest("diverged")))
        return ModelReported(state.step, member, reported, now)
    return Recover(now)


def child_main(db: Path, seed: int) -> None:
    rng = random.Random(seed)
    with BarrierStore(db) as store:
        # A restart: re-issue what may not have gone out before the last kill.
        state = store.load()
        recovered = store.apply(Recover(at_ms=0))
        if state is not None and recovered != pending(state):
            sys.exit(f"recover re-issued {recovered}, not what was pending")
        while True:
            store.apply(next_event(rng, store.load()))
            print("applied", flush=True)


def run_and_kill(db: Path, seed: int, applies: int, rng: random.Random) -> None:
    child = subprocess.Popen(
        [sys.executable, __file__, str(db), str(seed)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for _ in range(applies):
        assert child.stdout.readline() == "applied\n", "the child stopped early"
    time.sleep(rng.uniform(0, 0.004))  # land anywhere inside the next transaction
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_mid_apply_never_leaves_state_and_log_disagreeing(db: Path) -> None:
    rng = random.Random(20240607)
    logged = 0
    for round_ in range(6):
        run_and_kill(db, seed=round_, applies=rng.randint(20, 120), rng=rng)
        with BarrierStore(db) as store:
            assert_log_matches_state(store)
            assert len(store.events()) > logged  # it made progress and kept all of it
            logged = len(store.events())
    with BarrierStore(db) as store:
        kinds = {type(e.event).__name__ for e in store.events()}
        history = store.step_history()
    assert kinds == {"CycleStarted", "Delivered", "Finalized", "ModelReported", "Recover"}
    assert sum(r.released_ms is not None for r in history) >= 5


if __name__ == "__main__":
    child_main(Path(sys.argv[1]), int(sys.argv[2]))


def test_the_cycles_terms_survive_reopening(db: Path) -> None:
    from dataclasses import replace as with_terms

    started = with_terms(start(), weights=(4096.0,) * len(MEMBERS), update_norm_bound=2.5)
    with BarrierStore(db) as store:
        apply_all(store, [started])
    with BarrierStore(db) as store:
        state = store.load()
        assert state is not None
        assert state.weights == (4096.0,) * len(MEMBERS) and state.update_norm_bound == 2.5
        (release,) = store.pending_effects() or (None,)
        assert release is None or release.weights == state.weights


def test_apply_and_load_returns_the_state_load_reads_next(db: Path) -> None:
    """The release path takes the state from the transition it just committed, with no
    second read; it must be exactly what a fresh read finds, a refused event included."""
    with BarrierStore(db) as store:
        events = [start(), *closing(0, 200), finalize(0, 300), *closing(1, 400), finalize(0, 500)]
        for event in events:
            effects, state = store.apply_and_load(event)
            assert state == store.load()
            assert effects == store.events()[-1].effects
        assert_log_matches_state(store)

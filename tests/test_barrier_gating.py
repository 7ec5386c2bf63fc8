"""Readiness gating decides a cycle's members: exactly those gated before the deadline,
at least the minimum (else the round extends), late joiners at the next boundary, and the
same decision after a restart (the store keeps the round and the records)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from foldfed.barrier.gating import (
    Decision,
    FailedCheck,
    GateRecord,
    GatingTerms,
    Round,
    Standing,
    decide,
    gate_record,
    gated,
    next_round,
    status,
)
from foldfed.barrier.machine import CycleStarted, Delivered, Finalized, Phase, Release, replay
from foldfed.barrier.store import BarrierStore
from foldfed.gate.checks import CheckResult, Result, Terms
from foldfed.gate.record import RecordRefused, readiness_statement, sign_record
from foldfed.signing import SigningKey

ROSTER = frozenset({"org-a", "org-b", "org-c"})
THETA0 = hashlib.sha256(b"theta0").digest()
OTHER = hashlib.sha256(b"another model").digest()
OPENED = 10_000
WINDOW = 1_000


def rnd(min_members: int = 2, cycle: int = 2) -> Round:
    return Round(cycle, THETA0, 7, ROSTER, min_members, OPENED, WINDOW)


def rec(
    who: str, at: int, ready: bool = True, theta0: bytes = THETA0, cycle: int = 2
) -> GateRecord:
    failed = () if ready else (FailedCheck("disk", "1 GiB free", "free some disk"),)
    return GateRecord(who, cycle, theta0, ready, failed, at, f"{who}-{at}-{ready}")


# ---------------------------------------------------------------------- decisions


def test_nothing_starts_before_the_deadline() -> None:
    records = [rec("org-a", OPENED + 10), rec("org-b", OPENED + 20)]
    assert decide(rnd(), records, OPENED + WINDOW - 1) is None
    assert decide(rnd(), records, OPENED + WINDOW) == Decision(
        2, frozenset({"org-a", "org-b"}), OPENED + WINDOW
    )


def test_exactly_the_members_gated_before_the_deadline_start() -> None:
    records = [
        rec("org-a", OPENED + 10),
        rec("org-b", OPENED + 20, ready=False),  # failed a check
        rec("org-c", OPENED + 30),
        rec("org-b", OPENED + WINDOW + 1),  # fixed it, but after the deadline: late
    ]
    decision = decide(rnd(), records, OPENED + 5 * WINDOW)
    assert decision == Decision(2, frozenset({"org-a", "org-c"}), OPENED + WINDOW)


def test_a_record_for_another_theta0_or_cycle_does_not_count() -> None:
    records = [
        rec("org-a", OPENED + 10),
        rec("org-b", OPENED + 20, theta0=OTHER),
        rec("org-c", OPENED + 30, cycle=1),
    ]
    assert gated(rnd(), records, OPENED + WINDOW) == {"org-a"}
    assert decide(rnd(min_members=1), records, OPENED + WINDOW).members == {"org-a"}  # type: ignore[union-attr]


def test_the_latest_record_decides_a_member_that_then_failed_is_out() -> None:
    records = [rec("org-a", OPENED + 10), rec("org-a", OPENED + 20, ready=False)]
    assert gated(rnd(), records, OPENED + WINDOW) == frozenset()


def test_too_few_at_the_deadline_extends_the_round_and_earlier_records_still_count() -> None:
    records = [rec("org-a", OPENED + 10), rec("org-b", OPENED + 3 * WINDOW + 5)]
    assert decide(rnd(), records, OPENED + 3 * WINDOW) is None
    # Due at the first deadline after org-b gated: d_4; both are in.
    assert decide(rnd(), records, OPENED + 4 * WINDOW - 1) is None
    assert decide(rnd(), records, OPENED + 10 * WINDOW) == Decision(
        2, frozenset({"org-a", "org-b"}), OPENED + 4 * WINDOW
    )


def test_the_decision_does_not_depend_on_when_the_barrier_looks() -> None:
    records = [rec("org-a", OPENED + 10), rec("org-b", OPENED + 20), rec("org-c", OPENED + 1500)]
    looks = [decide(rnd(), records, now) for now in (OPENED + WINDOW, OPENED + 10**9)]
    assert looks[0] == looks[1] == Decision(2, frozenset({"org-a", "org-b"}), OPENED + WINDOW)


def test_rounds_follow_the_cycles_late_joiners_enter_at_the_next_boundary() -> None:
    terms = GatingTerms(ROSTER, 2, WINDOW, first_cycle=1, first_step=1, first_theta0=THETA0)
    first = next_round(None, terms, now_ms=OPENED)
    assert first == Round(1, THETA0, 1, ROSTER, 2, OPENED, WINDOW)
    members = frozenset({"org-a", "org-b"})
    state = replay(
        [
            CycleStarted(1, members, 1, THETA0, steps=1, at_ms=OPENED + WINDOW),
            *[Delivered(1, p, b"m" + p.encode(), OPENED + 1500) for p in sorted(members)],
            Finalized(1, b"u1", OTHER, at_ms=OPENED + 2000),
        ]
    )
    assert state is not None and state.phase is Phase.DONE
    assert next_round(state, terms, now_ms=OPENED + 99_999) == Round(
        2, OTHER, 3, ROSTER, 2, OPENED + 2000, WINDOW
    )
    running = replay([CycleStarted(1, members, 1, THETA0, steps=1, at_ms=OPENED)])
    assert next_round(running, terms, OPENED) is None
    # org-c was late for cycle 1; gating for cycle 2 (its θ0 is cycle 1's final model).
    second = next_round(state, terms, now_ms=0)
    assert second is not None
    records = [
        rec("org-c", OPENED + 1200, cycle=1),  # late for cycle 1: names cycle 1, θ0 of 1
        rec("org-a", OPENED + 2100, theta0=OTHER),
        rec("org-c", OPENED + 2200, theta0=OTHER),
    ]
    decision = decide(second, records, OPENED + 2000 + WINDOW)
    assert decision == Decision(2, frozenset({"org-a", "org-c"}), OPENED + 2000 + WINDOW)


def test_a_round_cannot_ask_for_more_members_than_its_roster() -> None:
    with pytest.raises(ValueError, match="roster has 3"):
        Round(2, THETA0, 7, ROSTER, 4, OPENED, WINDOW)


# ---------------------------------------------------------------------- status


def test_status_names_who_is_gated_failed_pending_and_late() -> None:
    records = [rec("org-a", OPENED + 10), rec("org-b", OPENED + 20, ready=False)]
    open_view = {m.participant: m for m in status(rnd(), records, None, OPENED + 500)}
    assert open_view["org-a"].standing is Standing.GATED
    assert open_view["org-b"].standing is Standing.FAILED
    assert "disk: 1 GiB free (fix: free some disk)" in open_view["org-b"].detail
    assert open_view["org-c"].standing is Standing.PENDING

    records.append(rec("org-c", OPENED + 1500))
    decision = Decision(2, frozenset({"org-a"}), OPENED + WINDOW)
    after = {m.participant: m for m in status(rnd(1), records, decision, OPENED + 2000)}
    assert after["org-a"].standing is Standing.GATED
    assert after["org-b"].standing is Standing.FAILED
    assert after["org-c"].standing is Standing.LATE
    assert "cycle 3" in after["org-c"].detail


def test_status_says_when_a_ready_member_holds_another_theta0() -> None:
    (b,) = [
        m
        for m in status(rnd(), [rec("org-b", 1, theta0=OTHER)], None, 5)
        if m.participant == "org-b"
    ]
    assert b.standing is Standing.FAILED and b.detail.startswith("theta0:")


# ---------------------------------------------------------------------- records


def _signed(key: SigningKey, ready: bool, cycle: int = 2) -> dict[str, object]:
    result = Result.PASS if ready else Result.FAIL
    checks = [
        CheckResult("theta0", result, "θ0 ok" if ready else "wrong", "" if ready else "fetch")
    ]
    terms = Terms(cycle=cycle, theta0_digest=THETA0.hex(), schema_version="foldfed.data/1")
    statement = readiness_statement(key.name, terms, checks, THETA0.hex(), "2025-01-01T00:00:00")
    return sign_record(statement, key).to_json()


def test_a_signed_record_becomes_a_gate_record_with_the_theta0_it_holds() -> None:
    key = SigningKey.generate("org-a")
    record = gate_record(_signed(key, ready=False), [key.verify_key()], received_ms=42)
    assert (record.participant, record.cycle, record.ready, record.theta0) == (
        "org-a", 2, False, THETA0,
    )  # fmt: skip
    assert [c.name for c in record.failed] == ["theta0"] and record.failed[0].fix == "fetch"
    assert record.received_ms == 42


def test_a_record_signed_by_a_key_outside_the_keyring_is_refused() -> None:
    key, stranger = SigningKey.generate("org-a"), SigningKey.generate("org-a")
    with pytest.raises(RecordRefused, match="does not verify"):
        gate_record(_signed(stranger, ready=True), [key.verify_key()], received_ms=1)


# ---------------------------------------------------------------------- durability


def test_a_restarted_barrier_keeps_its_round_and_decides_the_same(tmp_path: Path) -> None:
    db = tmp_path / "barrier.sqlite3"
    records = [rec("org-a", OPENED + 10), rec("org-b", OPENED + 20), rec("org-c", OPENED + 1100)]
    with BarrierStore(db) as store:
        assert store.open_round(rnd()) == rnd()
        for r in records:
            assert store.add_readiness(r)
        assert not store.add_readiness(records[0])  # a redelivery is kept once
        first = decide(rnd(), store.readiness(2), OPENED + 5000)
    with BarrierStore(db) as store:
        # Other settings after the restart change nothing about the open round.
        later = Round(2, THETA0, 7, ROSTER, 1, OPENED + 777, WINDOW * 9)
        assert store.open_round(later) == rnd()
        assert store.latest_round() == (rnd(), None)
        again = decide(store.latest_round()[0], store.readiness(2), OPENED + 99_000)  # type: ignore[index]
        assert again == first == Decision(2, frozenset({"org-a", "org-b"}), OPENED + WINDOW)
        start = CycleStarted(2, again.members, 7, THETA0, steps=2, at_ms=OPENED + 5000)
        effects = store.start_gated(again, start)
        assert [type(e) for e in effects] == [Release]
        assert effects[0].participants == {"org-a", "org-b"}  # type: ignore[union-attr]
        assert "already decided" in store.start_gated(again, start)[0].reason  # type: ignore[union-attr]
    with BarrierStore(db) as store:
        assert store.latest_round() == (rnd(), again)
        state = store.load()
        assert state is not None and state.participants == {"org-a", "org-b"}
        store.verify()


# ---------------------------------------------------------------------- blind split


SPLIT = "5a" * 32


def test_the_barrier_admits_only_records_with_the_consortium_split_reference(
    tmp_path: Path,
) -> None:
    """A ready record with another blind-split reference hash (or none) is not gated when
    the round fixes one: the hub checks it again, whatever the site compared it with."""
    from dataclasses import replace

    checked = replace(rnd(), split_reference=SPLIT)
    records = [
        replace(rec("org-a", OPENED + 10), split_reference=SPLIT),
        replace(rec("org-b", OPENED + 20), split_reference="00" * 32),
        rec("org-c", OPENED + 30),  # reports none
    ]
    assert gated(checked, records, OPENED + WINDOW) == {"org-a"}
    assert gated(rnd(), records, OPENED + WINDOW) == ROSTER  # not checked without one
    by_name = {m.participant: m for m in status(checked, records, None, OPENED + 50)}
    assert by_name["org-a"].standing is Standing.GATED
    for who in ("org-b", "org-c"):
        assert by_name[who].standing is Standing.FAILED
        assert by_name[who].detail.startswith("split: reference hash")
        assert f"consortium's {SPLIT[:16]}" in by_name[who].detail
    with BarrierStore(tmp_path / "barrier.sqlite3") as store:  # both fields are kept
        assert store.open_round(checked) == checked
        store.add_readiness(records[0])
        assert store.readiness(2) == [records[0]]


def test_a_signed_record_brings_its_split_reference_to_the_barrier() -> None:
    key = SigningKey.generate("org-a")
    checks = [CheckResult("split", Result.PASS, "the consortium's")]
    terms = Terms(cycle=2, theta0_digest=THETA0.hex(), schema_version="foldfed.data/1")
    statement = readiness_statement(
        key.name, terms, checks, THETA0.hex(), "now", split={"reference_hash": SPLIT}
    )
    document = sign_record(statement, key).to_json()
    assert gate_record(document, [key.verify_key()], 1).split_reference == SPLIT
    assert gate_record(_signed(key, ready=True), [key.verify_key()], 1).split_reference == ""

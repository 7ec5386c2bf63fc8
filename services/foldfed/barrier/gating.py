"""Readiness gating: which members the next cycle starts with, and when.

A **round** gates one coming cycle n. It opens when the barrier has no running cycle: on
the first start (nothing ran yet) or when cycle n-1 is done. It fixes, once, everything
the decision depends on: n, the θ0 the cycle starts from (θ0 of the first cycle, else the
final model of n-1), the step it starts at, the roster (the consortium members who may
gate: they have a broker user and a queue), the minimum number of members, the time it
opened and the window W.

A roster member is **gated** at time d when its latest record received by d is for cycle
n, signed (checked before it gets here: `gate_record`), ready, and names the round's θ0
and, when the consortium fixed one (FOLDFED_SPLIT_REFERENCE_HASH), its blind-split
reference hash (of3/data/split_standard.py): the hub checks what the participant's own
`split` check checked, so a site that gated against a wrong expected hash is not admitted.
Its latest record decides: a member that gated and then sent a failing record is not
gated. The deadlines are d_k = opened + k·W (k = 1, 2, ...). Cycle n starts at the first
deadline at which at least `min_members` are gated, with exactly the members gated by that
deadline. So with too few gated at d_1 the round extends by W, and every record kept so
far still counts. A record received after the deadline that decided is **late**: the cycle
has started without it, and its sender joins at the next boundary by gating for cycle
n+1, whose θ0 (n's final model) its record for n could not name.

Determinism: the decision is a pure function of the round and the records with their
receipt times, never of when the barrier happens to look, so a barrier restarted after the
deadline decides the same (`decide`). Only candidate deadlines are evaluated: the gated
set changes only when a record arrives, so d_1 and the first deadline after each arrival
are all there is to look at.

No I/O here: records arrive as parsed JSON and keys (the store and the service do the rest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from foldfed.barrier.machine import BarrierState, Phase
from foldfed.digests import digest_of
from foldfed.dsse import envelope_from_json
from foldfed.gate.record import Readiness, RecordRefused, verify_record
from foldfed.signing import VerifyKey


@dataclass(frozen=True)
class FailedCheck:
    name: str
    value: str
    fix: str


@dataclass(frozen=True)
class GateRecord:
    """A verified readiness record, as the barrier received it."""

    participant: str
    cycle: int
    theta0: bytes  # the θ0 the participant holds (the record's subject)
    ready: bool
    failed: tuple[FailedCheck, ...]
    received_ms: int
    digest: str  # blake3 of the record's signed payload: one row per record
    split_reference: str = ""  # the blind-split reference hash it reports ("" none)

    def __post_init__(self) -> None:
        if self.ready and self.failed:
            raise ValueError("a ready record has no failed check")


@dataclass(frozen=True)
class Round:
    """The gating of cycle `cycle` (module docstring)."""

    cycle: int
    theta0: bytes
    first_step: int
    roster: frozenset[str]
    min_members: int
    opened_ms: int
    window_ms: int
    split_reference: str = ""  # the consortium's blind-split reference hash ("" unchecked)

    def __post_init__(self) -> None:
        if self.window_ms < 1 or self.min_members < 1:
            raise ValueError("a round needs a window of at least 1 ms and a minimum of 1")
        if self.min_members > len(self.roster):
            raise ValueError(
                f"a minimum of {self.min_members} members, but the roster has {len(self.roster)}"
            )

    def deadline(self, k: int) -> int:
        return self.opened_ms + k * self.window_ms

    def next_deadline(self, now_ms: int) -> int:
        """The first deadline after `now_ms` (d_1 before it)."""
        return self.deadline(max(1, (now_ms - self.opened_ms) // self.window_ms + 1))


@dataclass(frozen=True)
class Decision:
    """Cycle `cycle` starts with `members`, decided at `deadline_ms`."""

    cycle: int
    members: frozenset[str]
    deadline_ms: int


@dataclass(frozen=True)
class GatingTerms:
    """What every round takes from the consortium's settings, and the first cycle's terms
    (its number, first step and θ0: those of FOLDFED_CYCLE, FOLDFED_FIRST_STEP and
    FOLDFED_INITIAL_MODEL)."""

    roster: frozenset[str]
    min_members: int
    window_ms: int
    first_cycle: int
    first_step: int
    first_theta0: bytes
    split_reference: str = ""


def next_round(state: BarrierState | None, terms: GatingTerms, now_ms: int) -> Round | None:
    """The round to open now: the first cycle's before any ran, the next one's once the
    last is done (opened when its final update was released, from the stored state, so a
    restart computes the same), none while a cycle runs."""
    t = terms
    if state is None:
        return Round(
            t.first_cycle, t.first_theta0, t.first_step, t.roster, t.min_members, now_ms,
            t.window_ms, t.split_reference,
        )  # fmt: skip
    if state.phase is not Phase.DONE:
        return None
    ended = state.current.released_ms
    opened = ended if ended is not None else now_ms
    # The final release went out as step state.step: the next cycle starts after it.
    return Round(
        state.cycle + 1, state.model_digest, state.step + 1, t.roster, t.min_members, opened,
        t.window_ms, t.split_reference,
    )  # fmt: skip


class Standing(StrEnum):
    GATED = "gated"  # counted (or, once decided: a member of the cycle)
    FAILED = "failed"  # its latest record failed a check, or names another θ0
    PENDING = "pending"  # no record for this cycle yet
    LATE = "late"  # ready, but received after the deadline that decided


@dataclass(frozen=True)
class MemberStatus:
    participant: str
    standing: Standing
    detail: str  # the failing check and its fix, or when the record came


# ---------------------------------------------------------------------- records


def gate_record(document: Any, keys: Iterable[VerifyKey], received_ms: int) -> GateRecord:
    """The readiness record in `document` (an envelope's JSON), verified against the
    consortium's `keys`; RecordRefused (with the reason) when it is not a valid one."""
    readiness = verify_record(document, keys)
    payload = envelope_from_json(document)
    statement = payload.payload_json()
    return GateRecord(
        participant=readiness.participant,
        cycle=readiness.cycle,
        theta0=_held_theta0(statement),
        ready=readiness.ready,
        failed=_failed(readiness),
        received_ms=received_ms,
        digest=digest_of(payload.payload).hex(),
        split_reference=_split_reference(statement),
    )


def _split_reference(statement: dict[str, Any]) -> str:
    split = statement.get("predicate", {}).get("split")
    value = split.get("reference_hash") if isinstance(split, dict) else None
    return value if isinstance(value, str) else ""


def _held_theta0(statement: dict[str, Any]) -> bytes:
    # verify_record checked the predicate; the subject is the θ0 the participant holds.
    try:
        text = statement["subject"][0]["digest"]["blake3"]
        return bytes.fromhex(text)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RecordRefused(f"the record's subject names no θ0 blake3 ({exc})") from exc


def _failed(readiness: Readiness) -> tuple[FailedCheck, ...]:
    return tuple(
        FailedCheck(str(c.get("name", "")), str(c.get("value", "")), str(c.get("fix", "")))
        for c in readiness.checks
        if c.get("name") in readiness.failed_checks()
    )


# ---------------------------------------------------------------------- decisions


def latest_by(rnd: Round, records: Sequence[GateRecord], at_ms: int) -> dict[str, GateRecord]:
    """Each roster member's latest record for the round's cycle received by `at_ms`."""
    latest: dict[str, GateRecord] = {}
    for record in records:  # in arrival order: a later row wins a tie in time
        if record.participant not in rnd.roster or record.cycle != rnd.cycle:
            continue
        if record.received_ms > at_ms:
            continue
        known = latest.get(record.participant)
        if known is None or known.received_ms <= record.received_ms:
            latest[record.participant] = record
    return latest


def counts(rnd: Round, record: GateRecord) -> bool:
    return record.ready and record.theta0 == rnd.theta0 and _same_split(rnd, record)


def _same_split(rnd: Round, record: GateRecord) -> bool:
    return not rnd.split_reference or record.split_reference == rnd.split_reference


def gated(rnd: Round, records: Sequence[GateRecord], at_ms: int) -> frozenset[str]:
    """The members gated at `at_ms` (module docstring)."""
    return frozenset(p for p, r in latest_by(rnd, records, at_ms).items() if counts(rnd, r))


def decide(rnd: Round, records: Sequence[GateRecord], now_ms: int) -> Decision | None:
    """The cycle start due by `now_ms`, or None while no deadline passed with enough."""
    for deadline in _candidate_deadlines(rnd, records):
        if deadline > now_ms:
            return None
        members = gated(rnd, records, deadline)
        if len(members) >= rnd.min_members:
            return Decision(rnd.cycle, members, deadline)
    return None


def _candidate_deadlines(rnd: Round, records: Sequence[GateRecord]) -> list[int]:
    ks = {1}
    for record in records:
        if record.received_ms > rnd.opened_ms:
            ks.add(max(1, math.ceil((record.received_ms - rnd.opened_ms) / rnd.window_ms)))
    return [rnd.deadline(k) for k in sorted(ks)]


# ---------------------------------------------------------------------- status


def status(
    rnd: Round, records: Sequence[GateRecord], decision: Decision | None, now_ms: int
) -> tuple[MemberStatus, ...]:
    """Each roster member's standing for the round's cycle, in name order, from its latest
    record: while the round is open, gated, failed or pending; once it has decided, the
    members are gated and everyone else says why not (late, failed or pending)."""
    cut = now_ms if decision is None else max(now_ms, decision.deadline_ms)
    latest = latest_by(rnd, records, cut)
    return tuple(_standing(rnd, p, latest.get(p), decision) for p in sorted(rnd.roster))


def _standing(
    rnd: Round, participant: str, record: GateRecord | None, decision: Decision | None
) -> MemberStatus:
    if decision is not None and participant in decision.members:
        return MemberStatus(participant, Standing.GATED, f"member of cycle {rnd.cycle}")
    if record is None:
        return MemberStatus(participant, Standing.PENDING, f"no record for cycle {rnd.cycle}")
    if not record.ready:
        return MemberStatus(participant, Standing.FAILED, _failures(record.failed))
    if record.theta0 != rnd.theta0:
        return MemberStatus(
            participant,
            Standing.FAILED,
            f"theta0: holds {record.theta0.hex()[:16]}..., the cycle starts from "
            f"{rnd.theta0.hex()[:16]}... (fix: fetch the cycle's θ0 and gate again)",
        )
    if not _same_split(rnd, record):
        held = record.split_reference[:16] + "..." if record.split_reference else "none"
        return MemberStatus(
            participant,
            Standing.FAILED,
            f"split: reference hash {held} is not the consortium's "
            f"{rnd.split_reference[:16]}... (fix: split the data with the consortium's "
            "configuration and key, run `foldfed gate check --consortium` and gate again)",
        )
    if decision is not None:  # ready, yet not a member: it came after the deadline
        return MemberStatus(
            participant,
            Standing.LATE,
            f"ready after the deadline; gate for cycle {rnd.cycle + 1} to join at the "
            "next boundary",
        )
    return MemberStatus(participant, Standing.GATED, "ready")


def _failures(failed: Sequence[FailedCheck]) -> str:
    return "; ".join(f"{c.name}: {c.value} (fix: {c.fix})" for c in failed) or "not ready"

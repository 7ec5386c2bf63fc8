"""The barrier's pure core: `transition(state, event) -> (state, effects)`.

One cycle is a fixed set of participants running `steps` global steps. Per step:

    COLLECTING(t)  step t is released; waiting until every participant delivered
        │ the last participant delivers           → RequestFinalize(t)
        ▼
    FINALIZING(t)  waiting for the aggregator's global update of step t
        │ Finalized(t)                            → Release(t+1)   (or CycleDone after the last)
        ▼
    COLLECTING(t+1) … DONE

Rules the service relies on:
- Every handler is idempotent. A repeated event (RabbitMQ redelivers) and an event that
  does not apply (another step, a non-member, a stale cycle) yield `Ignored(reason)` and
  leave the state unchanged, so the store can replay its log through `transition` and get
  the same state.
- `RequestFinalize(t)` and `Release(t+1)` are emitted once, on the transition that makes
  them due. `Recover` re-emits whatever is still pending (`pending(state)`): after a crash
  between persisting a transition and publishing its effects the shell cannot know which
  went out, and both receivers are idempotent.
- A cycle's participant set never changes: a site that becomes ready mid-cycle (a late
  joiner) never counts until a later cycle lists it.
- Global step numbers never repeat: a cycle starts at or after the step where the last one
  ended, so records keyed by step stay unique across cycles.

Time comes in through the events (`at_ms`), never from a clock: the machine records when
each step opened, who delivered when, when it closed and when its update was released.

No I/O here: no asyncio, sqlite3, broker or wire code (a test checks the imports).

One concept, the barrier's state machine, in one module of over 400 lines: its events,
state, effects and transitions are read together (each transition names the events it
takes and the effects it emits); persistence is barrier/store.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

# How many recent releases a participant's model report is checked against. Reports come
# right after a release, so a few steps is plenty; the bound keeps the state small over a
# month-long cycle of thousands of steps.
REPORT_WINDOW = 8


class Phase(StrEnum):
    COLLECTING = "collecting"
    FINALIZING = "finalizing"
    DONE = "done"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class CycleStarted:
    """Start `cycle`: release `first_step` from `initial_model_digest`; end after `steps`."""

    cycle: int
    participants: frozenset[str]
    first_step: int
    initial_model_digest: bytes
    steps: int
    at_ms: int
    # The cycle's uplink codec spec and seed, announced with every release of the cycle.
    codec: str = "fp32:v1"
    codec_seed: int = 0
    codec_choices: tuple[str, ...] = ()  # per-member specs members may send instead
    # Each member's agreed weight, in sorted-member order (() = none fixed), and the L2
    # bound on each delta (0 = none): terms of the cycle, fixed when it starts and stored
    # with it, so a restarted barrier announces the same ones whatever its settings say.
    weights: tuple[float, ...] = ()
    update_norm_bound: float = 0.0

    def __post_init__(self) -> None:
        _require(self.cycle >= 0 and self.first_step >= 0, "cycle and first_step must be >= 0")
        _require(self.steps >= 1, f"a cycle runs at least one step, got steps={self.steps}")
        _require(bool(self.participants), "a cycle needs at least one participant")
        _require(
            not self.weights or len(self.weights) == len(self.participants),
            f"{len(self.weights)} weights for {len(self.participants)} participants",
        )
        _require(
            all(math.isfinite(w) and w > 0 for w in self.weights)
            and math.isfinite(self.update_norm_bound) and self.update_norm_bound >= 0,
            "weights must be finite and > 0, the norm bound finite and >= 0",
        )  # fmt: skip
        _require(all(self.participants), "participant names must not be empty")


@dataclass(frozen=True)
class Delivered:
    """The aggregator applied every chunk of `participant`'s delta for `step`."""

    step: int
    participant: str
    manifest_id: bytes
    at_ms: int


@dataclass(frozen=True)
class Finalized:
    """The aggregator turned step `step`'s sum into a global update and a new model."""

    step: int
    update_manifest: bytes
    model_digest: bytes
    at_ms: int


@dataclass(frozen=True)
class ModelReported:
    """`participant` holds the model with `model_digest` after applying release `step`."""

    step: int
    participant: str
    model_digest: bytes
    at_ms: int


@dataclass(frozen=True)
class Recover:
    """The service restarted: re-issue whatever effect may not have gone out."""

    at_ms: int


Event = CycleStarted | Delivered | Finalized | ModelReported | Recover


# ------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Delivery:
    participant: str
    manifest_id: bytes
    at_ms: int


@dataclass(frozen=True)
class StepRecord:
    """The timeline of one global step, for the monitor.

    `base_digest` is the model the step trained from, released at `opened_ms`;
    `model_digest` is the model its global update produced, released at `released_ms`.
    """

    cycle: int
    step: int
    base_digest: bytes
    opened_ms: int
    deliveries: tuple[Delivery, ...] = ()  # sorted by participant
    closed_ms: int | None = None  # the last participant delivered
    released_ms: int | None = None
    model_digest: bytes | None = None

    @property
    def delivered(self) -> frozenset[str]:
        return frozenset(d.participant for d in self.deliveries)

    @property
    def delivered_ms(self) -> dict[str, int]:
        return {d.participant: d.at_ms for d in self.deliveries}

    def delivery_of(self, participant: str) -> Delivery | None:
        return next((d for d in self.deliveries if d.participant == participant), None)


@dataclass(frozen=True)
class Report:
    participant: str
    model_digest: bytes


@dataclass(frozen=True)
class ReleasedModel:
    """A model the barrier released for `step`, and what participants reported holding."""

    step: int
    model_digest: bytes
    reports: tuple[Report, ...] = ()


@dataclass(frozen=True)
class BarrierState:
    cycle: int
    participants: frozenset[str]  # fixed for the whole cycle
    first_step: int
    steps_total: int
    phase: Phase
    # The open step; in DONE the step after the last one (the step the final model is for).
    step: int
    model_digest: bytes  # the model released for `step`
    update_manifest: bytes  # the global update that produced it (empty at a cycle's start)
    # The records that can still change: the last released step (if any) and the open one.
    # Older records are final and live only in the store's history.
    recent_steps: tuple[StepRecord, ...]
    released: tuple[ReleasedModel, ...]  # the last REPORT_WINDOW releases
    mismatches: tuple[FlagMismatch, ...]
    codec: str = "fp32:v1"  # the cycle's uplink codec spec
    codec_seed: int = 0
    codec_choices: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    update_norm_bound: float = 0.0

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps_total - 1

    @property
    def current(self) -> StepRecord:
        """The open step's record (in DONE: the cycle's last step)."""
        return self.recent_steps[-1]

    @property
    def delivered(self) -> frozenset[str]:
        return self.current.delivered


# ------------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class RequestFinalize:
    cycle: int
    step: int
    participants: frozenset[str]
    deliveries: tuple[Delivery, ...]  # which manifest of each participant the sum holds


@dataclass(frozen=True)
class Release:
    cycle: int
    step: int
    model_digest: bytes
    participants: frozenset[str]
    update_manifest: bytes  # empty for a cycle's first step: no update to apply
    codec: str = "fp32:v1"
    codec_seed: int = 0
    codec_choices: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    update_norm_bound: float = 0.0


@dataclass(frozen=True)
class FlagMismatch:
    """Loud: a participant holds a model other than the one released."""

    step: int
    participant: str
    reported: bytes
    expected: bytes


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class CycleDone:
    """The cycle's last update is final. Carries the update, since no further step is
    released that would carry it: participants apply it to hold the final model."""

    cycle: int
    step: int
    final_model_digest: bytes
    participants: frozenset[str]
    update_manifest: bytes
    codec: str = "fp32:v1"
    codec_seed: int = 0
    codec_choices: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    update_norm_bound: float = 0.0


Effect = RequestFinalize | Release | FlagMismatch | Ignored | CycleDone
Effects = tuple[Effect, ...]


# ------------------------------------------------------------------------------- transitions


def transition(state: BarrierState | None, event: Event) -> tuple[BarrierState | None, Effects]:
    """The one way the barrier changes. `state` is None before the first cycle."""
    if isinstance(event, CycleStarted):
        return _on_cycle_started(state, event)
    if isinstance(event, Recover):
        return state, pending(state) or (Ignored("nothing to recover: no cycle started"),)
    if state is None:
        return None, (Ignored(f"{type(event).__name__} before any cycle started"),)
    if isinstance(event, Delivered):
        return _on_delivered(state, event)
    if isinstance(event, Finalized):
        return _on_finalized(state, event)
    return _on_model_reported(state, event)


def replay(events: Iterable[Event]) -> BarrierState | None:
    """The state a sequence of events leads to from scratch."""
    state: BarrierState | None = None
    for event in events:
        state, _ = transition(state, event)
    return state


def pending(state: BarrierState | None) -> Effects:
    """The effect the state is waiting on, which may not have been published yet."""
    if state is None:
        return ()
    if state.phase is Phase.COLLECTING:
        return (_release(state),)
    if state.phase is Phase.FINALIZING:
        return (_request_finalize(state),)
    return (_cycle_done(state),)


def _release(s: BarrierState) -> Release:
    return Release(
        s.cycle, s.step, s.model_digest, s.participants, s.update_manifest,
        s.codec, s.codec_seed, s.codec_choices, s.weights, s.update_norm_bound,
    )  # fmt: skip


def _request_finalize(s: BarrierState) -> RequestFinalize:
    return RequestFinalize(s.cycle, s.step, s.participants, s.current.deliveries)


def _cycle_done(s: BarrierState) -> CycleDone:
    return CycleDone(
        s.cycle, s.step, s.model_digest, s.participants, s.update_manifest,
        s.codec, s.codec_seed, s.codec_choices, s.weights, s.update_norm_bound,
    )  # fmt: skip


def _ignore(state: BarrierState | None, reason: str) -> tuple[BarrierState | None, Effects]:
    return state, (Ignored(reason),)


# -- CycleStarted


def _on_cycle_started(
    s: BarrierState | None, e: CycleStarted
) -> tuple[BarrierState | None, Effects]:
    problem = _start_problem(s, e)
    if problem:
        return _ignore(s, problem)
    opened = StepRecord(e.cycle, e.first_step, e.initial_model_digest, e.at_ms)
    new = BarrierState(
        cycle=e.cycle,
        participants=e.participants,
        first_step=e.first_step,
        steps_total=e.steps,
        phase=Phase.COLLECTING,
        step=e.first_step,
        model_digest=e.initial_model_digest,
        update_manifest=b"",
        recent_steps=(opened,),
        released=(ReleasedModel(e.first_step, e.initial_model_digest),),
        mismatches=(),
        codec=e.codec,
        codec_seed=e.codec_seed,
        codec_choices=e.codec_choices,
        weights=e.weights,
        update_norm_bound=e.update_norm_bound,
    )
    return new, (_release(new),)


def _start_problem(s: BarrierState | None, e: CycleStarted) -> str | None:
    if s is None:
        return None
    if e.cycle == s.cycle:
        same = (e.participants, e.first_step, e.steps) == (
            s.participants,
            s.first_step,
            s.steps_total,
        )
        return f"{'duplicate' if same else 'conflicting'} start of cycle {e.cycle}"
    if e.cycle < s.cycle:
        return f"stale start of cycle {e.cycle}: cycle {s.cycle} already started"
    if s.phase is not Phase.DONE:
        return f"cycle {s.cycle} is still running (step {s.step} {s.phase})"
    if e.first_step < s.step:
        # Steps key the history and the aggregator's store: a reused number would mix
        # two different steps' deltas.
        return f"cycle {e.cycle} would reuse step {e.first_step}: steps continue at {s.step}"
    return None


# -- Delivered


def _on_delivered(s: BarrierState, e: Delivered) -> tuple[BarrierState | None, Effects]:
    problem = _delivery_problem(s, e)
    if problem:
        return _ignore(s, problem)
    delivery = Delivery(e.participant, e.manifest_id, e.at_ms)
    deliveries = tuple(sorted((*s.current.deliveries, delivery), key=lambda d: d.participant))
    record = replace(s.current, deliveries=deliveries)
    if record.delivered != s.participants:
        return _with_current(s, record), ()
    closed = _with_current(s, replace(record, closed_ms=e.at_ms))
    closed = replace(closed, phase=Phase.FINALIZING)
    return closed, (_request_finalize(closed),)


def _delivery_problem(s: BarrierState, e: Delivered) -> str | None:
    if e.participant not in s.participants:
        return f"{e.participant!r} is not a participant of cycle {s.cycle}"
    if s.phase is Phase.DONE:
        return f"cycle {s.cycle} is done; delivery for step {e.step} comes too late"
    if e.step != s.step:
        when = "closed" if e.step < s.step else "not open yet"
        return f"step {e.step} is {when}: step {s.step} is open"
    prior = s.current.delivery_of(e.participant)
    if prior is None:
        return None
    if prior.manifest_id != e.manifest_id:
        return (
            f"conflicting delivery from {e.participant!r} for step {e.step}: manifest "
            f"{prior.manifest_id.hex()[:12]} already counts, got {e.manifest_id.hex()[:12]}"
        )
    return f"duplicate delivery from {e.participant!r} for step {e.step}"


def _with_current(s: BarrierState, record: StepRecord) -> BarrierState:
    return replace(s, recent_steps=(*s.recent_steps[:-1], record))


# -- Finalized


def _on_finalized(s: BarrierState, e: Finalized) -> tuple[BarrierState | None, Effects]:
    problem = _finalize_problem(s, e)
    if problem:
        return _ignore(s, problem)
    finished = replace(s.current, released_ms=e.at_ms, model_digest=e.model_digest)
    next_step = s.step + 1
    released = (*s.released, ReleasedModel(next_step, e.model_digest))[-REPORT_WINDOW:]
    new = replace(
        s,
        step=next_step,
        model_digest=e.model_digest,
        update_manifest=e.update_manifest,
        released=released,
    )
    if next_step > s.last_step:
        done = replace(new, phase=Phase.DONE, recent_steps=(finished,))
        return done, (_cycle_done(done),)
    opened = StepRecord(s.cycle, next_step, e.model_digest, e.at_ms)
    new = replace(new, phase=Phase.COLLECTING, recent_steps=(finished, opened))
    return new, (_release(new),)


def _finalize_problem(s: BarrierState, e: Finalized) -> str | None:
    if s.phase is Phase.FINALIZING and e.step == s.step:
        return None
    done = next((r for r in s.recent_steps if r.step == e.step and r.released_ms is not None), None)
    if done is not None and done.model_digest != e.model_digest:
        # The aggregator is exact and deterministic: two different results for one step
        # mean a bug or a forgery, never a benign retry.
        return f"conflicting finalize of step {e.step}: it was released with another model"
    if done is not None or e.step < s.step:
        return f"duplicate finalize: step {e.step} was already released"
    if e.step == s.step and s.phase is Phase.COLLECTING:
        missing = sorted(s.participants - s.delivered)
        return f"finalize of step {e.step} before every participant delivered (missing {missing})"
    return f"no finalize was requested for step {e.step} (step {s.step} is {s.phase})"


# -- ModelReported


def _on_model_reported(s: BarrierState, e: ModelReported) -> tuple[BarrierState | None, Effects]:
    if e.participant not in s.participants:
        return _ignore(s, f"{e.participant!r} is not a participant of cycle {s.cycle}")
    expected = next((r for r in s.released if r.step == e.step), None)
    if expected is None:
        steps = [r.step for r in s.released]
        return _ignore(s, f"no release of step {e.step} to check against (recent: {steps})")
    report = Report(e.participant, e.model_digest)
    if report in expected.reports:
        return _ignore(s, f"duplicate model report from {e.participant!r} for step {e.step}")
    checked = replace(expected, reports=(*expected.reports, report))
    s = replace(s, released=tuple(checked if r is expected else r for r in s.released))
    if e.model_digest == expected.model_digest:
        return s, ()
    flag = FlagMismatch(e.step, e.participant, e.model_digest, expected.model_digest)
    return replace(s, mismatches=(*s.mismatches, flag)), (flag,)

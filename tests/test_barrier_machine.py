"""The barrier's pure state machine: every rule on its own, then any interleaving of
deliveries, duplicates and noise that RabbitMQ and a real consortium can produce."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from typing import NamedTuple, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.barrier import (
    REPORT_WINDOW,
    BarrierState,
    CycleDone,
    CycleStarted,
    Delivered,
    Delivery,
    Effect,
    Effects,
    Event,
    Finalized,
    FlagMismatch,
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

MEMBERS = frozenset({"org-a", "org-b", "org-c"})
LATE_JOINER = "org-late"
FIRST = 10
E = TypeVar("E", bound=Effect)


def digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def model(step: int) -> bytes:
    """The model released for `step` in these tests (step FIRST: the checkpoint)."""
    return digest(f"model for step {step}")


def manifest(step: int, participant: str) -> bytes:
    return digest(f"manifest {step} {participant}")


def update(step: int) -> bytes:
    return f"update manifest of step {step}".encode()


def start(
    steps: int = 3, cycle: int = 1, first: int = FIRST, members: frozenset[str] = MEMBERS
) -> CycleStarted:
    return CycleStarted(cycle, members, first, model(first), steps, at_ms=1_000)


def deliver(step: int, participant: str, at_ms: int = 2_000) -> Delivered:
    return Delivered(step, participant, manifest(step, participant), at_ms)


def finalize(step: int, at_ms: int = 5_000) -> Finalized:
    return Finalized(step, update(step), model(step + 1), at_ms)


def run(events: Iterable[Event], state: BarrierState | None = None) -> tuple[BarrierState, Effects]:
    """Apply `events`; return the final state and the effects of the last event."""
    effects: Effects = ()
    for event in events:
        state, effects = transition(state, event)
    assert state is not None
    return state, effects


def closing(step: int, members: Iterable[str] = sorted(MEMBERS)) -> list[Event]:
    """Every member delivers `step`, one millisecond apart."""
    return [deliver(step, p, at_ms=2_000 + i) for i, p in enumerate(members)]


def through_step(step: int) -> list[Event]:
    """Start and complete steps FIRST..step (inclusive) of a 3-step cycle."""
    events: list[Event] = [start()]
    for t in range(FIRST, step + 1):
        events += [*closing(t), finalize(t)]
    return events


def assert_ignored(
    state: BarrierState | None, event: Event, *reason_words: str
) -> BarrierState | None:
    after, effects = transition(state, event)
    assert after == state
    assert len(effects) == 1 and isinstance(effects[0], Ignored), effects
    for word in reason_words:
        assert word in effects[0].reason, effects[0].reason
    return after


# ------------------------------------------------------------------------------- cycle start


def test_a_cycle_start_releases_its_first_step_from_the_initial_model() -> None:
    state, effects = transition(None, start())
    assert effects == (Release(1, FIRST, model(FIRST), MEMBERS, b""),)
    assert state is not None
    assert (state.phase, state.step, state.model_digest) == (Phase.COLLECTING, FIRST, model(FIRST))
    assert state.current.opened_ms == 1_000 and state.current.base_digest == model(FIRST)


def test_events_before_any_cycle_are_ignored() -> None:
    for event in (deliver(FIRST, "org-a"), finalize(FIRST), ModelReported(1, "org-a", b"", 0)):
        assert_ignored(None, event, "before any cycle")
    assert_ignored(None, Recover(at_ms=0), "nothing to recover")


def test_a_cycle_needs_participants_and_steps() -> None:
    with pytest.raises(ValueError, match="participant"):
        CycleStarted(1, frozenset(), 0, b"", 1, at_ms=0)
    with pytest.raises(ValueError, match="empty"):
        CycleStarted(1, frozenset({""}), 0, b"", 1, at_ms=0)
    with pytest.raises(ValueError, match="at least one step"):
        CycleStarted(1, MEMBERS, 0, b"", 0, at_ms=0)


def test_a_repeated_or_conflicting_start_does_not_restart_the_cycle() -> None:
    state, _ = run([start(), deliver(FIRST, "org-a")])
    assert_ignored(state, start(), "duplicate start of cycle 1")
    assert_ignored(state, start(steps=9), "conflicting start of cycle 1")
    assert_ignored(state, start(cycle=2), "cycle 1 is still running")
    assert_ignored(state, start(cycle=0), "stale")


def test_the_next_cycle_continues_the_step_numbers_with_its_own_participants() -> None:
    done, _ = run(through_step(FIRST + 2))
    assert done.phase is Phase.DONE and done.step == FIRST + 3
    joined = MEMBERS | {LATE_JOINER}
    assert_ignored(done, start(cycle=2, first=FIRST + 2, members=joined), "reuse step")
    state, effects = transition(done, start(cycle=2, first=FIRST + 3, members=joined))
    assert effects == (Release(2, FIRST + 3, model(FIRST + 3), joined, b""),)
    # The late joiner counts from this cycle on: nobody closes the step without it.
    state, effects = run(closing(FIRST + 3), state)
    assert effects == () and state.phase is Phase.COLLECTING
    state, effects = transition(state, deliver(FIRST + 3, LATE_JOINER))
    assert isinstance(effects[0], RequestFinalize) and effects[0].participants == joined


# ------------------------------------------------------------------------------- deliveries


def test_the_last_delivery_closes_the_step_and_requests_finalize_once() -> None:
    state, _ = transition(None, start())
    for i, participant in enumerate(sorted(MEMBERS)[:-1]):
        state, effects = transition(state, deliver(FIRST, participant, at_ms=2_000 + i))
        assert effects == ()
    assert state is not None and state.phase is Phase.COLLECTING
    state, effects = transition(state, deliver(FIRST, "org-c", at_ms=2_500))
    deliveries = tuple(
        Delivery(p, manifest(FIRST, p), at)
        for p, at in (("org-a", 2000), ("org-b", 2001), ("org-c", 2500))
    )
    assert effects == (RequestFinalize(1, FIRST, MEMBERS, deliveries),)
    assert state is not None and state.phase is Phase.FINALIZING
    assert state.current.closed_ms == 2_500
    assert state.current.delivered_ms == {"org-a": 2000, "org-b": 2001, "org-c": 2500}
    # Further copies of any delivery change nothing and request nothing.
    for participant in MEMBERS:
        assert_ignored(state, deliver(FIRST, participant, at_ms=9_999), "duplicate")


def test_a_duplicate_delivery_is_a_no_op() -> None:
    state, _ = run([start(), deliver(FIRST, "org-a", at_ms=2_000)])
    assert_ignored(state, deliver(FIRST, "org-a", at_ms=3_000), "duplicate delivery", "org-a")
    assert state.current.delivered_ms == {"org-a": 2_000}  # the first arrival counts


def test_a_second_manifest_for_the_same_step_does_not_count() -> None:
    state, _ = run([start(), deliver(FIRST, "org-a")])
    other = Delivered(FIRST, "org-a", digest("forged"), at_ms=3_000)
    assert_ignored(state, other, "conflicting delivery", "org-a")


def test_deliveries_for_other_steps_are_ignored_with_the_reason() -> None:
    state, _ = run([*through_step(FIRST), deliver(FIRST + 1, "org-a")])
    assert_ignored(state, deliver(FIRST, "org-b"), f"step {FIRST} is closed")
    assert_ignored(state, deliver(FIRST + 2, "org-b"), f"step {FIRST + 2} is not open yet")
    assert state.delivered == {"org-a"}


def test_a_non_member_never_counts() -> None:
    state, _ = run([start(), *closing(FIRST, ["org-a", "org-b"])])
    assert_ignored(state, deliver(FIRST, LATE_JOINER), "not a participant of cycle 1")
    assert state.phase is Phase.COLLECTING and state.participants == MEMBERS


def test_a_delivery_after_the_cycle_is_ignored() -> None:
    done, _ = run(through_step(FIRST + 2))
    assert_ignored(done, deliver(FIRST + 3, "org-a"), "cycle 1 is done")


# ------------------------------------------------------------------------------- finalize


def test_finalize_releases_the_next_step_with_the_new_model_and_update() -> None:
    state, _ = run([start(), *closing(FIRST)])
    state, effects = run([finalize(FIRST, at_ms=6_000)], state)
    assert effects == (Release(1, FIRST + 1, model(FIRST + 1), MEMBERS, update(FIRST)),)
    assert (state.phase, state.step, state.delivered) == (Phase.COLLECTING, FIRST + 1, frozenset())
    finished, opened = state.recent_steps
    assert (finished.step, finished.released_ms, finished.model_digest) == (
        FIRST,
        6_000,
        model(FIRST + 1),
    )
    assert (opened.step, opened.opened_ms, opened.base_digest) == (
        FIRST + 1,
        6_000,
        model(FIRST + 1),
    )


def test_finalize_before_every_delivery_is_ignored() -> None:
    state, _ = run([start(), deliver(FIRST, "org-a")])
    assert_ignored(state, finalize(FIRST), "before every participant", "org-b", "org-c")


def test_a_repeated_finalize_is_a_no_op_and_a_different_result_is_called_out() -> None:
    state, _ = run(through_step(FIRST))
    assert_ignored(state, finalize(FIRST), "duplicate finalize")
    forged = Finalized(FIRST, update(FIRST), digest("another model"), at_ms=7_000)
    assert_ignored(state, forged, "conflicting finalize")
    assert_ignored(state, finalize(FIRST + 2), f"no finalize was requested for step {FIRST + 2}")


def test_the_last_finalize_ends_the_cycle_with_the_final_update() -> None:
    state, _ = run(through_step(FIRST + 1))
    state, _ = run(closing(FIRST + 2), state)
    state, effects = run([finalize(FIRST + 2, at_ms=8_000)], state)
    final = model(FIRST + 3)
    assert effects == (CycleDone(1, FIRST + 3, final, MEMBERS, update(FIRST + 2)),)
    assert state is not None and state.phase is Phase.DONE
    assert [r.step for r in state.recent_steps] == [FIRST + 2]
    assert state.current.released_ms == 8_000
    assert_ignored(state, finalize(FIRST + 2), "duplicate finalize")
    assert_ignored(state, finalize(FIRST + 3), "no finalize was requested")


# ------------------------------------------------------------------------------- recover


def test_recover_re_issues_the_pending_release() -> None:
    for events, expected in (
        ([start()], Release(1, FIRST, model(FIRST), MEMBERS, b"")),
        (through_step(FIRST), Release(1, FIRST + 1, model(FIRST + 1), MEMBERS, update(FIRST))),
    ):
        state, last = run(events)
        assert last == (expected,)
        assert transition(state, Recover(at_ms=1)) == (state, (expected,))


def test_recover_re_issues_the_pending_finalize_request() -> None:
    state, requested = run([start(), *closing(FIRST)])
    assert isinstance(requested[0], RequestFinalize)
    assert transition(state, Recover(at_ms=1)) == (state, requested)
    assert pending(state) == requested


def test_recover_after_the_cycle_re_issues_cycle_done() -> None:
    state, done = run(through_step(FIRST + 2))
    assert isinstance(done[0], CycleDone)
    assert transition(state, Recover(at_ms=1)) == (state, done)


# ------------------------------------------------------------------------------- model reports


def test_a_matching_model_report_is_recorded_quietly() -> None:
    state, _ = run(through_step(FIRST))
    state, effects = run([ModelReported(FIRST + 1, "org-a", model(FIRST + 1), 1)], state)
    assert effects == () and state is not None and state.mismatches == ()
    assert_ignored(state, ModelReported(FIRST + 1, "org-a", model(FIRST + 1), 2), "duplicate")


def test_a_mismatching_model_report_is_flagged_and_kept() -> None:
    state, _ = run(through_step(FIRST))
    wrong = digest("a model nobody released")
    state, effects = run([ModelReported(FIRST + 1, "org-b", wrong, 1)], state)
    flag = FlagMismatch(FIRST + 1, "org-b", wrong, model(FIRST + 1))
    assert effects == (flag,)
    assert state is not None and state.mismatches == (flag,)
    assert_ignored(state, ModelReported(FIRST + 1, "org-b", wrong, 2), "duplicate")


def test_model_reports_are_checked_against_the_right_release() -> None:
    state, _ = run(through_step(FIRST))
    # The report of the first release, arriving late, is checked against that release.
    state, effects = run([ModelReported(FIRST, "org-a", model(FIRST), 1)], state)
    assert effects == ()
    assert_ignored(state, ModelReported(FIRST + 5, "org-a", model(FIRST), 1), "no release")
    assert_ignored(state, ModelReported(FIRST, LATE_JOINER, model(FIRST), 1), "not a participant")


def test_only_recent_releases_are_kept_for_checking() -> None:
    steps = REPORT_WINDOW + 3
    events: list[Event] = [start(steps=steps)]
    for t in range(FIRST, FIRST + steps - 1):
        events += [*closing(t), finalize(t)]
    state, _ = run(events)
    assert len(state.released) == REPORT_WINDOW
    assert_ignored(state, ModelReported(FIRST, "org-a", model(FIRST), 1), "no release")


def test_the_final_model_of_a_done_cycle_can_be_checked() -> None:
    state, _ = run(through_step(FIRST + 2))
    wrong = digest("diverged")
    _, effects = transition(state, ModelReported(FIRST + 3, "org-c", wrong, 1))
    assert effects == (FlagMismatch(FIRST + 3, "org-c", wrong, model(FIRST + 3)),)


def test_replay_is_the_fold_of_transition() -> None:
    events = [*through_step(FIRST), deliver(FIRST + 1, "org-b"), Recover(at_ms=1)]
    assert replay(events) == run(events)[0]
    assert replay([]) is None


# ------------------------------------------------------------------------------- property


NOISE_PARTICIPANTS = ("org-late", "org-x")


@st.composite
def cycles(draw: st.DrawFn) -> tuple[CycleStarted, list[list[Event]], list[int]]:
    """A cycle, and per step a shuffled stream of its members' deliveries (each at least
    once, some repeated) mixed with noise; plus how many further events the aggregator
    lets pass before its Finalized arrives."""
    members = frozenset(f"org-{i}" for i in range(draw(st.integers(1, 5))))
    steps = draw(st.integers(1, 4))
    first = draw(st.integers(0, 1_000))
    started = CycleStarted(7, members, first, model(first), steps, at_ms=0)
    streams, delays = [], []
    for t in range(first, first + steps):
        repeats = draw(st.lists(st.sampled_from(sorted(members)), max_size=6))
        noise = draw(st.lists(noise_event(t, members), max_size=6))
        stream = [deliver(t, p) for p in (*sorted(members), *repeats)] + noise
        streams.append(draw(st.permutations(stream)))
        delays.append(draw(st.integers(0, 4)))
    return started, streams, delays


def noise_event(step: int, members: frozenset[str]) -> st.SearchStrategy[Event]:
    member = st.sampled_from(sorted(members))
    return st.one_of(
        st.builds(deliver, st.just(step), st.sampled_from(NOISE_PARTICIPANTS)),
        st.builds(deliver, st.sampled_from([step - 1, step + 1, step + 5]), member),
        st.builds(finalize, st.sampled_from([step - 1, step + 1])),
        st.builds(
            ModelReported,
            st.just(step),
            member,
            st.sampled_from([model(step), digest("diverged")]),
            st.just(0),
        ),
        st.builds(Recover, st.just(0)),
    )


class Traced(NamedTuple):
    event: Event
    before: BarrierState | None
    after: BarrierState | None
    effects: Effects


def feed(started: CycleStarted, streams: list[list[Event]], delays: list[int]) -> list[Traced]:
    """Drive the machine like the broker would: step t's stream arrives once step t is
    open, and the aggregator answers each RequestFinalize (and redelivers its answer) after
    `delay` more events, whichever step's stream they belong to."""
    trace: list[Traced] = []
    answer_after: dict[int, int] = {}  # requested step -> events to pass before the answer

    def step(event: Event) -> None:
        before = trace[-1].after if trace else None
        event = replace(event, at_ms=len(trace) + 1)  # a clock that only moves forward
        after, effects = transition(before, event)
        trace.append(Traced(event, before, after, effects))
        for e in effects:
            if isinstance(e, RequestFinalize) and not isinstance(event, Recover):
                answer_after[e.step] = delays[e.step - started.first_step]

    def arrive(event: Event) -> None:
        step(event)
        for requested, wait in sorted(answer_after.items()):
            answer_after[requested] = wait - 1
            if wait == 0:
                del answer_after[requested]
                step(finalize(requested))
                step(finalize(requested))  # a redelivered answer

    step(started)
    for stream in streams:
        for event in stream:
            arrive(event)
        while answer_after:  # time passes until the aggregator has answered
            arrive(Recover(at_ms=0))
    return trace


def emitted(trace: list[Traced], kind: type[E]) -> list[E]:
    """Effects of `kind` from real transitions (Recover re-issues on purpose)."""
    return [
        e
        for t in trace
        if not isinstance(t.event, Recover)
        for e in t.effects
        if isinstance(e, kind)
    ]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(cycles())
def test_any_interleaving_closes_each_step_exactly_once(
    cycle: tuple[CycleStarted, list[list[Event]], list[int]],
) -> None:
    started, streams, delays = cycle
    trace = feed(started, streams, delays)
    steps = list(range(started.first_step, started.first_step + started.steps))
    final = trace[-1].after
    assert final is not None

    requests = emitted(trace, RequestFinalize)
    assert [r.step for r in requests] == steps
    assert all(r.participants == started.participants for r in requests)
    releases = emitted(trace, Release)
    assert [(r.step, r.model_digest) for r in releases] == [(t, model(t)) for t in steps]
    assert emitted(trace, CycleDone) == [
        CycleDone(7, steps[-1] + 1, model(steps[-1] + 1), started.participants, update(steps[-1]))
    ]
    assert final.phase is Phase.DONE and final.participants == started.participants

    for event, before, after, effects in trace:
        assert after is not None
        if any(isinstance(e, Ignored) for e in effects):
            assert after == before and len(effects) == 1
        if isinstance(event, Recover):
            assert after == before and effects == pending(before)
        if isinstance(event, Delivered) and event.participant in NOISE_PARTICIPANTS:
            assert isinstance(effects[0], Ignored)
        assert after.participants == started.participants


@settings(max_examples=100, derandomize=True, deadline=None)
@given(cycles())
def test_a_step_closes_when_and_only_when_the_last_member_first_delivers(
    cycle: tuple[CycleStarted, list[list[Event]], list[int]],
) -> None:
    started, streams, delays = cycle
    trace = feed(started, streams, delays)
    first_seen: dict[tuple[int, str], int] = {}
    for event, before, _, _ in trace:
        if isinstance(event, Delivered) and before is not None:
            if before.step == event.step and before.phase is Phase.COLLECTING:
                first_seen.setdefault((event.step, event.participant), event.at_ms)
    for t in range(started.first_step, started.first_step + started.steps):
        record = next(
            x.after.current
            for x in trace
            if x.after and any(isinstance(e, RequestFinalize) and e.step == t for e in x.effects)
        )
        expected = {p: first_seen[(t, p)] for p in started.participants}
        assert record.delivered_ms == expected
        assert record.closed_ms == max(expected.values())


def test_the_cycles_weights_and_bound_are_its_terms_in_every_release() -> None:
    # Fixed when the cycle starts, carried by its state: a restarted barrier whose settings
    # changed mid-cycle still announces the cycle's own (the hub checks every manifest
    # against them).
    from dataclasses import replace as with_terms

    started = with_terms(start(), weights=(4096.0, 2048.0, 1024.0), update_norm_bound=3.5)
    state, effects = transition(None, started)
    assert state is not None and (state.weights, state.update_norm_bound) == (
        (4096.0, 2048.0, 1024.0),
        3.5,
    )
    (release,) = effects
    assert isinstance(release, Release)
    assert (release.weights, release.update_norm_bound) == ((4096.0, 2048.0, 1024.0), 3.5)
    with pytest.raises(ValueError, match="weights for"):
        with_terms(start(), weights=(1.0,) * (len(MEMBERS) + 1))
    for bad in ({"weights": (0.0,) * len(MEMBERS)}, {"update_norm_bound": -1.0}):
        with pytest.raises(ValueError, match="finite"):
            with_terms(start(), **bad)

"""The monitor's arithmetic: who held the barrier and for how long, idle cost and its
projection, stragglers, the time to the end of the cycle, silent participants.

Pure: numbers in, numbers out; no clocks, no I/O (times are passed in, in seconds).
docs/monitor.md states every definition with its reasons.

Barrier idle attribution. For one closed step, let d_(1) <= ... <= d_(n) be the hub's
delivery times (receipts, one clock). The participant that delivered last *held* the
barrier, and is charged `d_(n) - d_(n-1)`: had it been as quick as the runner-up, the step
would have closed that much earlier, and nobody else could have closed it sooner. Earlier
gaps are not charged to anyone: removing one of them alone would not close the step
earlier, because the last participant still had to deliver. The sum over participants is
the wall time the federation lost to its slowest member, which is what the consortium pays
(24 s a step at one site 24 s slower than the rest).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def held_times(deliveries: Mapping[str, float]) -> dict[str, float]:
    """Seconds each participant held the barrier in one closed step (only the last to
    deliver holds it). Ties are broken by participant id, so the result is deterministic;
    a tie holds for 0 s."""
    out = {p: 0.0 for p in deliveries}
    if len(deliveries) < 2:
        return out
    ordered = sorted(deliveries.items(), key=lambda item: (item[1], item[0]))
    (last, at), (_, runner_up) = ordered[-1], ordered[-2]
    out[last] = at - runner_up
    return out


def holder(deliveries: Mapping[str, float]) -> str | None:
    """The participant that delivered last (None for fewer than two participants)."""
    if len(deliveries) < 2:
        return None
    return max(deliveries.items(), key=lambda item: (item[1], item[0]))[0]


def barrier_wait(deliveries: Mapping[str, float]) -> float:
    """How long the barrier held deliveries before it could close: first to last."""
    if not deliveries:
        return 0.0
    return max(deliveries.values()) - min(deliveries.values())


def robust_rate(values: Sequence[float], window: int) -> float:
    """The median of the last `window` values (0 for none): one spike does not move it."""
    recent = list(values)[-window:] if window > 0 else []
    return statistics.median(recent) if recent else 0.0


def projected_idle(held_history: Sequence[float], remaining_steps: int, window: int) -> float:
    """Idle cost a participant will likely cause over the steps left in the cycle: its
    robust per-step hold (median of its recent closed steps, 0 where it did not hold)
    times the steps not yet closed."""
    return robust_rate(held_history, window) * max(0, remaining_steps)


@dataclass(frozen=True)
class StragglerRule:
    """A participant is slow in a step when its time to deliver after the release exceeds
    the median of the others' by more than `margin` (relative) and `min_excess_s`
    (absolute, so sub-second jitter of tiny steps never counts). It is a straggler when it
    was slow in at least `needed` of the last `window` closed steps: one spike does not
    make a straggler, nor does one fast step clear one."""

    margin: float = 0.2
    min_excess_s: float = 1.0
    window: int = 5
    needed: int = 3

    def __post_init__(self) -> None:
        if not self.margin >= 0 or not self.min_excess_s >= 0:
            raise ValueError("margin and min_excess_s must be >= 0")
        if not 1 <= self.needed <= self.window:
            raise ValueError(f"need 1 <= needed ({self.needed}) <= window ({self.window})")


@dataclass(frozen=True)
class Verdict:
    participant: str
    # Steps (of the last `window` closed ones with a known release) it was slow in.
    slow_in: int
    considered: int
    # Medians over those steps: its own time to deliver, the others', and the difference.
    lag_s: float | None
    others_lag_s: float | None
    excess_s: float | None
    straggler: bool


def is_slow(lag: float, others: Sequence[float], rule: StragglerRule) -> bool:
    if not others:
        return False
    typical = statistics.median(others)
    return lag > (1 + rule.margin) * typical and lag - typical > rule.min_excess_s


def stragglers(
    lags_by_step: Sequence[Mapping[str, float]], participants: Sequence[str], rule: StragglerRule
) -> dict[str, Verdict]:
    """Verdict per participant from the closed steps' times to deliver (release ->
    delivery, seconds), oldest first; a step lacking someone's lag is skipped."""
    complete = [lags for lags in lags_by_step if all(p in lags for p in participants)]
    recent = complete[-rule.window :]
    out: dict[str, Verdict] = {}
    for p in participants:
        slow = 0
        own: list[float] = []
        typical: list[float] = []
        for lags in recent:
            others = [lags[q] for q in participants if q != p]
            slow += is_slow(lags[p], others, rule)
            own.append(lags[p])
            if others:
                typical.append(statistics.median(others))
        lag = statistics.median(own) if own else None
        others_lag = statistics.median(typical) if typical else None
        excess = None if lag is None or others_lag is None else lag - others_lag
        out[p] = Verdict(p, slow, len(recent), lag, others_lag, excess, slow >= rule.needed)
    return out


def eta(
    step_walls: Sequence[float], remaining_steps: int, elapsed_in_open: float, window: int
) -> float | None:
    """Seconds to the end of the cycle: the open step's expected rest (robust step time
    minus what already elapsed, not below 0) plus the robust step time for every further
    step. None while no step has a measured wall time; 0 once nothing remains."""
    if remaining_steps <= 0:
        return 0.0
    if not step_walls:
        return None
    per_step = robust_rate(step_walls, window)
    return max(0.0, per_step - max(0.0, elapsed_in_open)) + per_step * (remaining_steps - 1)


def silent(
    last_seen: Mapping[str, float | None], now: float, timeout: float, since: float
) -> dict[str, float]:
    """Participants with no heartbeat for more than `timeout` seconds, with how long they
    have been silent. One never heard from counts from `since` (the monitor's start)."""
    out: dict[str, float] = {}
    for participant, seen in last_seen.items():
        quiet = now - (since if seen is None else seen)
        if quiet > timeout:
            out[participant] = quiet
    return out

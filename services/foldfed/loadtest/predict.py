"""The analytic model of a synchronous step, and who the barrier waits for. Pure.

A step opens when the hub releases θ_t. Participant i is done after its compute time c_i
plus its upload time u_i = (delta - burst) / bandwidth_i + 2 · latency_i (the token
bucket starts full with one chunk; manifest and have-request round trip, then the
receipt). The step closes when the last one is done, and the next
opens after the hub's overhead h (finalize + release; measured, not modelled):

    wall_t = max_i (c_i + u_i) + h

Idle attribution: the barrier waits on the last participant alone from the moment the
next-to-last one is done. That lead is the wall time this participant costs the whole
federation in this step (had it been as fast as the next-slowest, the step would have
closed that much earlier), so it is charged to it; everyone else is charged nothing.
Summed over steps it is the extra wall time due to a straggler, predicted here from the
scenario and measured the same way from the barrier's own timeline (`timeline`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from foldfed.loadtest.distributions import compute_seconds
from foldfed.loadtest.scenario import MIB, Participant, Scenario


def attribute_idle(done_at: Mapping[str, float]) -> dict[str, float]:
    """Barrier idle charged per participant, given when each was done (any time origin)."""
    charged = dict.fromkeys(done_at, 0.0)
    if len(done_at) < 2:
        return charged
    # Ties broken by name, so the result does not depend on dict order.
    ordered = sorted(done_at.items(), key=lambda kv: (kv[1], kv[0]))
    (_, second), (last, latest) = ordered[-2], ordered[-1]
    charged[last] = latest - second
    return charged


def transfer_run_seconds(p: Participant, scenario: Scenario) -> float:
    """Run seconds p's token bucket holds the run's delta back (its one chunk of burst is
    full when an upload starts, since the link idles during compute)."""
    if p.bandwidth_bps <= 0:
        return 0.0
    burst = scenario.chunk_mib * MIB
    return max(0.0, scenario.uplink_bytes_run - burst) / p.bandwidth_bps


def burst_real_seconds(p: Participant, scenario: Scenario) -> float:
    """Real seconds the token bucket's first chunk of burst skips: an emulation artifact
    (a real link carries those bytes at its rate too), added back in codec comparisons."""
    if p.bandwidth_bps <= 0:
        return 0.0
    burst = min(scenario.chunk_mib * MIB, scenario.uplink_bytes_run)
    return burst / p.bandwidth_bps * scenario.time_scale


def download_seconds(p: Participant, scenario: Scenario) -> float:
    """Real seconds p takes to download the global update over its link (not emulated by
    the run: the broker delivers it on loopback; a real site waits this long before it
    can train)."""
    if p.bandwidth_bps <= 0:
        return 0.0
    return scenario.downlink_bytes_run / p.bandwidth_bps * scenario.time_scale


def upload_seconds(p: Participant, scenario: Scenario) -> float:
    """Real seconds p's upload takes: the run's delta over p's token bucket, times the
    time scale, plus two round trips of real latency."""
    return transfer_run_seconds(p, scenario) * scenario.time_scale + 2 * p.latency_ms / 1000.0


@dataclass(frozen=True)
class StepPlan:
    step: int
    compute_s: dict[str, float]
    upload_s: dict[str, float]
    wall_s: float
    idle_s: dict[str, float]

    @property
    def done_s(self) -> dict[str, float]:
        return {p: self.compute_s[p] + self.upload_s[p] for p in self.compute_s}


def plan_step(
    scenario: Scenario, step: int, members: Iterable[str], overhead_s: float = 0.0
) -> StepPlan:
    """Predicted real times of global step `step` for the cycle's `members`."""
    compute: dict[str, float] = {}
    upload: dict[str, float] = {}
    for name in members:
        p = scenario.participant(name)
        compute[name] = compute_seconds(p.compute, scenario.seed, name, step)
        upload[name] = upload_seconds(p, scenario)
    done = {p: compute[p] + upload[p] for p in compute}
    return StepPlan(
        step=step,
        compute_s=compute,
        upload_s=upload,
        wall_s=max(done.values()) + overhead_s,
        idle_s=attribute_idle(done),
    )


@dataclass(frozen=True)
class Totals:
    steps: int
    wall_s: float
    idle_s: dict[str, float]


def totals(plans: Iterable[StepPlan]) -> Totals:
    plans = list(plans)
    idle: dict[str, float] = {}
    for plan in plans:
        for name, value in plan.idle_s.items():
            idle[name] = idle.get(name, 0.0) + value
    return Totals(len(plans), sum(p.wall_s for p in plans), idle)


def plan_run(
    scenario: Scenario, overhead_s: float = 0.0, steps: int | None = None
) -> list[StepPlan]:
    """Every step of the scenario (both cycles for a late joiner), in real seconds."""
    n = scenario.steps if steps is None else steps
    plans = [plan_step(scenario, t, scenario.first_cycle(), overhead_s) for t in range(1, n + 1)]
    if scenario.late_joiners and steps is None:
        # The next cycle starts one step number later (the last cycle's final release
        # used step R + 1) and counts everyone.
        first = scenario.steps + 2
        plans += [
            plan_step(scenario, t, scenario.names, overhead_s)
            for t in range(first, first + scenario.next_cycle_steps)
        ]
    return plans


def relative_error(measured: float, predicted: float) -> float:
    """|measured - predicted| / |predicted| (inf when only the prediction is 0)."""
    if predicted == 0:
        return 0.0 if measured == 0 else float("inf")
    return abs(measured - predicted) / abs(predicted)

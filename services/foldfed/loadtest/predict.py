"""The analytic model of a synchronous step, and who the barrier waits for. Pure.

A step opens when the hub releases θ_t with the global update U_{t-1} (none at a cycle's
first step). Participant i first downloads it, d_i = update / bandwidth_i (the load test
emulates the downlink at the link's rate, with no burst), then computes for c_i, then
uploads for u_i = (delta - burst) / bandwidth_i + 2 · latency_i (the token bucket starts
full with one chunk; manifest and have-request round trip, then the receipt). The step
closes when the last one is done, and the next opens after the hub's overhead h
(finalize + release; measured, not modelled):

    wall_t = max_i (d_i + c_i + u_i) + h

That is today's hub, where the update exists only once every delivery is in: downloads
follow uploads. With a progressive finalize (DESIGN, "Finalize per chunk index") chunk j
of the update is ready once every member's chunk j arrived, and a site's download overlaps
the uploads. Both are one fold over the update's chunks (`download_end`): a chunk crosses
the link once it is ready and the link is free, t = max(t, ready_j) + size_j / rate;
`sequential_ready` and `overlapped_ready` say when the chunks are ready, `transfer_step`
puts a step together, and its `comm_s` is the time the step spends beyond its compute.

Idle attribution: the barrier waits on the last participant alone from the moment the
next-to-last one is done. That lead is the wall time this participant costs the whole
federation in this step (had it been as fast as the next-slowest, the step would have
closed that much earlier), so it is charged to it; everyone else is charged nothing.
Summed over steps it is the extra wall time due to a straggler, predicted here from the
scenario and measured the same way from the barrier's own timeline (`timeline`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

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
    """Real seconds p takes to download the global update over its link, after the release
    on today's hub (the run emulates it: FOLDFED_DOWNLOAD_RATE_LIMIT_BPS, no burst)."""
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
    # The previous step's update, downloaded after this step's release (empty: none).
    download_s: dict[str, float] = field(default_factory=dict)

    @property
    def done_s(self) -> dict[str, float]:
        return {
            p: self.download_s.get(p, 0.0) + self.compute_s[p] + self.upload_s[p]
            for p in self.compute_s
        }


def plan_step(
    scenario: Scenario,
    step: int,
    members: Iterable[str],
    overhead_s: float = 0.0,
    downloads: bool = False,
) -> StepPlan:
    """Predicted real times of global step `step` for the cycle's `members`; `downloads`:
    the step begins with the previous step's update (every step but a cycle's first)."""
    compute: dict[str, float] = {}
    upload: dict[str, float] = {}
    download: dict[str, float] = {}
    for name in members:
        p = scenario.participant(name)
        compute[name] = compute_seconds(p.compute, scenario.seed, name, step)
        upload[name] = upload_seconds(p, scenario)
        if downloads:
            download[name] = download_seconds(p, scenario)
    plan = StepPlan(step, compute, upload, 0.0, {}, download)
    done = plan.done_s
    return replace(plan, wall_s=max(done.values()) + overhead_s, idle_s=attribute_idle(done))


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
    members = scenario.first_cycle()
    plans = [plan_step(scenario, t, members, overhead_s, t > 1) for t in range(1, n + 1)]
    if scenario.late_joiners and steps is None:
        # The next cycle starts one step number later (the last cycle's final release
        # used step R + 1) and counts everyone; its first release carries no update.
        first = scenario.steps + 2
        plans += [
            plan_step(scenario, t, scenario.names, overhead_s, t > first)
            for t in range(first, first + scenario.next_cycle_steps)
        ]
    return plans


def relative_error(measured: float, predicted: float) -> float:
    """|measured - predicted| / |predicted| (inf when only the prediction is 0)."""
    if predicted == 0:
        return 0.0 if measured == 0 else float("inf")
    return abs(measured - predicted) / abs(predicted)


# ---------------------------------------------------------------- downloads vs uploads


def chunk_sizes(total: float, chunk: float) -> list[float]:
    """`total` bytes cut into chunks of `chunk` bytes (the last one shorter)."""
    if total <= 0:
        return []
    n = math.ceil(total / chunk)
    return [chunk] * (n - 1) + [total - chunk * (n - 1)]


def arrivals(start: float, sizes: Sequence[float], rate_bps: float) -> list[float]:
    """When each chunk of a transfer that begins at `start` has crossed a link of
    `rate_bps`, back to back (every chunk ready at `start`)."""
    return list(_fold([start] * len(sizes), sizes, rate_bps, start))


def download_end(
    ready: Sequence[float], sizes: Sequence[float], rate_bps: float, free_at: float = 0.0
) -> float:
    """When a site holds the whole update: chunk j crosses its link once it is ready and
    the link is free, t = max(t, ready_j) + size_j / rate, from the link free at
    `free_at`. An unlimited link (rate 0) takes no time."""
    return max([free_at, *_fold(ready, sizes, rate_bps, free_at)])


def _fold(
    ready: Sequence[float], sizes: Sequence[float], rate_bps: float, t: float
) -> Iterable[float]:
    if len(ready) != len(sizes):
        raise ValueError(f"{len(ready)} ready times for {len(sizes)} chunks")
    for when, size in zip(ready, sizes, strict=True):
        t = max(t, when) + (size / rate_bps if rate_bps > 0 else 0.0)
        yield t


def sequential_ready(uploads: Mapping[str, Sequence[float]], chunks: int) -> list[float]:
    """Today's hub: the update (`chunks` chunks) is finalized, and all of it published,
    once the last member's last chunk has arrived (`uploads`: per member, when each of
    its chunks arrived)."""
    last = max((a[-1] for a in uploads.values() if a), default=0.0)
    return [last] * chunks


def overlapped_ready(uploads: Mapping[str, Sequence[float]]) -> list[float]:
    """A progressive finalize: chunk j of the update is ready once every member's chunk j
    has arrived (the members' deltas and the update cut into the same chunk count)."""
    counts = {len(a) for a in uploads.values()}
    if len(counts) != 1:
        raise ValueError(f"members' chunk counts differ: {sorted(counts)}")
    return [max(a[j] for a in uploads.values()) for j in range(counts.pop())]


@dataclass(frozen=True)
class Link:
    """A site's link, bytes per second each way (0 = unlimited)."""

    up_bps: float
    down_bps: float


@dataclass(frozen=True)
class StepTransfer:
    """One step from its release (every site holds θ_t, time 0): each site computes,
    uploads, then holds θ_{t+1} at `holds_s`."""

    compute_s: dict[str, float]
    uploaded_s: dict[str, float]  # last chunk of its delta arrived
    ready_s: list[float]  # when each chunk of the update became available
    holds_s: dict[str, float]  # last chunk of the update received

    @property
    def wall_s(self) -> float:
        """Release to every site holding the next model (the next release's content)."""
        return max(self.holds_s.values())

    @property
    def comm_s(self) -> float:
        """What the step spends beyond compute: its wall time minus the slowest site's
        compute (what a step would take on infinitely fast links)."""
        return self.wall_s - max(self.compute_s.values())


def transfer_step(
    compute_s: Mapping[str, float],
    links: Mapping[str, Link],
    up_sizes: Sequence[float],
    down_sizes: Sequence[float],
    overlapped: bool,
) -> StepTransfer:
    """A step's transfers: each site uploads its delta (`up_sizes`, back to back from the
    end of its compute) and downloads the update (`down_sizes`); `overlapped`: the
    update's chunks are ready as the members' chunks arrive (progressive finalize), else
    all at once after the last delivery (today's hub). Uplink and downlink are separate
    directions: a site's download may overlap its own upload."""
    up = {n: arrivals(c, up_sizes, links[n].up_bps) for n, c in compute_s.items()}
    ready = overlapped_ready(up) if overlapped else sequential_ready(up, len(down_sizes))
    holds = {n: download_end(ready, down_sizes, links[n].down_bps) for n in compute_s}
    return StepTransfer(
        compute_s=dict(compute_s),
        uploaded_s={n: up[n][-1] if up[n] else c for n, c in compute_s.items()},
        ready_s=ready,
        holds_s=holds,
    )

"""Verdicts of a load-test run: what the run measured (`RunResult`) and whether it holds
the scenario's invariants and expectations (`check_run`): every step released, every site
on the hub's final model, the straggler's cost within the tolerance of the prediction and
charged to it (by this report and by the monitor service), goodput on an emulated link,
the same model as an undisturbed run, a late joiner admitted at the cycle boundary, and
with compared codecs the communication per step (its figures: comm.py).

Pure: no processes, files or broker. The runner (runner.py) measures and builds the
result; the report (report.py) shows the same numbers these checks judge.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from foldfed.loadtest.comm import codec_figures
from foldfed.loadtest.footprint import DiskGrowth, RssPeak, StepDisk
from foldfed.loadtest.predict import StepPlan, relative_error, totals, transfer_run_seconds
from foldfed.loadtest.scenario import MIB, Scenario
from foldfed.loadtest.timeline import (
    Goodput,
    MeasuredStep,
    SpoolTimes,
    idle_totals,
    straggler_real_idle,
)

if TYPE_CHECKING:
    from foldfed.loadtest.sums import StepSum


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # A statistical bound that a few time-scaled steps cannot hold (the run's own
    # confidence interval is wider than the bound): a smoke run reports it, unjudged.
    needs_full_run: bool = False

    def verdict(self, smoke: bool) -> str:
        """ "ok", "FAIL", or "not judged" for a full-run check in a smoke run."""
        if self.ok:
            return "ok"
        return "not judged (needs the full run)" if smoke and self.needs_full_run else "FAIL"

    def fails(self, smoke: bool) -> bool:
        return self.verdict(smoke) == "FAIL"


@dataclass
class RunResult:
    scenario: Scenario
    workdir: Path
    wall_s: float  # run seconds, first release to the last cycle's end
    steps: list[MeasuredStep]
    plans: list[StepPlan]
    overhead_s: float  # run seconds per step the services add (median)
    final_digest: str
    participant_digests: dict[str, str]
    cycles: dict[int, tuple[str, ...]]  # cycle → its participants, from the releases
    checks: list[Check] = field(default_factory=list)
    goodput: Goodput | None = None
    notes: list[str] = field(default_factory=list)
    reference_digest: str = ""
    # The monitor service's /api/state at the end of the run (straggler scenarios).
    monitor: dict[str, object] | None = None
    # With compared codecs: each codec's own run, in the scenario's order.
    codec_runs: list[RunResult] = field(default_factory=list)
    # The same run on unlimited links (Scenario.without_links): the baseline that the
    # links' share of a step is measured against.
    links_off: RunResult | None = None
    # What the run held (loadtest/footprint.py): the hub's peak RSS, bytes on disk per
    # step, their growth after warm-up (expect.disk_flat_after).
    rss: RssPeak | None = None
    disk: list[StepDisk] = field(default_factory=list)
    growth: DiskGrowth | None = None
    # expect.exact_sums: each step's update against the participants' deltas (sums.py).
    sums: list[StepSum] | None = None
    # Each step's release (hub clock, ms) and each (step, participant)'s spool times:
    # where a step's time goes (timeline.step_phases).
    opened_ms: dict[int, int] = field(default_factory=dict)
    spool_times: dict[tuple[int, str], SpoolTimes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(c.fails(self.scenario.smoke_run) for c in self.checks)


def check_run(result: RunResult) -> list[Check]:
    """The invariants every scenario must hold, and what its `expect` asks for."""
    s = result.scenario
    checks: list[Check] = []
    expected_steps = s.total_steps
    checks.append(
        Check(
            "every step completed",
            len(result.steps) == expected_steps,
            f"{len(result.steps)} of {expected_steps} steps released",
        )
    )
    digests = set(result.participant_digests.values())
    checks.append(
        Check(
            "every participant holds the hub's final model",
            digests == {result.final_digest} and bool(result.final_digest),
            f"hub {result.final_digest[:12]}; participants "
            + ", ".join(f"{n} {d[:12]}" for n, d in sorted(result.participant_digests.items())),
        )
    )
    if s.expect.straggler:
        name = s.expect.straggler
        raw = idle_totals(result.steps).get(name, 0.0) * s.time_scale
        measured = sum(straggler_idle(result, name))
        predicted = totals(result.plans).idle_s.get(name, 0.0)
        err = relative_error(measured, predicted)
        ci = straggler_ci(result, name)
        # The bound is the tolerance, never widened. The run's own noise (95 %
        # confidence interval of the sum, from the per-step spread) is reported beside it:
        # when it is wider than the tolerance, a failure says "run longer", not "wrong".
        checks.append(
            Check(
                f"extra wall time due to {name} matches the prediction within "
                f"{s.expect.tolerance:.0%}",
                err <= s.expect.tolerance,
                f"measured {measured:,.0f} s, predicted {predicted:,.0f} s (real), "
                f"error {err:.1%}; the run's 95% confidence interval is +/-{ci:.1%} "
                f"(the barrier's idle x S is {raw:,.0f} s; the difference, "
                f"{raw - measured:+,.0f} s, is {name}'s delivery path time beyond the "
                f"next-slowest's, service time converted at 1x instead of x S: see the report)",
                needs_full_run=True,
            )
        )
        charged = idle_totals(result.steps)
        top = max(charged.items(), key=lambda kv: kv[1])[0] if charged else ""
        checks.append(
            Check(
                f"the barrier's idle time is attributed to {name}",
                top == name,
                "idle charged (real s): "
                + ", ".join(f"{n} {v * s.time_scale:,.0f}" for n, v in sorted(charged.items())),
            )
        )
    if s.expect.straggler:
        checks.append(monitor_check(result, s.expect.straggler))
    if s.expect.goodput_participant and result.goodput is not None:
        g = result.goodput
        checks.append(
            Check(
                f"goodput on {s.expect.goodput_participant}'s emulated link >= "
                f"{s.expect.goodput_min:.0%} of its bandwidth",
                g.link_share >= s.expect.goodput_min,
                f"{g.bytes_sent / MIB:.1f} MiB in {g.seconds:.2f} s: {g.bytes_per_s / 1e6:.3f} "
                f"MB/s on a {g.rate_bps / 1e6:.3f} MB/s link; share of what the link "
                f"allowed {g.link_share:.1%}",
            )
        )
    if s.expect.same_digest_as_undisturbed:
        checks.append(
            Check(
                "same final model as an undisturbed run with the same seeds",
                bool(result.reference_digest) and result.reference_digest == result.final_digest,
                f"disturbed {result.final_digest[:16]}, undisturbed "
                f"{result.reference_digest[:16] or '(not run)'}",
            )
        )
    if s.expect.exact_sums:
        checks.append(sums_check(result))
    if s.expect.disk_flat_after:
        checks.append(disk_check(result))
    for late in s.late_joiners:
        cycle1 = [m for m in result.steps if m.cycle == 1]
        cycle2 = [m for m in result.steps if m.cycle == 2]
        in1 = [m.step for m in cycle1 if late in m.arrive_s]
        checks.append(
            Check(
                f"{late} is not part of cycle 1 and the barrier never waited for it",
                not in1 and late not in result.cycles.get(1, ()) and len(cycle1) == s.steps,
                f"cycle 1: {len(cycle1)} steps closed with {', '.join(result.cycles.get(1, ()))}"
                + (f"; {late} delivered in {in1}" if in1 else ""),
            )
        )
        first2 = s.steps + 2
        joined = sorted(m.step for m in cycle2 if late in m.arrive_s)
        checks.append(
            Check(
                f"{late} is admitted at the cycle boundary (cycle 2, step {first2})",
                bool(joined) and joined[0] == first2 and len(joined) == s.next_cycle_steps,
                f"{late} delivered in steps {joined}",
            )
        )
    return checks


def wrong_sums(result: RunResult) -> int:
    """Steps whose update is not the weighted mean of the deltas (or could not be checked)."""
    return sum(x.wrong for x in result.sums or [])


def sums_check(result: RunResult) -> Check:
    sums = result.sums or []
    worst = max((x.worst_ratio for x in sums), default=0.0)
    detail = (
        f"{len(sums)} step(s) checked, {sum(x.elements for x in sums):,} elements; "
        f"wrong_sums={wrong_sums(result)}; largest |update - mean| is {worst:.2f} x the "
        "tolerance (fixed-point grid + float32 rounding)"
    )
    missing = [f"step {x.step}: {x.missing}" for x in sums if x.missing]
    return Check(
        "each step's hub update is the weighted mean of the deltas the participants wrote "
        "(independent numpy check, within the fixed-point grid)",
        bool(sums) and len(sums) == len(result.steps) and wrong_sums(result) == 0,
        detail + ("; " + "; ".join(missing) if missing else ""),
    )


# FOLDFED_RETAIN_CHECKPOINT_EVERY's default (settings registry; docs/retention.md).
DEFAULT_CHECKPOINT_EVERY = 50


def disk_bound_bytes(s: Scenario, growth: DiskGrowth | None = None) -> int:
    """What 'flat' allows the bulk (everything but the records kept for ever, which are
    reported per step apart): one delta's bytes (where in a step the peak was sampled),
    plus one model for each checkpoint the policy keeps (every k-th θ) between the two
    windows compared."""
    bound = s.delta_bytes_run
    if growth is None or not growth.judged_steps:
        return bound
    k = DEFAULT_CHECKPOINT_EVERY if s.retain_checkpoint_every is None else s.retain_checkpoint_every
    if k and s.retain_steps != 0:
        first = growth.warmup + growth.window
        last = growth.warmup + growth.judged_steps
        bound += s.delta_bytes_run * (last // k - first // k)
    return bound


def disk_check(result: RunResult) -> Check:
    s = result.scenario
    g = result.growth
    bound = disk_bound_bytes(s, g)
    if g is None or g.judged_steps < 2:
        return Check("bytes on disk stay flat after warm-up", False, "too few steps sampled")
    return Check(
        f"bytes on disk (hub + participants, without the records kept for ever) stay flat "
        f"after {g.warmup} warm-up steps",
        g.bulk <= bound,
        f"growth from the {g.window} steps after warm-up to the last {g.window} (medians of "
        f"per-step peaks): {g.bulk:+,} bytes, bound {bound:,} (one delta, and a model per "
        f"checkpoint the policy keeps in between); trend {g.slope_per_step:+,.0f} bytes per "
        f"step over {g.judged_steps} steps. The records kept for ever (manifests, signed "
        f"step records, logs, sent and release records) add {g.records_per_step:,.0f} bytes "
        f"per step; everything together grew {g.total:+,} bytes (hub {g.hub:+,}, "
        f"participants {g.participants:+,})",
    )


def straggler_idle(result: RunResult, name: str) -> list[float]:
    """Per step, the idle charged to the straggler in real seconds, its delivery path's
    excess over the next-to-last one's converted at 1x (`timeline.straggler_real_idle`)."""
    s = result.scenario
    transfer = {p.name: transfer_run_seconds(p, s) for p in s.participants}
    return straggler_real_idle(result.steps, name, s.time_scale, transfer)


def straggler_ci(result: RunResult, name: str) -> float:
    """Half-width of the 95 % confidence interval of the straggler's summed idle (real,
    `straggler_idle`), relative to the prediction: 1.96 x the per-step standard deviation
    x sqrt(steps) (sum of independent steps)."""
    values = straggler_idle(result, name)
    predicted = totals(result.plans).idle_s.get(name, 0.0)
    if len(values) < 2 or predicted <= 0:
        return 0.0
    spread = statistics.stdev(values) * math.sqrt(len(values))
    return 1.96 * spread / predicted


def lead_over(result: RunResult, name: str, other: str) -> tuple[float, float]:
    """Mean and standard error of `name`'s delivery minus `other`'s per step (run seconds,
    signed: noise averages out instead of being clipped at the barrier)."""
    leads = [
        m.arrive_s[name] - m.arrive_s[other]
        for m in result.steps
        if name in m.arrive_s and other in m.arrive_s
    ]
    if len(leads) < 2:
        return (leads[0] if leads else 0.0), 0.0
    return statistics.fmean(leads), statistics.stdev(leads) / math.sqrt(len(leads))


def monitor_idle(result: RunResult) -> dict[str, float]:
    """Barrier idle per participant as the monitor service attributed it (run seconds)."""
    table = (result.monitor or {}).get("table") or []
    return {
        str(row["participant"]): float(row.get("idle_s") or 0.0)
        for row in table  # type: ignore[union-attr]
        if isinstance(row, dict)
    }


def monitor_check(result: RunResult, name: str) -> Check:
    # Only the idle attribution singles one site out; the monitor's straggler flag compares
    # each site with the median of the others, so a site slower than most (site-d next to
    # the staggered fast sites) may be flagged beside the straggler.
    what = f"the monitor service attributes the idle time to {name} and flags it"
    if result.monitor is None:
        return Check(what, False, "the monitor's /api/state was not read")
    idle = monitor_idle(result)
    flagged = sorted(
        str(row["participant"])
        for row in result.monitor.get("table") or []  # type: ignore[union-attr]
        if isinstance(row, dict) and row.get("straggler")
    )
    top = max(idle.items(), key=lambda kv: kv[1])[0] if idle else ""
    S = result.scenario.time_scale
    ours = idle_totals(result.steps).get(name, 0.0)
    return Check(
        what,
        top == name and name in flagged,
        "monitor idle (real s): "
        + ", ".join(f"{n} {v * S:,.0f}" for n, v in sorted(idle.items()))
        + f"; stragglers flagged: {flagged or 'none'}; the report's own measure for {name}: "
        f"{ours * S:,.0f} s",
    )


def check_codec_runs(combined: RunResult) -> list[Check]:
    """Each codec run's own checks, named by codec, and the issue's bandwidth goal."""
    checks = [
        replace(c, name=f"{run.scenario.codec.label}: {c.name}")
        for run in combined.codec_runs
        for c in run.checks
    ]
    if combined.scenario.expect.comm_within_compute:
        checks.append(comm_check(combined))
    return checks


def comm_check(combined: RunResult) -> Check:
    """The communication time per step is within the slowest site's compute, at real size
    and link speed, for the scenario's `comm_codec` (or some compared codec). Judged on
    the links' measured busy time (`CodecFigures.links_bound_s`: the slowest upload plus
    the slowest download per step, an upper bound of what the links add); beside it what
    the links added to the wall time (links on - links off, same seeds) with its 95 %
    interval, the services' own time and the analytic up + down."""
    figures = [codec_figures(run) for run in combined.codec_runs]
    judged = combined.scenario.expect.comm_codec
    parts, ok = [], False
    for f in figures:
        fits = f.measured_comm_s <= f.slowest_compute_s  # False for nan: nothing measured
        if not judged or f.label == judged:
            ok |= fits
        worst = max(f.compute_s, key=lambda n: f.comm_s(n) - f.compute_s[n])
        parts.append(
            f"{f.label}: links busy {f.measured_comm_s:,.0f} s "
            f"{'<=' if fits else '>'} compute {f.slowest_compute_s:,.0f} s; links add to "
            f"the wall {f.links_s:,.0f} +/- {f.links_ci_s:,.0f} s (wall {f.measured_wall_s:,.0f}"
            f" s on, {f.links_off_wall_s:,.0f} s off); the services' own "
            f"{f.services_run_s:,.2f} s of run time, x S {f.services_s:,.0f} s; mean of "
            f"{f.measured_steps} step(s); predicted, sequential: up "
            f"{f.uplink_s[worst]:,.0f} s + down {f.downlink_s[worst]:,.0f} s at {worst}"
        )
    which = f"for {judged}" if judged else "for some codec"
    return Check(
        "communication per step (measured: slowest upload + slowest download on the "
        f"emulated links, an upper bound of what they add) at most the compute time, {which}",
        ok,
        "; ".join(parts),
        # A smoke run's few steps at a larger S: only a full run judges.
        needs_full_run=True,
    )

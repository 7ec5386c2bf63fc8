"""Verdicts of a load-test run: what the run measured (`RunResult`) and whether it holds
the scenario's invariants and expectations (`check_run`): every step released, every site
on the hub's final model, the straggler's cost within the tolerance of the prediction and
charged to it (by this report and by the monitor service), goodput on an emulated link,
the same model as an undisturbed run, a late joiner admitted at the cycle boundary.

Pure: no processes, files or broker. The runner (runner.py) measures and builds the
result; the report (report.py) shows the same numbers these checks judge.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from foldfed.loadtest.predict import (
    Link,
    StepPlan,
    burst_real_seconds,
    chunk_sizes,
    download_seconds,
    relative_error,
    totals,
    transfer_run_seconds,
    transfer_step,
)
from foldfed.loadtest.scenario import MIB, Scenario
from foldfed.loadtest.timeline import (
    Goodput,
    MeasuredStep,
    ParticipantObs,
    idle_totals,
    links_added_s,
    straggler_real_idle,
)


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


# ---------------------------------------------------------------- compared codecs

# The horizon the issue projects a run to.
PROJECTED_STEPS = 500


@dataclass(frozen=True)
class CodecFigures:
    """One codec run in real time and bytes: what one step costs at the scenario's size.

    Measured over the steps that begin with a download (every step but a cycle's first),
    real seconds (run seconds x S) unless named `_run_s`:
    - wall: release to release with both directions of every link emulated, plus the
      uploader's one chunk of burst (an emulation artifact: a real link carries it too);
    - links bound (judged, `measured_comm_s`): the slowest upload plus the slowest
      download as the emulated links' token buckets held them, plus the burst: an upper
      bound of what the links add to a step, immune to the machine's CPU load;
    - links: what the links added to the wall time, wall(links on) - wall(links off),
      paired step by step with a run of the same seeds on unlimited links (plus the
      burst), with its 95 % interval. The services' own time is in both runs and cancels
      when the machine is the same for both; on shared cores its noise can exceed a
      small link share, hence the bound is what the check judges;
    - services: wall(links off) - the slowest site's compute: the services' own time
      (hand-offs, ingest, finalize, release, the codecs' CPU), shown in run seconds too,
      as it was spent here; x S it is an upper bound, since per-step fixed costs do not
      grow with the delta (the codecs' CPU does);
    - wall - compute: the step beyond its slowest compute, links and services together
      (the upper bound the check judged before the links-off baseline existed).
    Per site, release -> its delivery at the hub minus its compute.

    Predicted: the analytic per-site figures (bytes over the link each way, added: the
    sequential assumption) and `predict.transfer_step`'s step model, downloads after the
    last delivery (sequential) and overlapped with the uploads (progressive finalize).
    """

    label: str
    uplink_bytes: float  # real bytes per site and step, measured (bytes sent x S)
    downlink_bytes: float  # real bytes of the global update (wire size of its codec)
    uplink_s: dict[str, float]  # per site: measured bytes over its link
    downlink_s: dict[str, float]  # per site: the update over its link
    compute_s: dict[str, float]  # per site: mean compute per step
    measured_wall_s: float  # mean per step (steps with a download), x S + the burst
    wall_minus_compute_s: float  # measured_wall_s - the slowest site's compute
    site_comm_s: dict[str, float]  # per site: release -> delivery - compute (+ burst)
    measured_steps: int  # steps that began with a download (nan figures when 0)
    sequential_comm_s: float  # predicted: the step model, downloads after the uploads
    overlapped_comm_s: float  # predicted: downloads overlapping the uploads
    links_s: float = float("nan")  # wall(on) - wall(off) + burst, mean per step (nan: no
    # links-off run)
    links_off_wall_s: float = float("nan")  # wall(off), mean per step, x S
    services_run_s: float = float("nan")  # wall(off) - slowest compute, run seconds
    time_scale: float = 1.0
    # Per site, real seconds per step its emulated links were busy, measured from the
    # uploader's token buckets: the delta up (plus the burst) and the update down. A
    # cross-check of `links_s`: busy time is not step time (a link busy while another
    # site computes costs the step nothing; up and down may overlap).
    link_up_s: dict[str, float] = field(default_factory=dict)
    link_down_s: dict[str, float] = field(default_factory=dict)
    # Half-width of the 95 % confidence interval of `links_s`, from the spread of the
    # per-step differences (nan: fewer than two).
    links_ci_s: float = float("nan")
    # The judged figure: per step, the slowest uplink's busy time plus the slowest
    # downlink's (token buckets, measured), mean x S plus the burst (nan: no reports).
    links_bound_s: float = float("nan")

    def comm_s(self, name: str) -> float:
        """Predicted, sequential: up + down over the site's link."""
        return self.uplink_s[name] + self.downlink_s[name]

    @property
    def measured_comm_s(self) -> float:
        """The communication time per step the check judges: an upper bound of what the
        links add to a step, from their measured busy time (`links_bound_s`)."""
        return self.links_bound_s

    @property
    def services_s(self) -> float:
        """The services' own time per step x S (an upper bound of its real-scale value)."""
        return self.services_run_s * self.time_scale

    @property
    def slowest_compute_s(self) -> float:
        return max(self.compute_s.values())

    @property
    def projected_wall_s(self) -> float:
        """Per step, from the measured wall time (the projection's basis)."""
        return self.measured_wall_s


def downloading_steps(r: RunResult) -> list[MeasuredStep]:
    """The measured steps that began with a download (their plan has one)."""
    planned = {p.step for p in r.plans if p.download_s}
    return [m for m in r.steps if m.step in planned]


def step_compute_s(r: RunResult, m: MeasuredStep) -> dict[str, float]:
    """Each site's compute in step `m`, real seconds: as its trainer reported it, else as
    drawn for it."""
    plan = next((p for p in r.plans if p.step == m.step), None)
    out: dict[str, float] = {}
    for name in m.arrive_s:
        obs = m.participants.get(name)
        if obs is not None and obs.compute_s > 0:
            out[name] = obs.compute_s * r.scenario.time_scale
        elif plan is not None and name in plan.compute_s:
            out[name] = plan.compute_s[name]
    return out


def codec_figures(r: RunResult) -> CodecFigures:
    s = r.scenario
    S = s.time_scale
    sent = [o.bytes_sent for m in r.steps for o in m.participants.values() if o.bytes_sent]
    up_bytes = statistics.fmean(sent) * S if sent else float(s.uplink_bytes_run) * S
    down_bytes = float(s.downlink_bytes_run) * S
    links = {p.name: p.bandwidth_bps for p in s.participants}
    up = {n: up_bytes / b if b > 0 else 0.0 for n, b in links.items()}
    down = {p.name: download_seconds(p, s) for p in s.participants}
    compute = {
        n: statistics.fmean(p.compute_s[n] for p in r.plans if n in p.compute_s) for n in s.names
    }
    burst = max(burst_real_seconds(p, s) for p in s.participants)
    walls, comms, per_site = [], [], {n: [] for n in s.names}
    measured = downloading_steps(r)
    for m in measured:
        c = step_compute_s(r, m)
        walls.append(m.wall_s * S + burst)
        comms.append(m.wall_s * S + burst - max(c.values()))
        for name, at in m.arrive_s.items():
            if name in c and name in per_site:
                per_site[name].append(at * S + burst - c[name])
    nan = float("nan")
    up_sizes = chunk_sizes(up_bytes, s.chunk_mib * MIB)  # a real site's chunks
    down_sizes = chunk_sizes(down_bytes, down_bytes / max(1, len(up_sizes)))
    link = {n: Link(b, b) for n, b in links.items()}
    predicted = [
        transfer_step(compute, link, up_sizes, down_sizes, overlapped).comm_s
        for overlapped in (False, True)
    ]
    return CodecFigures(
        label=s.codec.label,
        uplink_bytes=up_bytes,
        downlink_bytes=down_bytes,
        uplink_s=up,
        downlink_s=down,
        compute_s=compute,
        measured_wall_s=statistics.fmean(walls) if walls else nan,
        wall_minus_compute_s=statistics.fmean(comms) if comms else nan,
        site_comm_s={n: statistics.fmean(v) if v else nan for n, v in per_site.items()},
        measured_steps=len(walls),
        sequential_comm_s=predicted[0],
        overlapped_comm_s=predicted[1],
        time_scale=S,
        link_up_s=_busy(r, lambda o: o.upload_link_s, burst),
        link_down_s=_busy(r, lambda o: o.download_s, 0.0),
        links_bound_s=_links_bound(r, burst),
        **_links_off_figures(r, measured, burst),
    )


def _busy(
    r: RunResult, seconds: Callable[[ParticipantObs], float], extra: float
) -> dict[str, float]:
    """Per site, the mean over steps of a link's busy time (run seconds, as the uploader
    reported it) x S, plus `extra` real seconds; steps that report none are left out."""
    out: dict[str, float] = {}
    for name in r.scenario.names:
        values = [seconds(m.participants[name]) for m in r.steps if name in m.participants]
        values = [v for v in values if v > 0]
        out[name] = statistics.fmean(values) * r.scenario.time_scale + extra if values else 0.0
    return out


def _links_bound(r: RunResult, burst: float) -> float:
    """Mean over the steps whose sites all reported their links' busy time of (the
    slowest uplink's + the slowest downlink's) x S, plus the burst (nan: none reported).

    An upper bound of what the links add to a step: a step's critical path crosses the
    uplinks while deltas travel (in parallel: at most the longest upload) and the
    downlinks while the update comes back (at most the longest download); it can gain
    less (downloads overlap uploads, a link busy while its site waits costs nothing),
    never more. Measured from the token buckets, it is immune to the CPU load of the
    machine the run shares, unlike a difference of two runs' wall times."""
    S = r.scenario.time_scale
    values = []
    for m in r.steps:
        obs = list(m.participants.values())
        if obs and all(o.upload_link_s > 0 and o.download_s > 0 for o in obs):
            values.append(max(o.upload_link_s for o in obs) + max(o.download_s for o in obs))
    return statistics.fmean(values) * S + burst if values else float("nan")


def _links_off_figures(
    r: RunResult, measured: list[MeasuredStep], burst: float
) -> dict[str, float]:
    """The links' share of each step and the services' own time, from the run's twin on
    unlimited links (none: nan)."""
    off = r.links_off
    nan = float("nan")
    if off is None:
        return {}
    S = r.scenario.time_scale
    added = links_added_s(r.steps, off.steps, (m.step for m in measured))
    free = [m for m in off.steps if m.step in added]
    services = [m.wall_s - max(step_compute_s(off, m).values()) / S for m in free]
    spread = statistics.stdev(added.values()) if len(added) > 1 else nan
    return {
        "links_s": statistics.fmean(added.values()) * S + burst if added else nan,
        "links_ci_s": 1.96 * spread / math.sqrt(len(added)) * S,
        "links_off_wall_s": statistics.fmean(m.wall_s for m in free) * S if free else nan,
        "services_run_s": statistics.fmean(services) if services else nan,
    }


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

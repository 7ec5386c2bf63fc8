"""Communication per step of a compared codec's run, in real time and bytes: what one
step costs at the scenario's size (`CodecFigures`), measured (the run's wall time, its
twin's on unlimited links, the emulated links' busy time) and predicted (the step model),
as the seed-consortium check judges and the report shows them. Pure: plain values in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from foldfed.loadtest.predict import (
    Link,
    StepPlan,
    burst_real_seconds,
    chunk_sizes,
    download_seconds,
    transfer_step,
)
from foldfed.loadtest.scenario import MIB, Scenario
from foldfed.loadtest.timeline import MeasuredStep, ParticipantObs, links_added_s


class CodecRun(Protocol):
    """What these figures read of a run (verdicts.RunResult has it; no import of it here,
    so that the verdicts may use the figures)."""

    @property
    def scenario(self) -> Scenario: ...
    @property
    def steps(self) -> list[MeasuredStep]: ...
    @property
    def plans(self) -> list[StepPlan]: ...
    @property
    def links_off(self) -> CodecRun | None: ...


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


def downloading_steps(r: CodecRun) -> list[MeasuredStep]:
    """The measured steps that began with a download (their plan has one)."""
    planned = {p.step for p in r.plans if p.download_s}
    return [m for m in r.steps if m.step in planned]


def step_compute_s(r: CodecRun, m: MeasuredStep) -> dict[str, float]:
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


def codec_figures(r: CodecRun) -> CodecFigures:
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


def _reported(r: CodecRun, m: MeasuredStep, name: str) -> bool:
    """Whether `name`'s uploader reported step `m`'s link times: its upload finished (an
    upload within the token bucket's burst waits 0 s), and on a limited link the update's
    download (the final release reports the last one)."""
    o = m.participants.get(name)
    if o is None or o.bytes_sent <= 0:
        return False
    return o.download_s > 0 or r.scenario.participant(name).bandwidth_bps <= 0


def _busy(
    r: CodecRun, seconds: Callable[[ParticipantObs], float], extra: float
) -> dict[str, float]:
    """Per site, the mean over the steps it reported (`_reported`) of a link's busy time
    (run seconds, as the uploader measured it) x S, plus `extra` real seconds (0: none)."""
    out: dict[str, float] = {}
    for name in r.scenario.names:
        values = [seconds(m.participants[name]) for m in r.steps if _reported(r, m, name)]
        out[name] = statistics.fmean(values) * r.scenario.time_scale + extra if values else 0.0
    return out


def _links_bound(r: CodecRun, burst: float) -> float:
    """Mean over the steps whose sites all reported their links' busy time (`_reported`)
    of (the slowest uplink's + the slowest downlink's) x S, plus the burst (nan: none).

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
        if obs and all(_reported(r, m, name) for name in m.participants):
            values.append(max(o.upload_link_s for o in obs) + max(o.download_s for o in obs))
    return statistics.fmean(values) * S + burst if values else float("nan")


def _links_off_figures(r: CodecRun, measured: list[MeasuredStep], burst: float) -> dict[str, float]:
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

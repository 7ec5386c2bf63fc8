"""What a run measured, step by step, from the barrier's own records (hub clock) and the
participants' upload events. Pure: the runner reads the store and the events and passes
plain values in; all times here are run seconds (multiply by the time scale for real)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from foldfed.loadtest.predict import attribute_idle


@dataclass(frozen=True)
class StepObs:
    """One global step as the barrier recorded it (`barrier.machine.StepRecord`)."""

    step: int
    cycle: int
    opened_ms: int
    delivered_ms: Mapping[str, int]
    closed_ms: int | None
    released_ms: int | None


@dataclass(frozen=True)
class ParticipantObs:
    """One participant's step from its uploader's UPLOAD_FINISHED / RELEASE_RECEIVED."""

    compute_s: float = 0.0
    upload_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: float = 0.0
    # Seconds the emulated links held the step's bytes: its delta up, the update it made
    # down (the uploader's token buckets; 0 on unlimited links).
    upload_link_s: float = 0.0
    download_s: float = 0.0
    # The upload's chunk pipeline alone: first chunk published to last confirmed.
    upload_send_s: float = 0.0


@dataclass(frozen=True)
class MeasuredStep:
    step: int
    cycle: int
    # From this step's release to the next release (or the cycle's final release).
    wall_s: float
    # When each participant's delivery was recorded, after the release.
    arrive_s: dict[str, float]
    idle_s: dict[str, float]
    # The hub's share: last delivery recorded → next release out (finalize + release).
    hub_s: float
    participants: dict[str, ParticipantObs] = field(default_factory=dict)

    @property
    def last(self) -> str:
        return max(self.arrive_s.items(), key=lambda kv: (kv[1], kv[0]))[0]


def measure(
    steps: Iterable[StepObs], metrics: Mapping[tuple[int, str], ParticipantObs]
) -> list[MeasuredStep]:
    """Complete steps only (released); in step order."""
    out: list[MeasuredStep] = []
    for s in sorted(steps, key=lambda s: s.step):
        if s.released_ms is None or s.closed_ms is None or not s.delivered_ms:
            continue
        arrive = {p: (ms - s.opened_ms) / 1000.0 for p, ms in s.delivered_ms.items()}
        out.append(
            MeasuredStep(
                step=s.step,
                cycle=s.cycle,
                wall_s=(s.released_ms - s.opened_ms) / 1000.0,
                arrive_s=arrive,
                idle_s=attribute_idle(arrive),
                hub_s=(s.released_ms - s.closed_ms) / 1000.0,
                participants={
                    p: metrics.get((s.step, p), ParticipantObs()) for p in s.delivered_ms
                },
            )
        )
    return out


def idle_totals(steps: Iterable[MeasuredStep]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in steps:
        for p, v in s.idle_s.items():
            total[p] = total.get(p, 0.0) + v
    return total


def median_hub_s(steps: Iterable[MeasuredStep]) -> float:
    values = [s.hub_s for s in steps]
    return statistics.median(values) if values else 0.0


def overhead_s(steps: Iterable[MeasuredStep], done_s: Mapping[int, float]) -> float:
    """Median of (measured wall - the slowest participant's planned compute + upload), in
    run seconds: everything the services add to a step (release delivery, spool hand-offs,
    ingest, finalize, release). `done_s`: step → planned max_i(d_i + c_i + u_i), run seconds."""
    values = [s.wall_s - done_s[s.step] for s in steps if s.step in done_s]
    return statistics.median(values) if values else 0.0


@dataclass(frozen=True)
class Goodput:
    bytes_sent: float
    seconds: float
    rate_bps: float
    burst_bytes: float

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def link_share(self) -> float:
        """Bytes sent / bytes the emulated link allowed in the same time (rate x time plus
        the token bucket's one burst): 1.0 means the link was never left idle."""
        allowed = self.rate_bps * self.seconds + self.burst_bytes
        return self.bytes_sent / allowed if allowed > 0 else 0.0


def goodput(uploads: Iterable[ParticipantObs], rate_bps: float, burst_bytes: float) -> Goodput:
    """Over several uploads of one participant: each starts with a full bucket (the link
    idles while it computes), so each may use one burst. The seconds are the chunk
    pipeline's (first publish to last confirm) where the uploader reports them: the
    manifest, have and receipt round trips are not the link's, and with progressive
    finalize a receipt may queue behind the update's chunks on the participant's queue
    (a real link delivers in order too); the whole upload where it does not."""
    uploads = [u for u in uploads if u.bytes_sent > 0]
    return Goodput(
        bytes_sent=sum(u.bytes_sent for u in uploads),
        seconds=sum(u.upload_send_s or u.upload_s for u in uploads),
        rate_bps=rate_bps,
        burst_bytes=burst_bytes * len(uploads),
    )


@dataclass(frozen=True)
class PathSkew:
    """How much longer `name`'s delivery path (upload start → receipt, service time that a
    time scale does not compress) took than `other`'s, and in how many steps `name`'s
    upload began before `other`'s delivery was recorded at the hub (queued behind it)."""

    mean_s: float
    steps: int
    queued: int


def path_skew(steps: Iterable[MeasuredStep], name: str, other: str) -> PathSkew:
    diffs: list[float] = []
    queued = 0
    for s in steps:
        a, b = s.participants.get(name), s.participants.get(other)
        if a is None or b is None or not (a.upload_s > 0 and b.upload_s > 0):
            continue
        diffs.append(a.upload_s - b.upload_s)
        if name in s.arrive_s and other in s.arrive_s:
            queued += s.arrive_s[name] - a.upload_s < s.arrive_s[other]
    return PathSkew(statistics.fmean(diffs) if diffs else 0.0, len(diffs), queued)


def straggler_real_idle(
    steps: Iterable[MeasuredStep], name: str, scale: float, transfer_s: Mapping[str, float]
) -> list[float]:
    """Per step, the idle charged to `name` converted to REAL seconds, with the services'
    uncompressed time converted at 1x instead of S.

    The barrier's wait on `name` (its lead over the next-to-last delivery, run seconds) is
    compressed compute and transfer, plus how much longer `name`'s delivery path took than
    the other's. That path (upload start → receipt: manifest, chunks, ingest, receipt) is
    service time apart from the rate-limited transfer (`transfer_s`, run seconds per
    participant), and a time scale does not compress it: in a compressed run the
    straggler's upload may start while the next-slowest's is still at the hub, queue
    behind it or share the CPUs with it, and that wait (which real sites, seconds apart,
    never see) would be multiplied by S with the rest. So: S x lead - (S - 1) x (path
    skew net of transfer). Steps without both uploads' metrics keep S x lead."""
    out: list[float] = []
    for s in steps:
        idle = s.idle_s.get(name, 0.0)
        if idle <= 0:
            out.append(0.0)
            continue
        ordered = sorted(s.arrive_s.items(), key=lambda kv: (kv[1], kv[0]))
        other = ordered[-2][0]
        a, b = s.participants.get(name), s.participants.get(other)
        skew = 0.0
        if a is not None and b is not None and a.upload_s > 0 and b.upload_s > 0:
            skew = (a.upload_s - transfer_s.get(name, 0.0)) - (
                b.upload_s - transfer_s.get(other, 0.0)
            )
        out.append(max(0.0, scale * idle - (scale - 1) * skew))
    return out


def links_added_s(
    linked: Iterable[MeasuredStep], free: Iterable[MeasuredStep], steps: Iterable[int]
) -> dict[int, float]:
    """Per step (run seconds), what the links added to it: its wall time with the links
    emulated minus the same step's wall time on unlimited links, in a run with the same
    seeds (same compute draws, same bytes). The services' own time (hand-offs, ingest,
    finalize, the codecs' CPU) is in both and cancels; what remains is the transfers' share
    of the step, overlaps and queueing behind transfers included. Only `steps` that both
    runs released are paired."""
    off = {m.step: m.wall_s for m in free}
    wanted = set(steps)
    return {m.step: m.wall_s - off[m.step] for m in linked if m.step in wanted and m.step in off}


@dataclass(frozen=True)
class SpoolTimes:
    """When a participant's spool saw its delta of a step, wall-clock ms (the file times):
    handed to the uploader (the delta's description written, after its tensors) and
    marked sent (renamed once the hub's receipt reached the site)."""

    handoff_ms: int
    sent_ms: int


@dataclass(frozen=True)
class StepPhases:
    """Where one step's wall time went, along its critical path (the last site to deliver),
    run seconds. The parts add up to the step's wall time, release to release."""

    step: int
    site: str
    # Release → the site's delta handed to its uploader, minus compute: receiving the
    # release and the update, applying it (θ_t built and committed), writing the delta.
    before_upload_s: float
    compute_s: float
    # The upload's chunk pipeline (first chunk published → last confirmed) ...
    upload_send_s: float
    # ... and the rest of hand-off → delivery recorded at the hub: the uploader's pick-up,
    # coding, manifest and have round trip, the hub's ingest of the tail.
    upload_rest_s: float
    # Last delivery recorded → next release: finalize's tail, commit, release.
    hub_s: float
    # Apart, not in the sum: delivery recorded at the hub → the receipt at the site (it
    # queues behind the update's chunks, broadcast meanwhile, on the site's one queue).
    receipt_after_s: float | None = None

    @property
    def wall_s(self) -> float:
        return (
            self.before_upload_s
            + self.compute_s
            + self.upload_send_s
            + self.upload_rest_s
            + self.hub_s
        )


def step_phases(
    step: MeasuredStep, opened_ms: int | None = None, spool: SpoolTimes | None = None
) -> StepPhases:
    """`spool`: the critical site's spool times for this step (with `opened_ms`, the
    step's release); without them the hand-off is inferred from the upload's own time,
    which ends at the site's receipt (later than the hub's record: receipt_after_s)."""
    site = step.last
    obs = step.participants.get(site, ParticipantObs())
    arrive = step.arrive_s[site]
    send = min(obs.upload_send_s, obs.upload_s)
    receipt = None
    if spool is not None and opened_ms is not None:
        handoff = (spool.handoff_ms - opened_ms) / 1000.0
        receipt = (spool.sent_ms - opened_ms) / 1000.0 - arrive
    else:
        handoff = arrive - obs.upload_s
    return StepPhases(
        step=step.step,
        site=site,
        before_upload_s=handoff - obs.compute_s,
        compute_s=obs.compute_s,
        upload_send_s=send,
        upload_rest_s=arrive - handoff - send,
        hub_s=step.hub_s,
        receipt_after_s=receipt,
    )

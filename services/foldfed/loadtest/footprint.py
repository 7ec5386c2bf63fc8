"""What a run held while it ran: the hub's resident memory and the bytes on disk of the hub
and the participants, from samples taken at a fixed interval (loadtest/sampler.py), cut
into global steps with the barrier's own records.

Pure: samples and step records in, figures out. Times are wall-clock milliseconds, the
barrier's clock (`messages.now_ms`), so a sample falls in step t when it was taken between
t's release and t+1's.

- hub peak RSS: the largest sum, at one sample, of the resident memory of the hub's
  processes (RabbitMQ's beam and its helpers, the aggregator, the barrier, the monitor,
  and their children). A peak between two samples is missed: the interval bounds how
  short a peak may be and still count.
- disk per step: the largest hub (state folder) and participants' (spools, all together)
  bytes seen during the step.
- growth after warm-up: the median of the last `window` steps' disk peaks minus the
  median of the `window` steps right after warm-up. Medians, not the extremes: a step's
  peak depends on where in the step a sample fell, and what retention must keep flat is
  the level, not one sample.
- records: what the policy keeps for ever for audit (docs/retention.md: manifests, signed
  step records, the SQLite logs, a participant's sent and release records), a few small
  files per step that grow with the number of steps by design. They are counted apart
  (`is_kept_record`), and the growth is judged on the rest: the chunks, deltas, updates
  and models that retention bounds.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from foldfed.loadtest.timeline import StepObs

# Paths (relative to the hub's state folder or a spool) that docs/retention.md keeps for
# ever: audit records, small, one or a few per step.
_KEPT_RECORDS = re.compile(
    r"""(
        store/manifests/.*                # the hub: every member's manifest
      | records/step-\d+\.dsse\.json       # the hub's signed step records
      | [^/]*\.sqlite3(-wal|-shm)?         # the hub's ledger and barrier logs
      | uploads/step-\d+/manifest\.pb      # a participant: what it sent ...
      | coding/(delta-\d+\.manifest|step-\d+\.json)
      | outbox/[^/]*\.sent
      | inbox/release-\d+\.json            # ... and what it was released
    )""",
    re.VERBOSE,
)


def is_kept_record(relative_path: str) -> bool:
    """Whether a file (its path under the hub's state folder or a spool) is one of the
    records the retention policy keeps for ever."""
    return _KEPT_RECORDS.fullmatch(relative_path) is not None


@dataclass(frozen=True)
class Sample:
    at_ms: int
    # Resident bytes per hub process name at this instant (children folded in).
    hub_rss: Mapping[str, int] = field(default_factory=dict)
    # Bytes on disk: the hub's state folder, every participant's spool together, and the
    # broker's own data folder (its message store).
    hub_disk: int = 0
    participants_disk: int = 0
    broker_disk: int = 0
    # Of hub_disk + participants_disk: the records kept for ever (`is_kept_record`).
    records_disk: int = 0

    @property
    def hub_rss_total(self) -> int:
        return sum(self.hub_rss.values())


@dataclass(frozen=True)
class RssPeak:
    total: int
    # Each process's share at the instant of the total's peak, and its own peak apart.
    at_peak: Mapping[str, int]
    own_peaks: Mapping[str, int]
    samples: int


def rss_peak(samples: Sequence[Sample]) -> RssPeak:
    if not samples:
        return RssPeak(0, {}, {}, 0)
    top = max(samples, key=lambda s: s.hub_rss_total)
    own: dict[str, int] = {}
    for s in samples:
        for name, value in s.hub_rss.items():
            own[name] = max(own.get(name, 0), value)
    return RssPeak(top.hub_rss_total, dict(top.hub_rss), own, len(samples))


@dataclass(frozen=True)
class StepDisk:
    step: int
    hub: int
    participants: int
    broker: int
    samples: int
    # Records kept for ever (hub and participants), at the same sample as `bulk`'s peak.
    records: int = 0
    # Hub and participants without those records: what retention bounds.
    bulk: int = 0

    @property
    def total(self) -> int:
        """Hub and participants, everything (the broker's store is apart)."""
        return self.hub + self.participants


def disk_per_step(samples: Iterable[Sample], steps: Iterable[StepObs]) -> list[StepDisk]:
    """Per released step, the largest bytes on disk seen between its release and the next
    one; a step no sample fell in is left out."""
    ordered = sorted(samples, key=lambda s: s.at_ms)
    out: list[StepDisk] = []
    for obs in sorted(steps, key=lambda o: o.step):
        if obs.released_ms is None:
            continue
        inside = [s for s in ordered if obs.opened_ms <= s.at_ms < obs.released_ms]
        if not inside:
            continue
        top = max(inside, key=lambda s: s.hub_disk + s.participants_disk - s.records_disk)
        out.append(
            StepDisk(
                step=obs.step,
                hub=max(s.hub_disk for s in inside),
                participants=max(s.participants_disk for s in inside),
                broker=max(s.broker_disk for s in inside),
                samples=len(inside),
                records=top.records_disk,
                bulk=top.hub_disk + top.participants_disk - top.records_disk,
            )
        )
    return out


@dataclass(frozen=True)
class DiskGrowth:
    """Growth of the disk level after warm-up, bytes: what retention bounds (`bulk`: hub
    and participants without the records kept for ever), everything, and each part."""

    bulk: int
    total: int
    hub: int
    participants: int
    # Least squares slopes over the steps after warm-up, bytes per step: of the bulk, and
    # of the records kept for ever (the audit trail's cost per step).
    slope_per_step: float
    records_per_step: float
    warmup: int
    window: int
    judged_steps: int


def growth_after_warmup(series: Sequence[StepDisk], warmup: int, window: int = 10) -> DiskGrowth:
    """See the module docstring; `window` shrinks to half of what follows warm-up."""
    after = [d for d in series if d.step > warmup]
    if len(after) < 2:
        return DiskGrowth(0, 0, 0, 0, 0.0, 0.0, warmup, 0, len(after))
    window = max(1, min(window, len(after) // 2))
    head, tail = after[:window], after[-window:]

    def rise(key: str) -> int:
        def level(part: list[StepDisk]) -> float:
            return statistics.median(getattr(d, key) for d in part)

        return round(level(tail) - level(head))

    steps = [d.step for d in after]
    return DiskGrowth(
        bulk=rise("bulk"),
        total=rise("total"),
        hub=rise("hub"),
        participants=rise("participants"),
        slope_per_step=_slope(steps, [d.bulk for d in after]),
        records_per_step=_slope(steps, [d.records for d in after]),
        warmup=warmup,
        window=window,
        judged_steps=len(after),
    )


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0

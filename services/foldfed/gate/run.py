"""One gate run: measure, judge, sign the readiness record, write it, publish it.

The record is published as an `Event` of kind "readiness" on the events exchange under
`topology.READINESS_KEY` ("uploader.readiness"): the participant's broker user may already publish
there (topology.participant_permissions: its uploader's events), so gating widens no
permission, and the broker stamps the user id the hub believes (the monitor checks it
against the record's participant). The hub's monitor keeps it with every other event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.dsse import Envelope
from foldfed.durable import atomic_write
from foldfed.errors import FoldfedError
from foldfed.gate import checks, probes
from foldfed.gate.checks import CheckResult, Result, Terms
from foldfed.gate.next_cycle import NextCycle, adopt_theta0
from foldfed.gate.record import readiness_statement, sign_record
from foldfed.messages import Event, now_ms
from foldfed.signing import SigningKey
from foldfed.trainer.backend import TrainerSettings

READINESS_KEY = topology.READINESS_KEY  # the barrier binds it too (barrier/gatekeeper.py)
SERVICE = "gate"


@dataclass(frozen=True)
class GateOptions:
    participant: str
    bus: BusSettings
    key: SigningKey
    terms: Terms
    spool_dir: Path
    initial_model: Path | None
    # The trainer's settings, or the configuration error that kept them from loading.
    trainer: TrainerSettings | str
    datacard: Path | None = None
    data_dir: Path | None = None
    hub_clock: str | None = None
    out: Path | None = None  # default: <spool>/gate/readiness-c<cycle>.dsse.json
    publish: bool = True
    split: Path | None = None  # the local split configuration (sample.json)
    # Gating for the cycle after a published release (gate/next_cycle.py): once ready,
    # its weights become the spool's model at the release's step.
    after_release: NextCycle | None = None


@dataclass(frozen=True)
class GateRun:
    results: tuple[CheckResult, ...]
    envelope: Envelope
    path: Path
    publish_error: str  # empty: published (or not asked to)

    @property
    def ready(self) -> bool:
        return checks.is_ready(self.results)


@dataclass(frozen=True)
class Measured:
    results: list[CheckResult]  # in `checks.CHECK_NAMES` order
    theta0_digest: str  # θ0 as held here, hex ("" without a file)
    split: dict[str, object] | None  # the blind-split reference the record carries


def measure(opts: GateOptions, report: Callable[[str], None] = lambda _: None) -> Measured:
    """Every check's result, θ0's digest and the split reference as held here."""
    terms = opts.terms
    report("broker")
    broker = asyncio.run(probes.probe_broker(opts.bus.amqp_url, opts.participant))
    report("clock")
    clock = probes.probe_clock(opts.hub_clock)
    digest, size, theta0_error = probes.probe_theta0(opts.initial_model)
    if digest is None:
        disk = checks.skipped(checks.DISK, "no θ0 file to size the model by")
    else:
        disk = checks.judge_disk(probes.free_bytes(opts.spool_dir), size, terms)
    report("compute")
    compute = _compute(opts, digest)
    model = opts.trainer.model if isinstance(opts.trainer, TrainerSettings) else ""
    data = probes.probe_data(
        opts.datacard, opts.data_dir, opts.key.verify_key(), model.startswith("openfold3")
    )
    split, published = probes.probe_split(opts.split)
    results = [
        checks.judge_broker(broker, terms),
        checks.judge_clock(clock, terms),
        disk,
        compute,
        checks.judge_data(data, terms),
        checks.judge_split(split, terms),
        checks.judge_theta0(digest, terms, theta0_error),
    ]
    return Measured(results, digest or "", published)


def _compute(opts: GateOptions, theta0_digest: str | None) -> CheckResult:
    if isinstance(opts.trainer, str):
        return checks.failed(
            checks.COMPUTE,
            f"the trainer's settings do not load: {opts.trainer}",
            "fix the trainer's environment (the variable the error names)",
        )
    if theta0_digest is None:
        return checks.skipped(checks.COMPUTE, "no θ0 file to train from")
    return checks.judge_compute(probes.probe_compute(opts.trainer), opts.terms)


def run_gate(opts: GateOptions, report: Callable[[str], None] = lambda _: None) -> GateRun:
    measured = measure(opts, report)
    results = measured.results
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    statement = readiness_statement(
        opts.participant,
        opts.terms,
        results,
        measured.theta0_digest,
        measured_at,
        split=measured.split,
    )
    envelope = sign_record(statement, opts.key)
    path = opts.out or opts.spool_dir / "gate" / f"readiness-c{opts.terms.cycle}.dsse.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(envelope.to_json(), indent=1) + "\n").encode())
    if opts.after_release is not None and checks.is_ready(results):
        report("spool")
        adopt_theta0(opts.after_release, opts.spool_dir)
    error = ""
    if opts.publish:
        report("publish")
        error = asyncio.run(_publish(opts, envelope, results))
    return GateRun(tuple(results), envelope, path, error)


async def _publish(opts: GateOptions, envelope: Envelope, results: list[CheckResult]) -> str:
    """Publish the record (module docstring); the error in words, or ""."""
    failed = sum(r.result is Result.FAIL for r in results)
    return await publish_record(opts.bus, opts.participant, envelope, opts.terms.cycle, failed)


async def publish_record(
    bus_settings: BusSettings, participant: str, envelope: Envelope, cycle: int, failed: int
) -> str:
    """Publish a signed readiness record as the participant's readiness Event; the error
    in words, or "" (`foldfed gate publish` sends a written record again with it)."""
    event = Event(
        kind="readiness",
        service=SERVICE,
        participant=participant,
        step=0,
        detail=json.dumps(envelope.to_json(), separators=(",", ":")),
        metrics={
            "cycle": float(cycle),
            "ready": float(failed == 0),
            "checks_failed": float(failed),
        },
        unix_ms=now_ms(),
    )
    try:
        bus = await Bus.connect(bus_settings, name=f"gate-{participant}", timeout=15.0)
    except FoldfedError as exc:
        return str(exc)
    try:
        await bus.publish(topology.EVENTS_EXCHANGE, READINESS_KEY, event, mandatory=False)
    except FoldfedError as exc:
        return str(exc)
    finally:
        await bus.close()
    return ""

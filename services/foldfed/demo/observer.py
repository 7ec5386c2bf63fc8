"""Watches a federated run from the events exchange, the way an operator's tool would:
who delivered, bytes moved, releases, model reports. Read-only; needs a user that may
declare its own exclusive queue (the hub's)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aio_pika
import structlog

from foldfed import topology
from foldfed.bus import close_connection
from foldfed.domain import (
    AnyMessage,
    DeliveryReceipt,
    Event,
    Manifest,
    ModelReport,
    StepFinalized,
)
from foldfed.errors import DecodeError
from foldfed.messages import decode

log = structlog.get_logger(__name__)


@dataclass
class ParticipantStep:
    compute_s: float = 0.0
    upload_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: float = 0.0
    # Seconds the emulated links held this step's bytes: the delta's upload, and the
    # download of the update it made (load tests; 0 on unlimited links).
    upload_link_s: float = 0.0
    download_s: float = 0.0
    # The upload's chunk pipeline alone (first publish to last confirm).
    upload_send_s: float = 0.0
    delivered_at: float | None = None
    train_loss: float | None = None


@dataclass
class StepRecord:
    step: int
    opened_at: float | None = None
    finalized_at: float | None = None
    participants: dict[str, ParticipantStep] = field(default_factory=dict)

    def of(self, participant: str) -> ParticipantStep:
        return self.participants.setdefault(participant, ParticipantStep())


@dataclass
class RunRecord:
    """Everything the summary needs, filled in as events arrive."""

    participants: tuple[str, ...]
    steps: int
    started_at: float = field(default_factory=time.monotonic)
    by_step: dict[int, StepRecord] = field(default_factory=dict)
    # (step, participant) -> model report
    reports: dict[tuple[int, str], ModelReport] = field(default_factory=dict)
    expected_models: dict[int, bytes] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    cycle_done: bool = False
    # step -> bytes of the global update's payload (its manifest's payload_size): what each
    # participant downloads. Counted from the events, since retention deletes old updates.
    update_bytes: dict[int, int] = field(default_factory=dict)

    def step(self, step: int) -> StepRecord:
        return self.by_step.setdefault(step, StepRecord(step))

    def finished(self) -> bool:
        final = self.steps + 1
        return self.cycle_done and all((final, p) in self.reports for p in self.participants)

    def record(self, msg: AnyMessage, now: float) -> None:
        match msg:
            case DeliveryReceipt():
                self.step(msg.step).of(msg.participant).delivered_at = now
            case StepFinalized():
                self.step(msg.step).finalized_at = now
                self.expected_models[msg.step + 1] = msg.model_digest
                self._record_update(msg)
            case ModelReport():
                self.reports[(msg.step, msg.participant)] = msg
            case Event():
                self._record_event(msg, now)

    def _record_update(self, msg: StepFinalized) -> None:
        try:
            manifest = decode("foldfed.v1.DeltaManifest", msg.update_manifest)
        except DecodeError as exc:
            log.warning("undecodable update manifest", step=msg.step, error=str(exc))
            return
        if isinstance(manifest, Manifest):
            self.update_bytes[msg.step] = manifest.payload_size

    def _record_event(self, event: Event, now: float) -> None:
        m = event.metrics
        if event.kind == "upload_finished":
            entry = self.step(event.step).of(event.participant)
            entry.compute_s = m.get("compute_s", 0.0)
            entry.upload_s = m.get("upload_s", 0.0)
            entry.bytes_sent = m.get("bytes_sent", 0.0)
            entry.upload_link_s = m.get("upload_link_s", 0.0)
            entry.upload_send_s = m.get("upload_send_s", 0.0)
            entry.train_loss = m.get("train_loss")
        elif event.kind == "release_received" and event.step > 1:
            # The wait ended with release t+1: it belongs to step t.
            entry = self.step(event.step - 1).of(event.participant)
            entry.wait_s = m.get("wait_s", 0.0)
            # Release t+1 reports the download of update t, made from step t's deltas.
            entry.download_s = m.get("download_s", 0.0)
        elif event.kind == "step_released":
            self.step(event.step).opened_at = now
        elif event.kind == "model_mismatch":
            self.mismatches.append(event.detail)
        elif event.kind == "cycle_done":
            # The final release ends the last step as a normal release would.
            self.step(event.step).opened_at = now
            self.cycle_done = True


class Observer:
    def __init__(self, admin_url: str, record: RunRecord) -> None:
        self.admin_url = admin_url
        self.record = record
        self.updates: asyncio.Queue[AnyMessage] = asyncio.Queue()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.admin_url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            msg = decode(message.type, message.body)
        except DecodeError as exc:
            log.warning("undecodable event", error=str(exc))
            return
        self.record.record(msg, time.monotonic())
        self.updates.put_nowait(msg)

    async def close(self) -> None:
        """Bounded: a broker that is gone or blocked must not hold a stop up."""
        if self._connection is not None:
            await close_connection(self._connection, "observer")

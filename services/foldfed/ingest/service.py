"""The ingest service: a thin async shell around IngestLedger.

One message at a time from the hub's ingest queue: decode, authenticate the sender,
let the ledger make it durable (in a worker thread: hashing and fsync never block the
loop), publish the effects with confirms, then ack. A bad message is dead-lettered with
its reason and the sender is told; the step it claims is untouched.
"""

from __future__ import annotations

import asyncio
import sqlite3

import structlog

from foldfed import topology, tracing
from foldfed.bus import Bus, Incoming
from foldfed.config import IngestSettings
from foldfed.errors import FoldfedError, Reject
from foldfed.ingest.ledger import IngestLedger
from foldfed.ingest.rules import Effects
from foldfed.messages import (
    Chunk,
    Event,
    HaveRequest,
    Manifest,
    StepReleased,
    now_ms,
)

log = structlog.get_logger(__name__)
SERVICE = "ingest"
# The span that handles each message type (a child of the sender's span).
_SPAN_OF = {
    "foldfed.v1.DeltaManifest": "ingest.manifest",
    "foldfed.v1.HaveRequest": "ingest.have",
    "foldfed.v1.Chunk": "ingest.chunk",
    "foldfed.v1.StepReleased": "open_step",
    "foldfed.v1.FinalizeRequest": "finalize",
}


class IngestService:
    def __init__(self, settings: IngestSettings, bus: Bus, ledger: IngestLedger) -> None:
        self.settings = settings
        self.bus = bus
        self.ledger = ledger

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.declare_hub_topology(self.settings.participants)
        log.info(
            "ingest ready",
            participants=list(self.settings.participants),
            open_step=self.ledger.open_step,
        )
        await self.bus.consume(
            topology.INGEST_QUEUE, self.handle, stop=stop, prefetch=self.settings.prefetch
        )

    async def handle(self, incoming: Incoming) -> None:
        name = _SPAN_OF.get(incoming.type, "ingest.other")
        with tracing.span(name, **{tracing.BYTES: len(incoming.body)}):
            await self._handle(incoming)

    async def _handle(self, incoming: Incoming) -> None:
        try:
            effects = await self._apply(incoming)
        except Reject as exc:
            tracing.annotate(rejected=exc.reason)
            await self._dead_letter(incoming, exc.reason)
            return
        except (OSError, sqlite3.Error, FoldfedError) as exc:
            # Our fault or the disk's, not the sender's. Try once more; a message that
            # fails twice is parked with the reason instead of looping forever.
            if incoming.redelivered:
                log.error("failed twice; dead-lettering", error=repr(exc), type=incoming.type)
                await self._dead_letter(incoming, f"hub could not process it: {exc!r}")
            else:
                log.error("failed; will retry once", error=repr(exc), type=incoming.type)
                await incoming.raw.reject(requeue=True)
            return
        await self._publish(effects)
        await incoming.raw.ack()

    async def _apply(self, incoming: Incoming) -> Effects:
        msg = incoming.message()
        if isinstance(getattr(msg, "step", None), int):
            structlog.contextvars.bind_contextvars(step=msg.step)  # on every log line after
        tracing.annotate(
            step=getattr(msg, "step", None),
            participant=getattr(msg, "participant", None),
            index=getattr(msg, "index", None),
        )
        match msg:
            case StepReleased():
                if incoming.user_id != self.bus.user:
                    raise Reject(f"only the hub releases steps, not {incoming.user_id!r}")
                return await asyncio.to_thread(self.ledger.on_step_released, msg)
            case Manifest():
                self._authenticate(incoming, msg.participant)
                return await asyncio.to_thread(self.ledger.on_manifest, msg, incoming.body)
            case HaveRequest():
                self._authenticate(incoming, msg.participant)
                return await asyncio.to_thread(self.ledger.on_have_request, msg)
            case Chunk():
                self._authenticate(incoming, msg.participant)
                return await asyncio.to_thread(self.ledger.on_chunk, msg)
        raise Reject(f"{incoming.type} does not belong on the ingest queue")

    def _authenticate(self, incoming: Incoming, claimed: str) -> None:
        """RabbitMQ guarantees user_id is the publishing connection's user, so a
        participant cannot speak for another."""
        if not self.settings.require_sender_identity:
            return
        if incoming.user_id != claimed:
            raise Reject(
                f"forged sender: message claims participant {claimed!r} but was "
                f"published by user {incoming.user_id!r}"
            )

    async def _publish(self, effects: Effects) -> None:
        for reply in effects.replies:
            await self.bus.publish(topology.PARTICIPANT_EXCHANGE, reply.participant, reply)
        for receipt in effects.receipts:
            structlog.contextvars.bind_contextvars(step=receipt.step)
            log.info(
                "delivered",
                participant=receipt.participant,
                chunks=receipt.chunk_count,
                bytes=receipt.payload_size,
                duplicates=receipt.duplicate_chunks,
            )
            await self.bus.publish(topology.PARTICIPANT_EXCHANGE, receipt.participant, receipt)
            # Mandatory: the barrier's queue is bound to this key; losing a receipt would
            # stall the step.
            await self.bus.publish(topology.EVENTS_EXCHANGE, topology.RECEIPT_KEY, receipt)
        for released in effects.released:
            structlog.contextvars.bind_contextvars(step=released.step)
            log.info("step open", step=released.step)

    async def _dead_letter(self, incoming: Incoming, reason: str) -> None:
        """Park the message with its reason and tell the (authenticated) sender."""
        log.warning("rejected", reason=reason, type=incoming.type, user=incoming.user_id)
        event = Event(
            kind="rejected",
            service=SERVICE,
            participant=incoming.user_id or "",
            step=0,
            detail=reason,
            unix_ms=now_ms(),
        )
        await self.bus.publish(topology.EVENTS_EXCHANGE, "ingest.rejected", event, mandatory=False)
        # Only the authenticated sender hears about it: a forged claim cannot spam a victim.
        if incoming.user_id in self.settings.participants:
            await self.bus.publish(topology.PARTICIPANT_EXCHANGE, incoming.user_id, event)
        await self.bus.dead_letter(incoming, reason)


async def run_ingest(settings: IngestSettings, stop: asyncio.Event) -> None:
    ledger = IngestLedger(
        settings.state_dir, settings.participants, settings.first_step, settings.max_payload_bytes
    )
    bus = await Bus.connect(settings.bus, name=SERVICE)
    try:
        await IngestService(settings, bus, ledger).run(stop)
    finally:
        await bus.close()
        ledger.close()

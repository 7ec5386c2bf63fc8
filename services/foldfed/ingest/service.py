"""The ingest service: a thin async shell around IngestLedger.

Messages from the hub's ingest queue, in order: decode, authenticate the sender, let the
ledger make it durable (in a worker thread: hashing and fsync never block the loop),
publish the effects with confirms, then ack. A bad message is dead-lettered with its
reason and the sender is told; the step it claims is untouched.

Group commit (FOLDFED_INGEST_BATCH, default the prefetch count): the consumer hands over
batches, and a run of chunks in one is made durable together, with one fsync pass and
one SQLite transaction, then acked with one ack(multiple=True) after its rejected
messages were settled one by one (ingest/batching.py says how batches are cut and
settled). Every chunk is still verified and durable before it is acked. Each chunk keeps
its own context (the sender's trace, its "ingest.chunk" span), in which all its work
runs. FOLDFED_INGEST_BATCH=1 handles one message at a time, acking each.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
from collections.abc import Callable, Coroutine
from typing import TypeVar

import structlog

from foldfed import topology, tracing
from foldfed.bus import Bus, Incoming
from foldfed.config import IngestSettings
from foldfed.errors import FoldfedError, Reject
from foldfed.faults import crash_point
from foldfed.ingest.batching import Outcome, groups, settlement
from foldfed.ingest.ledger import ChunkBatch, IngestLedger, StagedDelivery, member_keys
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
T = TypeVar("T")
SERVICE = "ingest"
# The span that handles each message type (a child of the sender's span).
_SPAN_OF = {
    "foldfed.v1.DeltaManifest": "ingest.manifest",
    "foldfed.v1.HaveRequest": "ingest.have",
    "foldfed.v1.Chunk": "ingest.chunk",
    "foldfed.v1.StepReleased": "open_step",
    "foldfed.v1.FinalizeRequest": "finalize",
}


class _ChunkScope:
    """One chunk message of a group, with its own context: the sender's trace and the
    message's "ingest.chunk" span are current in everything run through it (checks, the
    sum's "aggregate" span, the receipt's publish), as if it were handled alone."""

    def __init__(self, incoming: Incoming) -> None:
        self.incoming = incoming
        self.staged: StagedDelivery | None = None
        self.effects = Effects()
        self.outcome = Outcome.FAILED
        self.problem = ""  # the reason (rejected) or the error (failed)
        self._context = contextvars.copy_context()
        self._exit = contextlib.ExitStack()
        self._context.run(self._enter)

    def _enter(self) -> None:
        self._exit.enter_context(tracing.consuming(self.incoming.headers))
        self._exit.enter_context(
            tracing.span("ingest.chunk", **{tracing.BYTES: len(self.incoming.body)})
        )

    def run(self, fn: Callable[..., T], *args: object) -> T:
        return self._context.run(fn, *args)

    async def run_async(self, work: Coroutine[object, object, T]) -> T:
        return await asyncio.create_task(work, context=self._context)

    def close(self) -> None:
        self._context.run(self._exit.close)


class IngestService:
    # The service named by crash points (FOLDFED_CRASH_AT): the aggregator runs ingest too.
    service_name = SERVICE

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
            batch=self.settings.batch,
        )
        if self.settings.batch <= 1:
            await self.bus.consume(
                topology.INGEST_QUEUE, self.handle, stop=stop, prefetch=self.settings.prefetch
            )
            return
        await self.bus.consume_batches(
            topology.INGEST_QUEUE,
            self.handle_batch,
            stop=stop,
            prefetch=self.settings.prefetch,
            batch=self.settings.batch,
        )

    async def handle_batch(self, batch: list[Incoming]) -> None:
        """Every message of `batch` settled, in order: runs of chunks group-committed,
        any other message on its own."""
        for group in groups([incoming.type for incoming in batch]):
            members = batch[group.start : group.stop]
            if group.chunks:
                await self._commit_group(members)
                continue
            (incoming,) = members
            with tracing.consuming(incoming.headers):
                await self.handle(incoming)

    async def _commit_group(self, members: list[Incoming]) -> None:
        scopes = [_ChunkScope(incoming) for incoming in members]
        try:
            chunks = ChunkBatch()
            await asyncio.to_thread(self._stage_all, scopes, chunks)
            if chunks.deliveries:
                step = chunks.deliveries[0].chunk.step
                # Written, not yet durable: a crash loses nothing acked.
                crash_point(self.service_name, "batch-written", step)
                await self._make_durable(scopes, chunks)
                # Durable, not yet acked: a crash means a redelivery of duplicates.
                crash_point(self.service_name, "batch-durable", step)
            for scope in scopes:
                if scope.outcome is Outcome.DURABLE:
                    await scope.run_async(self._publish(scope.effects))
            await self._settle(scopes)
        finally:
            for scope in scopes:
                scope.close()

    def _stage_all(self, scopes: list[_ChunkScope], chunks: ChunkBatch) -> None:
        """In a worker thread: check each chunk and write its body (not yet durable)."""
        for scope in scopes:
            scope.run(self._stage, scope, chunks)

    def _stage(self, scope: _ChunkScope, chunks: ChunkBatch) -> None:
        try:
            msg = scope.incoming.message()
            if not isinstance(msg, Chunk):
                raise Reject(f"{scope.incoming.type} does not belong on the ingest queue")
            structlog.contextvars.bind_contextvars(step=msg.step)
            tracing.annotate(step=msg.step, participant=msg.participant, index=msg.index)
            self._authenticate(scope.incoming, msg.participant)
            scope.staged = self.ledger.stage_chunk(chunks, msg)
        except Reject as exc:
            tracing.annotate(rejected=exc.reason)
            scope.outcome, scope.problem = Outcome.REJECTED, exc.reason
        except (OSError, sqlite3.Error, FoldfedError) as exc:
            scope.outcome, scope.problem = Outcome.FAILED, repr(exc)

    async def _make_durable(self, scopes: list[_ChunkScope], chunks: ChunkBatch) -> None:
        """One fsync pass and one SQLite transaction for the group, then each chunk into
        the running sum; a failure fails every staged chunk (each is retried once)."""
        staged = [scope for scope in scopes if scope.staged is not None]
        try:
            await asyncio.to_thread(self._commit_and_apply, staged, chunks)
            for scope in staged:
                await scope.run_async(self._made_durable(scope.effects))
        except (OSError, sqlite3.Error, FoldfedError) as exc:
            await asyncio.to_thread(self.ledger.discard, chunks)
            for scope in staged:
                scope.outcome, scope.problem = Outcome.FAILED, repr(exc)

    def _commit_and_apply(self, staged: list[_ChunkScope], chunks: ChunkBatch) -> None:
        self.ledger.commit_chunks(chunks)
        for scope in staged:
            assert scope.staged is not None
            scope.effects = scope.run(self.ledger.apply_chunk, scope.staged)
            scope.outcome = Outcome.DURABLE

    async def _settle(self, scopes: list[_ChunkScope]) -> None:
        """Rejected and failed chunks one by one, then one ack for the durable ones."""
        plan = settlement([scope.outcome for scope in scopes])
        for position in plan.one_by_one:
            scope = scopes[position]
            if scope.outcome is Outcome.REJECTED:
                await scope.run_async(self._dead_letter(scope.incoming, scope.problem))
            else:
                await scope.run_async(self._failed(scope.incoming, scope.problem))
        if plan.ack_through is not None:
            await scopes[plan.ack_through].incoming.raw.ack(multiple=True)

    async def handle(self, incoming: Incoming) -> None:
        name = _SPAN_OF.get(incoming.type, "ingest.other")
        with tracing.span(name, **{tracing.BYTES: len(incoming.body)}):
            await self._handle(incoming)

    async def _handle(self, incoming: Incoming) -> None:
        try:
            effects = await self._apply(incoming)
            await self._made_durable(effects)
        except Reject as exc:
            tracing.annotate(rejected=exc.reason)
            await self._dead_letter(incoming, exc.reason)
            return
        except (OSError, sqlite3.Error, FoldfedError) as exc:
            await self._failed(incoming, repr(exc))
            return
        await self._publish(effects)
        await incoming.raw.ack()

    async def _failed(self, incoming: Incoming, error: str) -> None:
        """Our fault or the disk's, not the sender's. Try once more; a message that
        fails twice is parked with the reason instead of looping forever."""
        if incoming.redelivered:
            log.error("failed twice; dead-lettering", error=error, type=incoming.type)
            await self._dead_letter(incoming, f"hub could not process it: {error}")
        else:
            log.error("failed; will retry once", error=error, type=incoming.type)
            await incoming.raw.reject(requeue=True)

    async def _made_durable(self, effects: Effects) -> None:
        """Runs once a message's effects are durable, before they are published (a hook
        for the aggregator; an error counts as the message's failure)."""

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
            subject=incoming.raw.message_id or "",
        )
        await self.bus.publish(topology.EVENTS_EXCHANGE, "ingest.rejected", event, mandatory=False)
        # Only the authenticated sender hears about it: a forged claim cannot spam a victim.
        if incoming.user_id in self.settings.participants:
            await self.bus.publish(topology.PARTICIPANT_EXCHANGE, incoming.user_id, event)
        await self.bus.dead_letter(incoming, reason)


async def run_ingest(settings: IngestSettings, stop: asyncio.Event) -> None:
    ledger = IngestLedger(
        settings.state_dir,
        settings.participants,
        settings.first_step,
        settings.max_payload_bytes,
        member_keys=member_keys(settings.member_keys),
        secure_aggregation=settings.secure_aggregation,
        ring_bits=settings.ring_bits,
    )
    bus = await Bus.connect(settings.bus, name=SERVICE)
    try:
        await IngestService(settings, bus, ledger).run(stop)
    finally:
        await bus.close()
        ledger.close()

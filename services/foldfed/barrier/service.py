"""The barrier service: a thin async shell around the state machine and its store.

Each message from the barrier queue becomes one machine event, applied durably in one
SQLite transaction; then its effects are published; then the message is acked. On start
the service replays whatever effect was pending (Recover), so a barrier killed between
"all delivered" and "released" releases on restart, exactly once as far as anyone can
tell (receivers are idempotent).

With FOLDFED_GATED_CYCLES the settings no longer start cycles: the gatekeeper
(barrier/gatekeeper.py) keeps the participants' readiness records and starts each cycle
itself, with exactly the members gated before its deadline (docs/operating-model.md).
"""

from __future__ import annotations

import asyncio

import structlog
from opentelemetry.trace import SpanContext

from foldfed import topology, tracing
from foldfed.barrier.gatekeeper import Gatekeeper
from foldfed.barrier.machine import (
    BarrierState,
    CycleDone,
    CycleStarted,
    Delivered,
    Effects,
    Finalized,
    FlagMismatch,
    Ignored,
    ModelReported,
    Phase,
    Recover,
    Release,
    RequestFinalize,
    StepRecord,
)
from foldfed.barrier.machine import Event as MachineEvent
from foldfed.barrier.store import BarrierStore
from foldfed.bus import Bus, Incoming
from foldfed.config import BarrierSettings
from foldfed.digests import file_digest, short
from foldfed.domain import (
    DeliveryReceipt,
    Event,
    FinalizeRequest,
    ModelReport,
    StepFinalized,
    StepReleased,
)
from foldfed.errors import Reject
from foldfed.faults import crash_point
from foldfed.messages import now_ms
from foldfed.tracing import StepTrace

log = structlog.get_logger(__name__)
SERVICE = "barrier"
_MS = 1_000_000  # ns per ms
# The span that handles each kind of message.
_SPAN_OF = {Delivered: "delivered", Finalized: "finalized", ModelReported: "model_report"}


def step_trace(record: StepRecord) -> StepTrace:
    """Step `record.step`'s trace: derived from what the store keeps, so a restarted
    barrier (and every process it sends a context to) stays in the same trace."""
    return StepTrace.derive(record.cycle, record.step, record.opened_ms, record.base_digest)


def final_trace(state: BarrierState) -> StepTrace:
    """The trace of the final release (step R+1): the final model, reported, no training."""
    last = state.current  # step R, released
    opened = last.released_ms if last.released_ms is not None else last.opened_ms
    return StepTrace.derive(state.cycle, state.step, opened, state.model_digest)


class BarrierService:
    def __init__(self, settings: BarrierSettings, bus: Bus, store: BarrierStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        # One store call at a time: messages and the gating clock both reach it.
        self._store_lock = asyncio.Lock()
        self.gatekeeper = Gatekeeper(settings, store) if settings.gated_cycles else None

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.declare_hub_topology(self.settings.participants)
        if self.gatekeeper is not None:
            await self._run_gated(self.gatekeeper, stop)
            return
        state = self.store.load()
        # A cycle starts on an empty store, or once the stored cycle is done and the
        # settings name a later one (FOLDFED_CYCLE): the cycle boundary where sites that
        # were not ready before (late joiners) are admitted.
        if state is None or (state.phase is Phase.DONE and self.settings.cycle > state.cycle):
            initial = await asyncio.to_thread(file_digest, self.settings.initial_model)
            start = CycleStarted(
                cycle=self.settings.cycle,
                participants=frozenset(self.settings.participants),
                first_step=self.settings.first_step,
                initial_model_digest=initial,
                steps=self.settings.steps,
                at_ms=now_ms(),
                codec=self.settings.codec,
                codec_seed=self.settings.codec_seed,
                codec_choices=self.settings.codec_choices,
                weights=self.settings.agreed_weights(tuple(sorted(self.settings.participants))),
                update_norm_bound=self.settings.update_norm_bound,
            )
            log.info("cycle starts", model=short(initial), steps=self.settings.steps)
            await self._apply(start)
        else:
            log.info("recovering")
            await self._apply(Recover(at_ms=now_ms()))
        log.info("barrier ready")
        await self.bus.consume(topology.BARRIER_QUEUE, self.handle, stop=stop)

    async def _run_gated(self, gatekeeper: Gatekeeper, stop: asyncio.Event) -> None:
        """Cycles start when their round decides (module docstring), never from settings."""
        await gatekeeper.bind()
        state = self.store.load()
        if state is not None:
            log.info("recovering")
            await self._apply(Recover(at_ms=now_ms()))
        await gatekeeper.open_round(state, now_ms())
        log.info("barrier ready", gated=True)
        clock = asyncio.create_task(self._gating_clock(gatekeeper, stop))
        try:
            await self.bus.consume(topology.BARRIER_QUEUE, self.handle, stop=stop)
        finally:
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)

    async def _gating_clock(self, gatekeeper: Gatekeeper, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with self._store_lock:
                wait = await asyncio.to_thread(gatekeeper.seconds_to_next_deadline, now_ms())
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.05, wait))
            except TimeoutError:
                await self._start_if_due(gatekeeper)

    async def _start_if_due(self, gatekeeper: Gatekeeper) -> None:
        async with self._store_lock:
            at = now_ms()
            due = await asyncio.to_thread(gatekeeper.due, at)
            if due is None:
                return
            rnd, decision = due
            start = await asyncio.to_thread(gatekeeper.start_of, rnd, decision, at)
            effects = await asyncio.to_thread(self.store.start_gated, decision, start)
            state = await asyncio.to_thread(self.store.load)
        await self._perform(effects, state)

    async def handle(self, incoming: Incoming) -> None:
        try:
            msg = incoming.message()
            if isinstance(msg, Event) and msg.kind == "readiness":
                await self._readiness(incoming, msg)
                return
            event = self._event_of(incoming)
        except Reject as exc:
            log.warning("rejected", reason=exc.reason, type=incoming.type, user=incoming.user_id)
            await self.bus.dead_letter(incoming, exc.reason)
            return
        # A child of the sender's span (the receipt's, the finalize's, the report's).
        with tracing.span(
            _SPAN_OF[type(event)],
            step=getattr(event, "step", None),
            participant=getattr(event, "participant", None),
        ):
            await self._apply(event)
        await incoming.raw.ack()

    async def _readiness(self, incoming: Incoming, event: Event) -> None:
        if self.gatekeeper is None:
            log.info("readiness record ignored: cycles are not gated", user=incoming.user_id)
        else:  # Reject: dead-lettered by handle()
            record = self.gatekeeper.record_of(incoming, event, now_ms())
            async with self._store_lock:
                await self.gatekeeper.keep(record)
        await incoming.raw.ack()

    def _event_of(self, incoming: Incoming) -> MachineEvent:
        """Decode and authenticate: hub facts only from the hub's own identity, a model
        report only from the participant it names (RabbitMQ vouches for user_id)."""
        msg = incoming.message()
        at = now_ms()
        match msg:
            case DeliveryReceipt() | StepFinalized() if incoming.user_id != self.bus.user:
                raise Reject(f"{incoming.type} from {incoming.user_id!r}: only the hub says so")
            case DeliveryReceipt():
                return Delivered(msg.step, msg.participant, msg.manifest_id, at)
            case StepFinalized():
                return Finalized(msg.step, msg.update_manifest, msg.model_digest, at)
            case ModelReport():
                if incoming.user_id != msg.participant:
                    raise Reject(
                        f"forged sender: report for {msg.participant!r} "
                        f"from user {incoming.user_id!r}"
                    )
                return ModelReported(msg.step, msg.participant, msg.model_digest, at)
        raise Reject(f"{incoming.type} does not belong on the barrier queue")

    async def _apply(self, event: MachineEvent) -> None:
        async with self._store_lock:
            # The state comes back with the effects (traces derive from it): a second
            # store call would add a thread hop and a read to the release path.
            effects, state = await asyncio.to_thread(self.store.apply_and_load, event)
            for effect in effects:
                if isinstance(effect, Release | RequestFinalize):
                    # Durable, not yet published: the window a crash test aims at.
                    crash_point(SERVICE, f"before-{type(effect).__name__.lower()}", effect.step)
            if self.gatekeeper is not None and any(isinstance(e, CycleDone) for e in effects):
                # The boundary: gating for the next cycle opens (kept if already open).
                await self.gatekeeper.open_round(state, now_ms())
        await self._perform(effects, state)

    async def _perform(self, effects: Effects, state: BarrierState | None) -> None:
        for effect in effects:
            match effect:
                case RequestFinalize():
                    await self._request_finalize(effect, state)
                case Release():
                    await self._release(effect, state)
                case CycleDone():
                    await self._cycle_done(effect, state)
                case FlagMismatch():
                    detail = (
                        f"{effect.participant} holds model {short(effect.reported)} after "
                        f"step {effect.step}; the hub expected {short(effect.expected)}"
                    )
                    log.error("MODEL DIGEST MISMATCH", detail=detail)
                    tracing.annotate(mismatch=True)
                    await self._event("model_mismatch", effect.step, detail, effect.participant)
                case Ignored():
                    log.info("ignored", reason=effect.reason)

    async def _request_finalize(self, effect: RequestFinalize, state: BarrierState | None) -> None:
        structlog.contextvars.bind_contextvars(step=effect.step)
        log.info("all delivered; finalizing", participants=len(effect.participants))
        record = _record(state, effect.step)
        trace = step_trace(record) if record is not None else None
        if record is not None and trace is not None:
            _emit_wait(record, trace)
        parent = trace.parent() if trace is not None else tracing.current_context()
        request = FinalizeRequest(effect.step, tuple(sorted(effect.participants)), effect.cycle)
        with tracing.span("close", parent=parent, step=effect.step):
            await self.bus.publish(topology.CONTROL_EXCHANGE, "", request)

    async def _release(self, effect: Release, state: BarrierState | None) -> None:
        structlog.contextvars.bind_contextvars(step=effect.step)
        record = _record(state, effect.step)
        previous = _record(state, effect.step - 1)
        headers: dict[str, str] = {}
        if previous is not None and previous.released_ms is not None:
            # Step t-1 ends with this release: its root span is written now (again, with
            # the same ids, after a restart), and U_{t-1} is applied in its trace.
            finished = step_trace(previous)
            _emit_root(previous, finished)
            headers[tracing.UPDATE_TRACEPARENT] = tracing.carrier(_update_context(finished))[
                tracing.TRACEPARENT
            ]
        parent = step_trace(record).root if record is not None else tracing.current_context()
        with tracing.span("release", parent=parent, step=effect.step):
            await self._publish_release(effect, headers)

    async def _publish_release(self, effect: Release, headers: dict[str, str]) -> None:
        members = tuple(sorted(effect.participants))
        release = StepReleased(
            step=effect.step,
            model_digest=effect.model_digest,
            participants=members,
            released_unix_ms=now_ms(),
            update_manifest=effect.update_manifest,
            cycle=effect.cycle,
            codec=effect.codec,
            codec_seed=effect.codec_seed,
            codec_choices=effect.codec_choices,
            # Agreed per cycle, never claimed per step: the hub checks every manifest's.
            # Both are the stored cycle's terms, not the settings of this process.
            weights=effect.weights,
            update_norm_bound=effect.update_norm_bound,
        )
        # The aggregator first, so the step is open before any participant can deliver
        # (the update's chunks already wait in every participant's queue).
        await self.bus.publish(topology.CONTROL_EXCHANGE, "", release, headers=headers)
        await self.bus.publish(topology.BROADCAST_EXCHANGE, "", release, headers=headers)
        log.info("released", model=short(effect.model_digest))
        await self._event("step_released", effect.step, short(effect.model_digest))

    async def _cycle_done(self, effect: CycleDone, state: BarrierState | None) -> None:
        """The last update goes out as a final release: apply it, report, train no more."""
        headers: dict[str, str] = {}
        parent = tracing.current_context()
        if state is not None:
            last = state.current
            finished = step_trace(last)
            _emit_root(last, finished)
            headers[tracing.UPDATE_TRACEPARENT] = tracing.carrier(_update_context(finished))[
                tracing.TRACEPARENT
            ]
            # The final release's own trace (step R+1): a root of no length (the barrier
            # does nothing more for it), then the participants' final evaluations.
            final = final_trace(state)
            at_ns = now_ms() * _MS
            tracing.emit_span(
                "step",
                parent=None,
                start_ns=at_ns,
                end_ns=at_ns,
                step=effect.step,
                ids=(final.trace_id, final.root_span_id),
                final=True,
            )
            parent = final.root
        with tracing.span("release", parent=parent, step=effect.step, final=True):
            await self._publish_final(effect, headers)

    async def _publish_final(self, effect: CycleDone, headers: dict[str, str]) -> None:
        release = StepReleased(
            step=effect.step,
            model_digest=effect.final_model_digest,
            participants=tuple(sorted(effect.participants)),
            released_unix_ms=now_ms(),
            update_manifest=effect.update_manifest,
            cycle=effect.cycle,
            final=True,
            codec=effect.codec,
            codec_seed=effect.codec_seed,
            codec_choices=effect.codec_choices,
            weights=effect.weights,
            update_norm_bound=effect.update_norm_bound,
        )
        await self.bus.publish(topology.BROADCAST_EXCHANGE, "", release, headers=headers)
        log.info("cycle done", final_model=effect.final_model_digest.hex())
        await self._event("cycle_done", effect.step, effect.final_model_digest.hex())

    async def _event(self, kind: str, step: int, detail: str, participant: str = "") -> None:
        event = Event(kind, SERVICE, participant, step, detail, {}, now_ms())
        await self.bus.publish(
            topology.EVENTS_EXCHANGE, f"{SERVICE}.{kind}", event, mandatory=False
        )


def _record(state: BarrierState | None, step: int) -> StepRecord | None:
    if state is None:
        return None
    return next((r for r in state.recent_steps if r.step == step), None)


def _update_context(trace: StepTrace) -> SpanContext:
    """Where applying step t's update hangs in t's trace: under the span handling its
    StepFinalized when there is one, else (a re-release after a restart) under the root."""
    current = tracing.current_context()
    return current if current.trace_id == trace.trace_id else trace.root


def _emit_root(record: StepRecord, trace: StepTrace) -> None:
    """The step's root span: from its release to the release of the model it produced."""
    end_ms = record.released_ms if record.released_ms is not None else now_ms()
    tracing.emit_span(
        "step",
        parent=None,
        start_ns=record.opened_ms * _MS,
        end_ns=end_ms * _MS,
        step=record.step,
        ids=(trace.trace_id, trace.root_span_id),
        participants=len(record.deliveries),
    )


def _emit_wait(record: StepRecord, trace: StepTrace) -> None:
    """barrier.wait: from the release until the last participant delivered."""
    if record.closed_ms is None or not record.deliveries:
        return
    last = max(record.deliveries, key=lambda d: d.at_ms)
    first = min(d.at_ms for d in record.deliveries)
    tracing.emit_span(
        "barrier.wait",
        parent=trace.root,
        start_ns=record.opened_ms * _MS,
        end_ns=record.closed_ms * _MS,
        step=record.step,
        ids=(trace.trace_id, trace.span_id_for("barrier.wait")),
        straggler=last.participant,
        straggler_lag_s=(last.at_ms - first) / 1000,
    )


async def run_barrier(settings: BarrierSettings, stop: asyncio.Event) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = BarrierStore(settings.state_dir / "barrier.sqlite3")
    bus = await Bus.connect(settings.bus, name=SERVICE)
    try:
        await BarrierService(settings, bus, store).run(stop)
    finally:
        await bus.close()
        store.close()

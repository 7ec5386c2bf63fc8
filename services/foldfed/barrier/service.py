"""The barrier service: a thin async shell around the state machine and its store.

Each message from the barrier queue becomes one machine event, applied durably in one
SQLite transaction; then its effects are published; then the message is acked. On start
the service replays whatever effect was pending (Recover), so a barrier killed between
"all delivered" and "released" releases on restart, exactly once as far as anyone can
tell (receivers are idempotent).
"""

from __future__ import annotations

import asyncio

import structlog

from foldfed import topology
from foldfed.barrier.machine import (
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

log = structlog.get_logger(__name__)
SERVICE = "barrier"


class BarrierService:
    def __init__(self, settings: BarrierSettings, bus: Bus, store: BarrierStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.declare_hub_topology(self.settings.participants)
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
            )
            log.info("cycle starts", model=short(initial), steps=self.settings.steps)
            await self._apply(start)
        else:
            log.info("recovering")
            await self._apply(Recover(at_ms=now_ms()))
        log.info("barrier ready")
        await self.bus.consume(topology.BARRIER_QUEUE, self.handle, stop=stop)

    async def handle(self, incoming: Incoming) -> None:
        try:
            event = self._event_of(incoming)
        except Reject as exc:
            log.warning("rejected", reason=exc.reason, type=incoming.type, user=incoming.user_id)
            await self.bus.dead_letter(incoming, exc.reason)
            return
        await self._apply(event)
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
        effects = await asyncio.to_thread(self.store.apply, event)
        for effect in effects:
            if isinstance(effect, Release | RequestFinalize):
                # Durable, not yet published: the window a crash test aims at.
                crash_point(SERVICE, f"before-{type(effect).__name__.lower()}", effect.step)
        await self._perform(effects)

    async def _perform(self, effects: Effects) -> None:
        for effect in effects:
            match effect:
                case RequestFinalize():
                    structlog.contextvars.bind_contextvars(step=effect.step)
                    log.info("all delivered; finalizing", participants=len(effect.participants))
                    request = FinalizeRequest(
                        effect.step, tuple(sorted(effect.participants)), effect.cycle
                    )
                    await self.bus.publish(topology.CONTROL_EXCHANGE, "", request)
                case Release():
                    await self._release(effect)
                case CycleDone():
                    await self._cycle_done(effect)
                case FlagMismatch():
                    detail = (
                        f"{effect.participant} holds model {short(effect.reported)} after "
                        f"step {effect.step}; the hub expected {short(effect.expected)}"
                    )
                    log.error("MODEL DIGEST MISMATCH", detail=detail)
                    await self._event("model_mismatch", effect.step, detail, effect.participant)
                case Ignored():
                    log.info("ignored", reason=effect.reason)

    async def _release(self, effect: Release) -> None:
        structlog.contextvars.bind_contextvars(step=effect.step)
        release = StepReleased(
            step=effect.step,
            model_digest=effect.model_digest,
            participants=tuple(sorted(effect.participants)),
            released_unix_ms=now_ms(),
            update_manifest=effect.update_manifest,
            cycle=effect.cycle,
        )
        # The aggregator first, so the step is open before any participant can deliver
        # (the update's chunks already wait in every participant's queue).
        await self.bus.publish(topology.CONTROL_EXCHANGE, "", release)
        await self.bus.publish(topology.BROADCAST_EXCHANGE, "", release)
        log.info("released", model=short(effect.model_digest))
        await self._event("step_released", effect.step, short(effect.model_digest))

    async def _cycle_done(self, effect: CycleDone) -> None:
        """The last update goes out as a final release: apply it, report, train no more."""
        release = StepReleased(
            step=effect.step,
            model_digest=effect.final_model_digest,
            participants=tuple(sorted(effect.participants)),
            released_unix_ms=now_ms(),
            update_manifest=effect.update_manifest,
            cycle=effect.cycle,
            final=True,
        )
        await self.bus.publish(topology.BROADCAST_EXCHANGE, "", release)
        log.info("cycle done", final_model=effect.final_model_digest.hex())
        await self._event("cycle_done", effect.step, effect.final_model_digest.hex())

    async def _event(self, kind: str, step: int, detail: str, participant: str = "") -> None:
        event = Event(kind, SERVICE, participant, step, detail, {}, now_ms())
        await self.bus.publish(
            topology.EVENTS_EXCHANGE, f"{SERVICE}.{kind}", event, mandatory=False
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

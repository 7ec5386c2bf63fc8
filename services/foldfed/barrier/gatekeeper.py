"""The barrier's gating shell: readiness records in, gated cycle starts out.

It binds `uploader.readiness` to the barrier's queue, verifies each record against the
consortium keyring and keeps it (barrier/store.py), opens each gating round, and, when a
round's decision is due (barrier/gating.py), turns it into the same `CycleStarted` the
settings start a cycle with. The service owns the store's lock and performs the effects.

Least privilege: the hub user binds its own queue to its own exchange (both `foldfed.*`,
the hub's permissions in deploy/definitions.py and the local broker); participants gain
nothing, they already publish under `uploader.*`.
"""

from __future__ import annotations

import asyncio
import json

import aio_pika
import structlog

from foldfed import topology
from foldfed.barrier.gating import (
    Decision,
    GateRecord,
    GatingTerms,
    Round,
    decide,
    gate_record,
    next_round,
    status,
)
from foldfed.barrier.machine import BarrierState, CycleStarted
from foldfed.barrier.store import BarrierStore
from foldfed.bus import Incoming
from foldfed.config import BarrierSettings
from foldfed.digests import file_digest, short
from foldfed.domain import Event
from foldfed.errors import Reject
from foldfed.gate.record import RecordRefused
from foldfed.keyfiles import read_keyring
from foldfed.signing import VerifyKey

log = structlog.get_logger(__name__)
# How often the service looks whether a deadline passed, at most (it also looks right at
# the next deadline): a cycle starts at most this late after its deadline.
TICK_S = 1.0


class Gatekeeper:
    def __init__(self, settings: BarrierSettings, store: BarrierStore) -> None:
        if settings.consortium_keyring is None:
            raise ValueError("gated cycles need the consortium keyring")
        self.settings = settings
        self.store = store
        self.keys: tuple[VerifyKey, ...] = read_keyring(settings.consortium_keyring).keys
        unknown = sorted(set(settings.participants) - {k.name for k in self.keys})
        if unknown:
            log.warning("roster members without a key in the keyring never gate", names=unknown)

    async def bind(self) -> None:
        """Bind the readiness records to the barrier's queue (idempotent, durable)."""
        connection = await aio_pika.connect(self.settings.bus.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(topology.BARRIER_QUEUE, ensure=False)
            await queue.bind(topology.EVENTS_EXCHANGE, topology.READINESS_KEY)
        finally:
            await connection.close()

    async def terms(self, first: bool) -> GatingTerms:
        """The rounds' terms; θ0 of the first cycle is hashed only when `first` needs it."""
        s = self.settings
        theta0 = await asyncio.to_thread(file_digest, s.initial_model) if first else b""
        return GatingTerms(
            roster=frozenset(s.participants),
            min_members=s.gate_min_members,
            window_ms=max(1, round(s.gate_window_s * 1000)),
            first_cycle=s.cycle,
            first_step=s.first_step,
            first_theta0=theta0,
            split_reference=s.split_reference_hash,
        )

    async def open_round(self, state: BarrierState | None, now_ms: int) -> Round | None:
        """Open the round `state` calls for (a stored one is kept as it is)."""
        wanted = next_round(state, await self.terms(first=state is None), now_ms)
        if wanted is None:
            return None
        rnd = await asyncio.to_thread(self.store.open_round, wanted)
        log.info(
            "gating",
            cycle=rnd.cycle,
            theta0=short(rnd.theta0),
            deadline_ms=rnd.deadline(1),
            roster=sorted(rnd.roster),
            min_members=rnd.min_members,
        )
        return rnd

    def record_of(self, incoming: Incoming, event: Event, now_ms: int) -> GateRecord:
        """The verified record an event carries; Reject (dead-lettered) when it is none."""
        if incoming.user_id != event.participant:
            raise Reject(
                f"forged sender: readiness for {event.participant!r} from {incoming.user_id!r}"
            )
        if event.participant not in self.settings.participants:
            raise Reject(f"{event.participant!r} is not in the roster (FOLDFED_PARTICIPANTS)")
        try:
            record = gate_record(json.loads(event.detail), self.keys, now_ms)
        except (ValueError, RecordRefused) as exc:
            raise Reject(f"readiness record refused: {exc}") from exc
        if record.participant != event.participant:
            raise Reject(f"a record of {record.participant!r} sent by {event.participant!r}")
        return record

    async def keep(self, record: GateRecord) -> None:
        kept = await asyncio.to_thread(self.store.add_readiness, record)
        log.info(
            "readiness record" if kept else "readiness record again (kept once)",
            participant=record.participant,
            cycle=record.cycle,
            ready=record.ready,
            failed=[c.name for c in record.failed],
        )

    def due(self, now_ms: int) -> tuple[Round, Decision] | None:
        """The open round's decision, once due (blocking: call from a worker thread)."""
        latest = self.store.latest_round()
        if latest is None or latest[1] is not None:
            return None
        rnd = latest[0]
        decision = decide(rnd, self.store.readiness(rnd.cycle), now_ms)
        return None if decision is None else (rnd, decision)

    def start_of(self, rnd: Round, decision: Decision, now_ms: int) -> CycleStarted:
        """The cycle start a decision makes: the settings' terms, the round's members."""
        s = self.settings
        members = tuple(sorted(decision.members))
        left_out = status(rnd, self.store.readiness(rnd.cycle), decision, now_ms)
        log.info(
            "gated cycle starts",
            cycle=rnd.cycle,
            members=list(members),
            not_admitted={
                m.participant: m.detail for m in left_out if m.participant not in members
            },
        )
        return CycleStarted(
            cycle=rnd.cycle,
            participants=decision.members,
            first_step=rnd.first_step,
            initial_model_digest=rnd.theta0,
            steps=s.steps,
            at_ms=now_ms,
            codec=s.codec,
            codec_seed=s.codec_seed,
            codec_choices=s.codec_choices,
            weights=s.agreed_weights(members),
            update_norm_bound=s.update_norm_bound,
        )

    def seconds_to_next_deadline(self, now_ms: int) -> float:
        latest = self.store.latest_round()
        if latest is None or latest[1] is not None:
            return TICK_S
        return min(TICK_S, max(0.0, (latest[0].next_deadline(now_ms) - now_ms) / 1000))

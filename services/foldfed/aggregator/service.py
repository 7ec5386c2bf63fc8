"""The aggregator service: ingest plus the exact running sum; finalizes a step when the
barrier asks, and broadcasts the global update as content-addressed chunks.

Files under FOLDFED_STATE_DIR:
  store/, ingest.sqlite3        verified chunks and what counts (ingest.ledger)
  accumulator.i64               the open step's int64 sum (a cache, rebuilt at start)
  models/model-<t:012d>.safetensors    θ_t, the model released for step t (t > first)
  updates/update-<t:012d>.safetensors  step t's global update: θ_{t+1} = θ_t + update
  optimizer/                    server optimizer state (FedAvgM, FedAdam)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from foldfed import topology, tracing
from foldfed.aggregation import ServerOptimizer, finalize_step, weight_total
from foldfed.aggregation.state import generations
from foldfed.aggregator.sink import AggregationSink
from foldfed.bus import Bus, Incoming, PublishWindow
from foldfed.config import AggregatorSettings
from foldfed.digests import file_digest, short
from foldfed.domain import (
    Chunk,
    Event,
    FinalizeRequest,
    Manifest,
    StepFinalized,
    manifest_of,
)
from foldfed.errors import Reject
from foldfed.faults import crash_point
from foldfed.format import ChunkPlan
from foldfed.ingest.ledger import IngestLedger
from foldfed.ingest.rules import Effects
from foldfed.ingest.service import IngestService
from foldfed.messages import encode, now_ms
from foldfed.payloadfile import plan_chunks, read_chunk

log = structlog.get_logger(__name__)
SERVICE = "aggregator"


def _name(kind: str, step: int) -> str:
    return f"{kind}-{step:012d}.safetensors"


class AggregatorService(IngestService):
    def __init__(
        self,
        settings: AggregatorSettings,
        bus: Bus,
        ledger: IngestLedger,
        sink: AggregationSink,
    ) -> None:
        super().__init__(settings.ingest, bus, ledger)
        self.agg_settings = settings
        self.sink = sink
        self.state_dir = settings.ingest.state_dir
        opt = settings.optimizer
        self.optimizer = ServerOptimizer(opt.kind, lr=opt.lr, beta1=opt.momentum)

    # ---------------------------------------------------------------- paths

    def model_path(self, step: int) -> Path:
        """θ_step: the cycle's initial model for the first step, else the one we made."""
        made = self.state_dir / "models" / _name("model", step)
        return made if made.exists() else self.agg_settings.initial_model

    def update_path(self, step: int) -> Path:
        return self.state_dir / "updates" / _name("update", step)

    # ---------------------------------------------------------------- start-up

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self._rebuild)
        await super().run(stop)

    def _rebuild(self) -> None:
        step = self.ledger.open_step
        self.sink.open_step(self.model_path(step))
        applied = self.ledger.replay_open_step()
        log.info("running sum rebuilt", step=step, chunks=applied)

    # ---------------------------------------------------------------- messages

    async def _apply(self, incoming: Incoming) -> Effects:
        if incoming.type == "foldfed.v1.FinalizeRequest":
            if incoming.user_id != self.bus.user:
                raise Reject(f"only the hub finalizes steps, not {incoming.user_id!r}")
            request = incoming.message()
            assert isinstance(request, FinalizeRequest)
            await self._finalize(request)
            return Effects()
        effects = await super()._apply(incoming)
        if effects.receipts:
            # A delivery is durable, its receipt not yet out: mid-step for the others.
            crash_point(SERVICE, "after-delivery", effects.receipts[0].step)
        for released in effects.released:
            await asyncio.to_thread(self.sink.open_step, self.model_path(released.step))
        return effects

    # ---------------------------------------------------------------- finalize

    async def _finalize(self, request: FinalizeRequest) -> None:
        """Idempotent: a repeated request re-publishes the same update."""
        step = request.step
        structlog.contextvars.bind_contextvars(step=step)
        weights = self.ledger.weights(step)
        missing = set(request.participants) - set(weights)
        if missing:
            raise Reject(f"cannot finalize step {step}: no delivery from {sorted(missing)}")
        started = now_ms()
        tracing.annotate(step=step, participants=len(weights))
        with tracing.span("finalize.compute", step=step):
            result = await asyncio.to_thread(self._finalize_files, step, request, weights)
        plan, model_digest, weight_sum = result
        manifest = self._update_manifest(step, plan, weight_sum)
        # Participants' downloads of the update are children of this span (chunk headers).
        with tracing.span(
            "broadcast",
            step=step,
            chunks=len(manifest.chunk_digests),
            **{tracing.BYTES: manifest.payload_size},
        ):
            await self._broadcast_update(manifest, self.update_path(step))
        finalized = StepFinalized(step, encode(manifest)[1], model_digest, weight_sum, now_ms())
        await self.bus.publish(topology.EVENTS_EXCHANGE, topology.FINALIZED_KEY, finalized)
        log.info(
            "step finalized",
            model=short(model_digest),
            participants=len(weights),
            ms=now_ms() - started,
        )
        event = Event(
            "step_finalized",
            SERVICE,
            "",
            step,
            short(model_digest),
            {"finalize_ms": float(now_ms() - started), "weight_sum": weight_sum},
            now_ms(),
        )
        await self.bus.publish(
            topology.EVENTS_EXCHANGE, f"{SERVICE}.step_finalized", event, mandatory=False
        )

    def _finalize_files(
        self, step: int, request: FinalizeRequest, weights: dict[str, float]
    ) -> tuple[ChunkPlan, bytes, float]:
        counted = [weights[p] for p in sorted(request.participants)]
        weight_sum = weight_total(counted)
        update = self.update_path(step)
        model = self.state_dir / "models" / _name("model", step + 1)
        state_dir = self.state_dir / "optimizer"
        done = update.exists() and model.exists()
        if done and self.optimizer.kind != "fedavg":
            # The files are renamed before the optimizer state commits: both must be there.
            done = step + 1 in generations(state_dir)
        model_digest = b""
        if not done:
            if step != self.ledger.open_step:
                raise Reject(f"step {step} is not open and was never finalized")
            update.parent.mkdir(parents=True, exist_ok=True)
            model.parent.mkdir(parents=True, exist_ok=True)
            layout, accumulator = self.sink._ready()
            result = finalize_step(
                layout,
                accumulator,
                weight_sum,
                self.model_path(step),
                update,
                model,
                self.optimizer,
                state_dir,
                step=step,
            )
            model_digest = result.model_digest  # hashed while it was written
        plan = plan_chunks(update, self.agg_settings.update_chunk_size)
        # The model's digest is its canonical file's (the same bytes every participant
        # writes after applying the update); a repeated request hashes it again.
        model_digest = model_digest or file_digest(model)
        for index, digest in enumerate(plan.chunk_digests):
            self.ledger.store.put(digest, read_chunk(update, plan.chunk_size, index))
        return plan, model_digest, weight_sum

    def _update_manifest(self, step: int, plan: ChunkPlan, weight_sum: float) -> Manifest:
        base = self.ledger.model_digest  # θ_step's digest, as released
        return manifest_of(
            plan, step=step, participant=topology.HUB_ID, weight=weight_sum, base_model_digest=base
        )

    async def _broadcast_update(self, manifest: Manifest, path: Path) -> None:
        """One publish per chunk reaches every participant's queue (fan-out)."""
        async with PublishWindow(self.settings.bus.inflight_window) as window:
            for index, digest in enumerate(manifest.chunk_digests):
                body = await asyncio.to_thread(read_chunk, path, manifest.chunk_size, index)
                chunk = Chunk(manifest.step, topology.HUB_ID, index, digest, body)
                await window.submit(self.bus.publish(topology.BROADCAST_EXCHANGE, "", chunk))


class TracedSink(AggregationSink):
    """The running sum, with an "aggregate" span per chunk added (under its ingest span)."""

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        with tracing.child_span("aggregate", step=m.step, participant=m.participant, index=index):
            super().apply(m, index, prepared)


async def run_aggregator(settings: AggregatorSettings, stop: asyncio.Event) -> None:
    ingest = settings.ingest
    sink = TracedSink(ingest.state_dir)
    ledger = IngestLedger(
        ingest.state_dir, ingest.participants, ingest.first_step, ingest.max_payload_bytes, sink
    )
    bus = await Bus.connect(ingest.bus, name=SERVICE)
    try:
        await AggregatorService(settings, bus, ledger, sink).run(stop)
    finally:
        await bus.close()
        sink.close()
        ledger.close()

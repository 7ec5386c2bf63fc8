"""The aggregator service: ingest plus the exact running sum; finalizes a step when the
barrier asks, and broadcasts the global update as content-addressed chunks.

One concept, the aggregator's shell: it carries out what the pure core and the adapters
decide (aggregation/*, ingest/*), in the order that keeps the commit points of
docs/format.md sections 9 and 12; the arithmetic itself lives in those modules.

Files under FOLDFED_STATE_DIR:
  store/, ingest.sqlite3        verified chunks and what counts (ingest.ledger)
  accumulator.i64               the open step's int64 sum (a cache, rebuilt at start)
  models/model-<t:012d>.safetensors    θ_t, the model released for step t (t > first)
  updates/update-<t:012d>.safetensors  step t's global update: θ_{t+1} = θ_t + update
                                (with a lossy downlink: the decoded update d_t)
  updates/coded-<t:012d>.bin, .json    step t's coded update and its chunk sizes
  downlink.residual             the hub's error-feedback residual (lossy downlinks)
  optimizer/                    server optimizer state (FedAvgM, FedAdam)
  records/step-<t:012d>.dsse.json  step t's signed record, kept for ever (aggregator/records.py)
Chunks, models and updates are deleted after each release as FOLDFED_RETAIN_* says
(aggregator/retention.py, docs/retention.md); manifests are kept for ever. Temporaries a
killed finalize left are deleted at start-up (aggregator/temporaries.py).

Codecs (docs/format.md, "Coded payloads"): deltas are decoded chunk by chunk into the sum
with the codec and shared ranges of their step (aggregator/sink.py); finalize makes the
next step's shared ranges from the members' block statistics (a chunk broadcast with the
update, named by the update manifest) and codes the update with FOLDFED_DOWNLINK_CODEC.

Progressive finalize (FOLDFED_PROGRESSIVE_FINALIZE, docs/format.md "Progressive finalize"):
once every member of the open step has its manifest in and the step has no update bound,
each batch of counted chunks advances the step's finalize over the canonical prefix every
member has covered (aggregation/progress.py, aggregation/progressive.py), and each
downlink chunk it completes is broadcast at once with its final index. FinalizeRequest
then finishes the rest, commits exactly as finalize_step would, broadcasts the remaining
chunks and StepFinalized. Nothing is durable before that commit: a restart starts the step's
finalize again from zero and broadcasts the same chunks again.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from foldfed import topology, tracing
from foldfed.aggregation import ServerOptimizer, canonical_order, finalize_step, weight_total
from foldfed.aggregation.downlink import DownlinkCoder
from foldfed.aggregation.layout import ModelLayout
from foldfed.aggregation.progress import CanonicalVector, MemberCoverage, final_prefix
from foldfed.aggregation.progressive import ProgressiveFinalize, ProgressiveResult, UpdateChunk
from foldfed.aggregation.state import generations
from foldfed.aggregator.records import StepRecorder
from foldfed.aggregator.retention import HubRetention
from foldfed.aggregator.sink import AggregationSink
from foldfed.aggregator.temporaries import remove_temporaries
from foldfed.bus import Bus, Incoming, PublishWindow
from foldfed.codecs import SharedRanges, codec_from_spec
from foldfed.codedvector import (
    CycleCoding,
    ranges_for,
    ranges_from_bytes,
    ranges_to_bytes,
    shared_rule,
    stats_from_bytes,
    vector_spans,
)
from foldfed.config import AggregatorSettings
from foldfed.digests import digest_of, file_digest, short
from foldfed.domain import (
    CODEC_CODED_VECTOR,
    REFERENCE_CODEC,
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
from foldfed.ingest.ledger import IngestLedger, member_keys
from foldfed.ingest.rules import Effects
from foldfed.ingest.service import IngestService
from foldfed.messages import encode, now_ms
from foldfed.payloadfile import plan_chunks, read_chunk
from foldfed.retention import RetentionPolicy
from foldfed.settings import load

log = structlog.get_logger(__name__)
SERVICE = "aggregator"


def _name(kind: str, step: int) -> str:
    return f"{kind}-{step:012d}.safetensors"


class AggregatorService(IngestService):
    service_name = SERVICE

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
        retain = load()
        policy = RetentionPolicy(retain.retain_steps, retain.retain_checkpoint_every)
        self.retention = HubRetention(self.state_dir, ledger, policy)
        self.records = StepRecorder(
            self.state_dir, settings.signing_key, settings.downlink_codec, self.optimizer
        )
        self._progress: _Progress | None = None  # the open step's progressive finalize
        self._progress_seen = -1  # the sink's change counter when progress was last looked at
        self._progress_failed = -1  # a step whose progressive finalize failed: not again

    # ---------------------------------------------------------------- paths

    def model_path(self, step: int) -> Path:
        """θ_step: the cycle's initial model for the first step, else the one we made."""
        made = self.state_dir / "models" / _name("model", step)
        return made if made.exists() else self.agg_settings.initial_model

    def _carry_over_model(self, step: int) -> None:
        """A later cycle's first step starts from the previous cycle's final model, the
        θ_{step-1} this hub made (a gated cycle names it as its θ0, with no redeploy and no
        new FOLDFED_INITIAL_MODEL): linked as θ_step, so that the step finds it and
        retention keeps it while the step needs it, like any model made here."""
        made = self.state_dir / "models" / _name("model", step)
        previous = self.state_dir / "models" / _name("model", step - 1)
        if made.exists() or not previous.exists() or self.ledger.open_step != step:
            return
        if file_digest(previous) != self.ledger.model_digest:
            return  # the cycle starts from another model: the settings' initial one
        tmp = made.with_name(f".{made.name}.link")
        tmp.unlink(missing_ok=True)
        os.link(previous, tmp)
        os.replace(tmp, made)
        log.info("cycle starts from the previous cycle's final model", step=step)

    def update_path(self, step: int) -> Path:
        return self.state_dir / "updates" / _name("update", step)

    # ---------------------------------------------------------------- start-up

    async def run(self, stop: asyncio.Event) -> None:
        # Before anything writes: what a killed finalize left is garbage (temporaries.py).
        await asyncio.to_thread(remove_temporaries, self.state_dir)
        await asyncio.to_thread(self._rebuild)
        await asyncio.to_thread(self.retention.collect)  # finishes one a crash cut short
        await super().run(stop)

    def _rebuild(self) -> None:
        step = self.ledger.open_step
        self._open_sum(step)
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
        return await super()._apply(incoming)

    async def _made_durable(self, effects: Effects) -> None:
        if effects.receipts:
            # A delivery is durable, its receipt not yet out: mid-step for the others.
            crash_point(SERVICE, "after-delivery", effects.receipts[0].step)
        for released in effects.released:
            await asyncio.to_thread(self._drop_progress)
            await asyncio.to_thread(self._open_sum, released.step)
            # The step boundary: what only the closed step needed may go (retention.md).
            await asyncio.to_thread(self.retention.collect)
        await self._advance_progress()

    def _open_sum(self, step: int) -> None:
        """The sum of `step` (empty if new, kept if the sink holds it already), with the
        step's shared ranges if its codec has them."""
        self._carry_over_model(step)
        self.sink.open_step(step, self.model_path(step))
        layout, _ = self.sink._ready()
        self.sink.ranges = self._step_ranges(self.ledger.coding, layout.elements)
        self.sink.bound = self.ledger.facts.open_step().norm_bound

    def _step_ranges(self, coding: CycleCoding, elements: int) -> SharedRanges | None:
        if coding.reference:
            return None
        codec = codec_from_spec(coding.spec)
        rotated = shared_rule(codec)
        if rotated is None:
            return None
        if not coding.ranges_digest:  # a cycle's first step: the spec's init ranges
            return ranges_for(codec, elements, [])
        data = self.ledger.store.get(coding.ranges_digest)
        return ranges_from_bytes(data, elements, rotated.block)

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
        manifest, model_digest, weight_sum, first = result
        counted = {p: weights[p] for p in request.participants}
        await asyncio.to_thread(self.records.write, self.ledger, step, counted, weight_sum,
                                self.update_path(step), manifest, model_digest)  # fmt: skip
        # Participants' downloads of the update are children of this span (chunk headers).
        with tracing.span(
            "broadcast",
            step=step,
            chunks=len(manifest.chunk_digests) - first,
            **{tracing.BYTES: manifest.payload_size},
        ):
            await self._broadcast_update(manifest, first)
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
    ) -> tuple[Manifest, bytes, float, int]:
        """The update manifest, θ_{step+1}'s digest, the weight sum, and the first chunk
        index not broadcast yet (chunks a progressive finalize broadcast before)."""
        coding = self.ledger.coding
        downlink = self._downlink(coding)
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
        progress = self._take_progress(step, request, weight_sum, done)
        if progress is not None:
            finished, first = progress
            layout, _ = self.sink._ready()
            manifest = self._finished_manifest(step, finished, downlink, weight_sum)
            next_ranges = self._next_ranges(step, request, coding, layout.elements)
            model_digest = finished.result.model_digest
            manifest = replace(manifest, next_ranges_digest=next_ranges)
            return manifest, model_digest, weight_sum, first
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
                downlink=None if downlink is None else lambda exact: downlink.code(step, exact),
            )
            model_digest = result.model_digest  # hashed while it was written
        # The model's digest is its canonical file's (the same bytes every participant
        # writes after applying the update); a repeated request hashes it again.
        model_digest = model_digest or file_digest(model)
        layout, _ = self.sink._ready()
        if downlink is None:
            manifest = self._plain_update_manifest(step, update, weight_sum)
        else:
            manifest = self._coded_update_manifest(step, downlink, layout, weight_sum)
        next_ranges = self._next_ranges(step, request, coding, layout.elements)
        return replace(manifest, next_ranges_digest=next_ranges), model_digest, weight_sum, 0

    def _downlink(self, coding: CycleCoding) -> DownlinkCoder | None:
        spec = self.agg_settings.downlink_codec
        if spec == REFERENCE_CODEC:
            return None
        return DownlinkCoder(
            self.state_dir / "updates",
            self.state_dir / "downlink.residual",
            spec,
            chunk_limit=self.agg_settings.update_chunk_size,
            cycle=coding.cycle,
            seed=coding.seed,
        )

    def _plain_update_manifest(self, step: int, update: Path, weight_sum: float) -> Manifest:
        plan = plan_chunks(update, self.agg_settings.update_chunk_size)
        for index, digest in enumerate(plan.chunk_digests):
            self.ledger.store.put(digest, read_chunk(update, plan.chunk_size, index))
        base = self.ledger.model_digest  # θ_step's digest, as released
        return manifest_of(
            plan, step=step, participant=topology.HUB_ID, weight=weight_sum, base_model_digest=base
        )

    def _coded_update_manifest(
        self, step: int, downlink: DownlinkCoder, layout: ModelLayout, weight_sum: float
    ) -> Manifest:
        """The coded update as written by the downlink (a repeat reads the same files)."""
        coded = downlink.stored(step)
        chunks = coded.chunks()
        digests = tuple(digest_of(c) for c in chunks)
        for digest, body in zip(digests, chunks, strict=True):
            self.ledger.store.put(digest, body)
        payload = digest_of(b"".join(chunks))
        return self._coded_manifest(step, downlink, layout, weight_sum, digests, coded.chunk_sizes,
                                    payload)  # fmt: skip

    def _coded_manifest(
        self,
        step: int,
        downlink: DownlinkCoder,
        layout: ModelLayout,
        weight_sum: float,
        digests: tuple[bytes, ...],
        sizes: tuple[int, ...],
        payload_digest: bytes,
    ) -> Manifest:
        tensors = vector_spans([(s.name, s.dtype, s.shape) for s in canonical_order(layout)])
        return Manifest(
            step=step,
            participant=topology.HUB_ID,
            weight=weight_sum,
            codec=CODEC_CODED_VECTOR,
            tensors=tensors,
            chunk_size=downlink.chunk_limit,
            payload_size=sum(sizes),
            chunk_digests=digests,
            payload_digest=payload_digest,
            base_model_digest=self.ledger.model_digest,
            codec_spec=downlink.codec.spec,
            cycle=downlink.cycle,
            codec_seed=downlink.seed,
            chunk_sizes=sizes,
        )

    def _next_ranges(
        self, step: int, request: FinalizeRequest, coding: CycleCoding, elements: int
    ) -> bytes:
        """The next step's shared ranges from this step's members' block statistics, put in
        the store (b"" if the cycle codec has none). A pure function of the stored
        manifests, so a repeated finalize names the same chunk."""
        if coding.reference:
            return b""
        codec = codec_from_spec(coding.spec)
        if shared_rule(codec) is None:
            return b""
        reports = []
        for participant in sorted(request.participants):
            m = self.ledger.manifest(step, participant)
            assert m is not None
            if m.codec_spec == coding.spec:  # a member choice has no shared ranges to report
                reports.append(stats_from_bytes(m.block_stats, elements, codec.block))
        data = ranges_to_bytes(ranges_for(codec, elements, reports))
        digest = digest_of(data)
        self.ledger.store.put(digest, data)
        return digest

    async def _broadcast_update(self, manifest: Manifest, first: int = 0) -> None:
        """One publish per chunk reaches every participant's queue (fan-out); the next
        step's shared ranges, if any, go as one more chunk (index = the chunk count).
        Chunks before `first` went out already (a progressive finalize)."""
        digests = list(manifest.chunk_digests)
        if manifest.next_ranges_digest:
            digests.append(manifest.next_ranges_digest)
        async with PublishWindow(self.settings.bus.inflight_window) as window:
            for index, digest in enumerate(digests):
                if index < first:
                    continue
                body = await asyncio.to_thread(self.ledger.store.get, digest)
                chunk = Chunk(manifest.step, topology.HUB_ID, index, digest, body)
                await window.submit(self.bus.publish(topology.BROADCAST_EXCHANGE, "", chunk))

    # ---------------------------------------------------------------- progressive finalize

    async def _advance_progress(self) -> None:
        """Finalize what every member's counted chunks cover, and broadcast the downlink
        chunks that completes (in a worker thread; ingest waits, so nothing else uses the
        running sum meanwhile). A failure here never fails the chunks that triggered it:
        the step falls back to finalize_step at FinalizeRequest (which reports it)."""
        sink = self.sink
        if not self.agg_settings.progressive_finalize or not isinstance(sink, TracedSink):
            return
        if sink.applied == self._progress_seen or sink.step is None:
            return  # nothing counted since the last look
        step = sink.step
        if step == self._progress_failed:
            return  # given up for this step
        self._progress_seen = sink.applied
        started = time.monotonic()
        try:
            chunks = await asyncio.to_thread(self._advance_files)
        except Exception as exc:
            log.warning("progressive finalize dropped", step=step, error=repr(exc))
            await asyncio.to_thread(self._drop_progress)
            self._progress_failed = step
            return
        progress = self._progress
        if not chunks or progress is None or not progress.broadcasting:
            return
        computed = time.monotonic()
        try:
            # Under the ingest of the chunk that made them final (in the step's trace): the
            # participants' downloads of these chunks hang under it, the rest under
            # "broadcast" (docs/tracing.md).
            with tracing.child_span("broadcast.early", step=step, chunks=len(chunks)):
                await self._publish_update_chunks(step, chunks)
        except Exception as exc:
            progress.broadcasting = False
            log.warning("early broadcast stopped", step=step, error=repr(exc))
            return
        progress.broadcast = chunks[-1].index + 1
        # The two costs ingest waits for here (docs/format.md 9.8, "Measured").
        log.info(
            "update chunks broadcast early",
            chunks=len(chunks),
            through=chunks[-1].index,
            advance_ms=round(1000 * (computed - started), 1),
            publish_ms=round(1000 * (time.monotonic() - computed), 1),
        )
        # Some chunks out, the step not committed: a crash must recompute the same ones.
        crash_point(SERVICE, "mid-progress", step)

    def _advance_files(self) -> list[UpdateChunk]:
        progress = self._progress or self._start_progress()
        if progress is None:
            return []
        sink = self.sink
        assert isinstance(sink, TracedSink)
        if sink.withdrew:
            self._drop_progress()  # a delta left the sum: finalized ranges may be wrong
            return []
        prefix = final_prefix(progress.members, sink.counted, progress.elements)
        chunks = progress.job.advance(prefix)
        for chunk in chunks:  # FinalizeRequest, or a repeat of it, reads them from here
            self.ledger.store.put(chunk.digest, chunk.body, verified=True)
        return chunks

    def _start_progress(self) -> _Progress | None:
        """A progressive finalize of the open step, if it is safe (see the module
        docstring): no update bound, every member's manifest in, the step not finalized."""
        step = self.ledger.open_step
        open_step = self.ledger.facts.open_step()
        sink = self.sink
        assert isinstance(sink, TracedSink)
        if open_step.norm_bound > 0 or sink.step != step or sink.withdrew:
            return None
        manifests = {p: self.ledger.manifest(step, p) for p in sorted(open_step.members)}
        if any(m is None for m in manifests.values()):
            return None
        update, model = self.update_path(step), self._next_model_path(step)
        if update.exists() or model.exists():
            return None  # finalized before: FinalizeRequest re-publishes it
        layout, accumulator = self.sink._ready()
        canonical = CanonicalVector.of((s.name, s.count) for s in canonical_order(layout))
        members = {p: MemberCoverage.of(m, canonical) for p, m in manifests.items() if m}
        weight_sum = weight_total([m.weight for m in manifests.values() if m])
        update.parent.mkdir(parents=True, exist_ok=True)
        model.parent.mkdir(parents=True, exist_ok=True)
        job = ProgressiveFinalize(
            layout,
            accumulator,
            weight_sum,
            self.model_path(step),
            update,
            model,
            self.optimizer,
            self.state_dir / "optimizer",
            step=step,
            downlink=self._downlink(self.ledger.coding),
            update_chunk_size=self.agg_settings.update_chunk_size,
        )
        self._progress = _Progress(step, job, members, weight_sum, layout.elements)
        log.info("progressive finalize started", members=len(members))
        return self._progress

    def _take_progress(
        self, step: int, request: FinalizeRequest, weight_sum: float, done: bool
    ) -> tuple[ProgressiveResult, int] | None:
        """Finish the progressive finalize of `step` if there is one and the request asks
        for what it was started with (the same members, hence the same weights); else
        drop it and return None (finalize_step runs, or the files are there already).
        Also returns the first chunk index not broadcast yet."""
        progress, self._progress = self._progress, None
        self._progress_seen = -1
        if progress is None:
            return None
        sink = self.sink
        assert isinstance(sink, TracedSink)
        if (
            done
            or progress.step != step
            or step != self.ledger.open_step
            or set(request.participants) != set(progress.members)
            or weight_sum != progress.weight_sum
            or sink.withdrew
        ):
            progress.job.discard()
            return None
        finished, rest = progress.job.finish()
        for chunk in rest:
            self.ledger.store.put(chunk.digest, chunk.body, verified=True)
        return finished, progress.broadcast

    def _drop_progress(self) -> None:
        if self._progress is not None:
            self._progress.job.discard()
            self._progress = None
        self._progress_seen = -1

    def _finished_manifest(
        self,
        step: int,
        finished: ProgressiveResult,
        downlink: DownlinkCoder | None,
        weight_sum: float,
    ) -> Manifest:
        """The update manifest of a progressive finalize: the one finalize_step's files
        give (_plain_update_manifest, _coded_update_manifest), from the chunks as cut."""
        if downlink is not None:
            layout, _ = self.sink._ready()
            return self._coded_manifest(step, downlink, layout, weight_sum, finished.digests,
                                        finished.sizes, finished.payload_digest)  # fmt: skip
        plan = ChunkPlan(
            finished.payload_size,
            self.agg_settings.update_chunk_size,
            finished.digests,
            finished.payload_digest,
            finished.tensors,
        )
        base = self.ledger.model_digest
        return manifest_of(
            plan, step=step, participant=topology.HUB_ID, weight=weight_sum, base_model_digest=base
        )

    def _next_model_path(self, step: int) -> Path:
        return self.state_dir / "models" / _name("model", step + 1)

    async def _publish_update_chunks(self, step: int, chunks: list[UpdateChunk]) -> None:
        async with PublishWindow(self.settings.bus.inflight_window) as window:
            for c in chunks:
                chunk = Chunk(step, topology.HUB_ID, c.index, c.digest, c.body)
                await window.submit(self.bus.publish(topology.BROADCAST_EXCHANGE, "", chunk))


@dataclass
class _Progress:
    """The open step's progressive finalize and what it was started with."""

    step: int
    job: ProgressiveFinalize
    members: dict[str, MemberCoverage]
    weight_sum: float
    elements: int
    broadcast: int = 0  # chunks 0 .. broadcast - 1 are out (confirmed)
    broadcasting: bool = True  # False after a failed publish: FinalizeRequest sends the rest


class TracedSink(AggregationSink):
    """The running sum, with an "aggregate" span per chunk added (under its ingest span);
    keeps which chunks of the open step are counted, for a progressive finalize."""

    def __init__(self, state_dir: Path, ring_bits: int | None = None) -> None:
        super().__init__(state_dir, ring_bits)
        self.counted: dict[str, set[int]] = {}  # participant -> counted chunk indices
        self.applied = 0  # chunks applied since start (a change counter)
        self.withdrew = False  # a delta of the open step was taken out of the sum

    def open_step(self, step: int, base_model: Path, ranges: SharedRanges | None = None) -> None:
        if step != self.step:
            self.counted, self.withdrew = {}, False
        super().open_step(step, base_model, ranges)

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        with tracing.child_span("aggregate", step=m.step, participant=m.participant, index=index):
            super().apply(m, index, prepared)
        self.counted.setdefault(m.participant, set()).add(index)
        self.applied += 1

    def retract(self, m: Manifest, index: int, body: bytes) -> None:
        super().retract(m, index, body)
        self.counted.get(m.participant, set()).discard(index)
        self.withdrew = True
        self.applied += 1


async def run_aggregator(settings: AggregatorSettings, stop: asyncio.Event) -> None:
    ingest = settings.ingest
    sink = TracedSink(ingest.state_dir, ingest.ring_bits if ingest.secure_aggregation else None)
    ledger = IngestLedger(
        ingest.state_dir, ingest.participants, ingest.first_step, ingest.max_payload_bytes, sink,
        member_keys=member_keys(ingest.member_keys),
        secure_aggregation=ingest.secure_aggregation, ring_bits=ingest.ring_bits,
    )  # fmt: skip
    bus = await Bus.connect(ingest.bus, name=SERVICE)
    try:
        await AggregatorService(settings, bus, ledger, sink).run(stop)
    finally:
        await bus.close()
        sink.close()
        ledger.close()

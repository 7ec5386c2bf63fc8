"""The hub's result does not depend on how deltas arrive: the same deltas, delivered in
order, shuffled, interleaved, with duplicated chunks and manifests, and across a restart
of the aggregator, give bit-identical models. Real ledger, store and running sum; no
broker (the service around them is tested in test_federation.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed.aggregation import ServerOptimizer, finalize_step, weight_total
from foldfed.aggregator.sink import AggregationSink
from foldfed.deltafile import write_delta
from foldfed.digests import file_digest
from foldfed.domain import CODEC_SAFETENSORS, Chunk, Manifest, StepReleased
from foldfed.errors import Reject
from foldfed.ingest.ledger import IngestLedger
from foldfed.messages import encode
from foldfed.payloadfile import plan_chunks, read_chunk

PARTICIPANTS = ("org-a", "org-b", "org-c")
CHUNK = 1 << 20
SHAPES = {"encoder.weight": (700, 1000), "encoder.bias": (1000,), "head.weight": (10, 1000)}


@dataclass(frozen=True)
class Delivery:
    manifest: Manifest
    serialized: bytes
    chunks: tuple[Chunk, ...]


def model(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Delivery]]:
    root = tmp_path_factory.mktemp("deltas")
    base = root / "theta0.safetensors"
    write_delta(base, model(0, 1.0))
    deliveries = []
    for i, participant in enumerate(PARTICIPANTS):
        path = root / f"{participant}.safetensors"
        write_delta(path, model(10 + i, 1e-3))
        plan = plan_chunks(path, CHUNK)
        manifest = Manifest(
            step=1,
            participant=participant,
            weight=float(100 * (i + 1)),
            codec=CODEC_SAFETENSORS,
            tensors=plan.tensors,
            chunk_size=CHUNK,
            payload_size=plan.payload_size,
            chunk_digests=plan.chunk_digests,
            payload_digest=plan.payload_digest,
        )
        chunks = tuple(
            Chunk(1, participant, j, d, read_chunk(path, CHUNK, j))
            for j, d in enumerate(plan.chunk_digests)
        )
        deliveries.append(Delivery(manifest, encode(manifest)[1], chunks))
    return base, deliveries


def aggregate(state: Path, base: Path, messages: list[Manifest | Chunk], restart_at=None) -> bytes:
    """Feed `messages` to a hub ledger + running sum, then finalize; the model's digest.
    `restart_at`: drop the in-memory state after that many messages and reopen, as a
    restarted aggregator does (the sum is rebuilt from the store)."""
    sink = AggregationSink(state)
    ledger = IngestLedger(state, PARTICIPANTS, 1, 1 << 30, sink)
    ledger.on_step_released(StepReleased(1, b"", PARTICIPANTS))  # opened by hand: any base
    sink.open_step(1, base)
    serialized = {m.participant: encode(m)[1] for m in messages if isinstance(m, Manifest)}
    for n, message in enumerate(messages):
        if n == restart_at:
            sink.close()
            ledger.close()
            sink = AggregationSink(state)
            ledger = IngestLedger(state, PARTICIPANTS, 1, 1 << 30, sink)
            sink.open_step(1, base)
            ledger.replay_open_step()
        if isinstance(message, Manifest):
            ledger.on_manifest(message, serialized[message.participant])
        else:
            ledger.on_chunk(message)
    assert ledger.delivered(1) == set(PARTICIPANTS)
    layout, accumulator = sink._ready()
    result = finalize_step(
        layout,
        accumulator,
        weight_total(ledger.weights(1).values()),
        base,
        state / "update.safetensors",
        state / "model.safetensors",
        ServerOptimizer("fedavg"),
        state / "optimizer",
        step=1,
    )
    ledger.close()
    sink.close()
    assert result.model_digest == file_digest(result.model_path)
    return result.model_digest


def in_order(deliveries: list[Delivery]) -> list[Manifest | Chunk]:
    return [m for d in deliveries for m in (d.manifest, *d.chunks)]


def test_order_duplicates_and_restarts_do_not_change_the_model(
    files: tuple[Path, list[Delivery]], tmp_path: Path
) -> None:
    base, deliveries = files
    reference = aggregate(tmp_path / "ordered", base, in_order(deliveries))

    rng = random.Random(1234)
    for trial in range(4):
        messages = in_order(deliveries)
        # Duplicates: every participant re-sends its manifest and two chunks.
        for d in deliveries:
            messages += [d.manifest, *rng.sample(d.chunks, 2)]
        rng.shuffle(messages)  # chunks before manifests included
        restart = rng.randrange(1, len(messages)) if trial % 2 else None
        digest = aggregate(tmp_path / f"shuffled-{trial}", base, messages, restart)
        assert digest == reference, f"trial {trial} (restart at {restart})"


def test_a_chunk_with_non_finite_values_is_refused_and_counts_for_nothing(
    files: tuple[Path, list[Delivery]], tmp_path: Path
) -> None:
    base, deliveries = files
    path = tmp_path / "nan.safetensors"
    poisoned = model(10, 1e-3)
    poisoned["encoder.weight"][0, 0] = float("nan")
    write_delta(path, poisoned)
    plan = plan_chunks(path, CHUNK)
    good = deliveries[0]
    bad_manifest = Manifest(
        **{
            **good.manifest.__dict__,
            "chunk_digests": plan.chunk_digests,
            "payload_digest": plan.payload_digest,
        }
    )
    state = tmp_path / "hub"
    sink = AggregationSink(state)
    ledger = IngestLedger(state, PARTICIPANTS, 1, 1 << 30, sink)
    ledger.on_step_released(StepReleased(1, b"", PARTICIPANTS))
    sink.open_step(1, base)
    ledger.on_manifest(bad_manifest, encode(bad_manifest)[1])
    with pytest.raises(Reject, match="non-finite"):
        ledger.on_chunk(Chunk(1, "org-a", 0, plan.chunk_digests[0], read_chunk(path, CHUNK, 0)))
    assert not ledger.store.has(plan.chunk_digests[0])  # nothing of it was kept
    ledger.close()
    sink.close()


def test_the_sum_of_a_step_is_kept_when_that_step_is_opened_again(
    files: tuple[Path, list[Delivery]], tmp_path: Path
) -> None:
    """The running sum belongs to one step: opening that step again (a release the
    aggregator sees after the sum was opened at start) keeps what it counted, a new step
    starts from zero, and a chunk of another step is refused before it is stored."""
    base, deliveries = files
    first = deliveries[0]
    (tmp_path / "hub").mkdir()
    sink = AggregationSink(tmp_path / "hub")
    sink.open_step(1, base)
    prepared = sink.validate(first.manifest, 0, first.chunks[0].body)
    sink.apply(first.manifest, 0, prepared)

    def total() -> np.ndarray:
        _, accumulator = sink._ready()
        return accumulator.read(0, accumulator.elements).copy()

    counted = total()
    assert counted.any()

    sink.open_step(1, base)
    assert np.array_equal(total(), counted)
    later = Manifest(**{**first.manifest.__dict__, "step": 2})
    with pytest.raises(RuntimeError, match="step 1's, not step 2's"):
        sink.validate(later, 0, first.chunks[0].body)

    sink.open_step(2, base)
    assert not total().any()
    sink.close()

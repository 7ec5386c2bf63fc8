"""Coded deltas at the hub, without a broker: real ledger, store and running sum.

- the sum of coded deltas does not depend on arrival order (shuffled chunks, duplicates,
  a restart that replays the store): integer sums of decoded values, bit for bit;
- a manifest naming an unknown codec, another spec, seed, cycle or shared ranges than the
  step's is rejected with a reason, nothing of it is stored, and the step still completes;
- the coded-vector arithmetic (codedvector.py) is right on its own.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed.aggregator.sink import AggregationSink
from foldfed.codecs import CodecContext, block_stats, codec_from_spec, encode_vector, plan_chunks
from foldfed.codedvector import (
    CycleCoding,
    chunk_bounds,
    ranges_for,
    ranges_from_bytes,
    ranges_to_bytes,
    stats_from_bytes,
    stats_to_bytes,
    vector_spans,
)
from foldfed.deltafile import write_delta
from foldfed.digests import digest_of
from foldfed.domain import CODEC_CODED_VECTOR, Chunk, Manifest, StepReleased, manifest_of
from foldfed.errors import CodecError, Reject
from foldfed.format import TensorSpec, canonical_order
from foldfed.ingest.ledger import IngestLedger
from foldfed.messages import encode
from foldfed.payloadfile import plan_chunks as plan_chunks_of_file

PARTICIPANTS = ("org-a", "org-b", "org-c")
SPEC = (
    "rotated:v1;bits=2;block=4096;floor=0.01;init=0.001;mult=2.0;rounding=stochastic;"
    "scale=shared+zstd:v1;level=3"
)
SHAPES = {"encoder.weight": (4500, 1000), "encoder.bias": (1000,), "head.weight": (10, 1000)}
LIMIT = 1 << 20
SEED, CYCLE = 3, 1
MODEL = digest_of(b"theta_1")


def _names() -> list[str]:
    specs = [TensorSpec(n, "F32", s) for n, s in SHAPES.items()]
    return [s.name for s in canonical_order(specs)]


def _delivery(participant: str, i: int, ranges_digest: bytes, ranges) -> tuple[Manifest, list]:
    codec = codec_from_spec(SPEC)
    rng = np.random.default_rng(100 + i)
    values = (rng.standard_normal(sum(np.prod(s) for s in SHAPES.values())) * 1e-3).astype(
        np.float32
    )
    tensors = vector_spans([(n, "F32", SHAPES[n]) for n in _names()])
    ctx = CodecContext(CYCLE, 1, participant, "up", SEED, ranges)
    chunks = encode_vector(codec, values, ctx, plan_chunks(codec, values.size, LIMIT))
    manifest = Manifest(
        step=1,
        participant=participant,
        weight=float(10 * (i + 1)),
        codec=CODEC_CODED_VECTOR,
        tensors=tensors,
        chunk_size=LIMIT,
        payload_size=sum(len(c) for c in chunks),
        chunk_digests=tuple(digest_of(c) for c in chunks),
        payload_digest=digest_of(b"".join(chunks)),
        base_model_digest=MODEL,
        codec_spec=SPEC,
        cycle=CYCLE,
        codec_seed=SEED,
        chunk_sizes=tuple(len(c) for c in chunks),
        shared_ranges_digest=ranges_digest,
        block_stats=stats_to_bytes(block_stats(values, 4096)),
    )
    return manifest, chunks


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "theta.safetensors"
    g = torch.Generator().manual_seed(0)
    write_delta(path, {n: torch.randn(s, generator=g) for n, s in SHAPES.items()})
    return path


def _open(root: Path, base: Path) -> tuple[IngestLedger, AggregationSink]:
    sink = AggregationSink(root)
    ledger = IngestLedger(root, PARTICIPANTS, 1, 1 << 30, sink)
    release = StepReleased(1, MODEL, PARTICIPANTS, cycle=CYCLE, codec=SPEC, codec_seed=SEED)
    ledger.on_step_released(release)
    sink.open_step(1, base)
    elements = sum(int(np.prod(s)) for s in SHAPES.values())
    sink.ranges = ranges_for(codec_from_spec(SPEC), elements, [])  # a first step: init
    return ledger, sink


def _deliveries() -> list[tuple[Manifest, list]]:
    elements = sum(int(np.prod(s)) for s in SHAPES.values())
    ranges = ranges_for(codec_from_spec(SPEC), elements, [])
    return [_delivery(p, i, b"", ranges) for i, p in enumerate(PARTICIPANTS)]


def _sum(root: Path, base: Path, order: list[tuple[int, int]], dup: bool) -> np.ndarray:
    ledger, sink = _open(root, base)
    deliveries = _deliveries()
    for m, _ in deliveries:
        ledger.on_manifest(m, encode(m)[1])
    for p, index in order:
        m, chunks = deliveries[p]
        chunk = Chunk(1, m.participant, index, m.chunk_digests[index], chunks[index])
        ledger.on_chunk(chunk)
        if dup:
            ledger.on_chunk(chunk)
    assert ledger.delivered(1) == set(PARTICIPANTS)
    layout, acc = sink._ready()
    total = acc.read(0, layout.elements).copy()
    sink.close()
    ledger.close()
    return total


def test_coded_sum_does_not_depend_on_arrival_order_duplicates_or_restarts(
    tmp_path: Path, base: Path
) -> None:
    order = [(p, i) for p, (m, _) in enumerate(_deliveries()) for i in range(len(m.chunk_sizes))]
    assert len(order) > 3, "several chunks per delta, or the test proves little"
    in_order = _sum(tmp_path / "a", base, order, dup=False)
    shuffled = order[:]
    random.Random(5).shuffle(shuffled)
    assert np.array_equal(in_order, _sum(tmp_path / "b", base, shuffled, dup=True))
    assert np.any(in_order != 0)
    # A restarted aggregator rebuilds the same sum from its store.
    ledger, sink = _open(tmp_path / "b", base)
    ledger.replay_open_step()
    layout, acc = sink._ready()
    assert np.array_equal(in_order, acc.read(0, layout.elements))
    ledger.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"codec_spec": "nonsense:v1"}, "unknown codec 'nonsense'"),
        ({"codec_spec": SPEC.replace("bits=2", "bits=3")}, "rotated.bits 3 vs 2"),
        ({"codec_seed": SEED + 1}, "seed"),
        ({"cycle": CYCLE + 1}, "cycle"),
        ({"shared_ranges_digest": digest_of(b"other ranges")}, "shared ranges"),
        ({"block_stats": b""}, "block statistics"),
        ({"chunk_sizes": ()}, "sizes"),
    ],
)
def test_a_manifest_not_coded_as_the_cycle_is_rejected_and_the_step_completes(
    tmp_path: Path, base: Path, change: dict, reason: str
) -> None:
    ledger, _ = _open(tmp_path, base)
    deliveries = _deliveries()
    bad = replace(deliveries[0][0], **change)
    with pytest.raises(Reject, match=reason):
        ledger.on_manifest(bad, encode(bad)[1])
    assert ledger.facts.accepted_id(1, bad.participant) is None  # nothing of it stored
    for m, chunks in deliveries:  # the step is intact: the right deltas still complete it
        ledger.on_manifest(m, encode(m)[1])
        for index, body in enumerate(chunks):
            ledger.on_chunk(Chunk(1, m.participant, index, m.chunk_digests[index], body))
    assert ledger.delivered(1) == set(PARTICIPANTS)
    ledger.close()


def test_a_safetensors_payload_in_a_coded_cycle_is_rejected(tmp_path: Path, base: Path) -> None:
    ledger, _ = _open(tmp_path, base)
    plan = plan_chunks_of_file(base, LIMIT)  # a well-formed safetensors delta
    plain = manifest_of(plan, step=1, participant="org-a", weight=1.0, base_model_digest=MODEL)
    with pytest.raises(Reject, match="the cycle's codec is"):
        ledger.on_manifest(plain, encode(plain)[1])
    ledger.close()


def test_a_chunk_that_does_not_decode_is_rejected_before_it_counts(
    tmp_path: Path, base: Path
) -> None:
    ledger, sink = _open(tmp_path, base)
    m, chunks = _deliveries()[0]
    body = b"\x02" + chunks[0][1:]  # an unknown zstd-layer flag, named by its own digest
    bad = replace(m, chunk_digests=(digest_of(body), *m.chunk_digests[1:]))
    ledger.on_manifest(bad, encode(bad)[1])
    with pytest.raises(Reject, match="does not decode"):
        ledger.on_chunk(Chunk(1, m.participant, 0, digest_of(body), body))
    layout, acc = sink._ready()
    assert not np.any(acc.read(0, layout.elements))  # nothing was added
    ledger.close()


# ---------------------------------------------------------------- pure arithmetic


def test_chunk_bounds_follow_the_coded_sizes() -> None:
    m, _ = _deliveries()[0]
    ends = np.cumsum(m.chunk_sizes)
    for i in range(len(m.chunk_sizes)):
        begin, end = chunk_bounds(m, i)
        assert end == ends[i] and end - begin == m.chunk_sizes[i]


def test_ranges_and_statistics_round_trip_their_wire_form() -> None:
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    stats = block_stats(x, 4096)
    back = stats_from_bytes(stats_to_bytes(stats), x.size, 4096)
    assert np.array_equal(back.square_sums, stats.square_sums)
    assert np.array_equal(back.padded, stats.padded)
    ranges = ranges_for(codec_from_spec(SPEC), x.size, [stats])
    again = ranges_from_bytes(ranges_to_bytes(ranges), x.size, 4096)
    assert np.array_equal(again.values, ranges.values)  # already float32 values
    with pytest.raises(CodecError):
        stats_from_bytes(b"\x00" * 8, x.size, 4096)


def test_the_reference_coding_refuses_coded_manifests() -> None:
    from foldfed.codedvector import check_coding

    m, _ = _deliveries()[0]
    with pytest.raises(Reject, match="fp32:v1"):
        check_coding(m, CycleCoding())
    assert check_coding(m, CycleCoding(SPEC, SEED, CYCLE)) is not None

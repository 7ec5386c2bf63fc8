"""Update bounds (issue 14, item 3), without a broker: real ledger, store, running sum and
uplink coder.

- the bound arithmetic (aggregation/normbound.py): order-free, idempotent, monotone;
- the hub: a delta over the bound is refused at the chunk that breaks it, with a reason,
  nothing of it stays in the sum (the sum equals one that never saw it, bit for bit, also
  after a restart's replay), and its sender's bounded delta then completes the step;
- the member: with clip off an oversized delta is refused before sending; with clip on
  what the hub decodes is within the bound, under a lossy codec too, and the hub accepts it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from foldfed.aggregation.normbound import (
    CLIP_TARGET,
    NormTally,
    OverBound,
    clip_scale,
    norm_of,
    sendable,
    squared_norm,
)
from foldfed.aggregator.sink import AggregationSink
from foldfed.chunkstore import ChunkStore
from foldfed.digests import digest_of
from foldfed.domain import Chunk, Manifest, StepReleased, manifest_of
from foldfed.format import TensorSpec, encode_header
from foldfed.ingest.ledger import ChunkBatch, IngestLedger
from foldfed.messages import encode
from foldfed.payloadfile import plan_chunks, read_chunk
from foldfed.spool import DeltaRecord
from foldfed.uploader.bounding import UpdateOverBound
from foldfed.uploader.coding import UplinkCoder

PARTICIPANTS = ("org-a", "org-b")
N = 600_000  # 2.4 MB of float32: three chunks of 1 MiB
LIMIT = 1 << 20
WEIGHT = 4096.0
MODEL = digest_of(b"theta_1")
BOUND = 1.0
# 2-bit stochastic rotation with per-block scales: decoding adds energy to what was coded.
LOSSY = "rotated:v1;bits=2;block=4096;mult=2.0;rounding=stochastic;scale=block+zstd:v1;level=3"

# ---------------------------------------------------------------- the arithmetic


def test_a_tally_is_order_free_and_counts_a_chunk_once() -> None:
    squares = [random.Random(i).random() * 0.1 for i in range(50)]
    totals = set()
    for seed in range(5):
        order = list(range(50))
        random.Random(seed).shuffle(order)
        tally = NormTally(bound=10.0)
        for i in order:
            tally.admit(i, squares[i])
            tally.admit(i, squares[i])  # a redelivery
        totals.add(tally.norm())
    assert totals == {norm_of(squares)}


def test_the_chunk_that_breaks_the_bound_is_refused_and_not_counted() -> None:
    tally = NormTally(bound=1.0)
    tally.admit(0, 0.5)
    tally.admit(1, 0.49)
    with pytest.raises(OverBound, match="over the bound") as info:
        tally.admit(2, 0.02)
    assert "at chunk 2" in info.value.reason
    assert tally.squares == {0: 0.5, 1: 0.49}
    NormTally(bound=0.0).admit(0, 1e30)  # no bound


def test_clip_and_send_rules() -> None:
    assert clip_scale(0.5, 1.0) == 1.0 and clip_scale(5.0, 0.0) == 1.0
    assert math.isclose(clip_scale(4.0, 1.0) * 4.0, CLIP_TARGET)
    assert sendable(CLIP_TARGET, 1.0) and not sendable(1.0, 1.0) and sendable(1e9, 0.0)
    values = np.array([3.0, 4.0], np.float32)
    assert squared_norm(values) == 25.0


# ---------------------------------------------------------------- the hub


def _payload(path: Path, values: np.ndarray) -> Path:
    spec = TensorSpec("w", "F32", (values.size,))
    path.write_bytes(encode_header([spec]) + values.astype(np.float32).tobytes())
    return path


def _delta(tmp: Path, participant: str, values: np.ndarray) -> tuple[Manifest, list[bytes]]:
    path = _payload(tmp / f"{participant}-{digest_of(values.tobytes()).hex()[:8]}.st", values)
    plan = plan_chunks(path, LIMIT)
    m = manifest_of(plan, step=1, participant=participant, weight=WEIGHT, base_model_digest=MODEL)
    return m, [read_chunk(path, LIMIT, i) for i in range(len(plan.chunk_digests))]


def _open(
    root: Path, base: Path, bound: float = BOUND, codec: str = "fp32:v1"
) -> tuple[IngestLedger, AggregationSink]:
    sink = AggregationSink(root)
    ledger = IngestLedger(root, PARTICIPANTS, 1, 1 << 30, sink)
    release = StepReleased(
        1, MODEL, PARTICIPANTS, cycle=1, codec=codec, codec_seed=7, update_norm_bound=bound
    )
    ledger.on_step_released(release)
    sink.open_step(1, base)
    sink.bound = ledger.facts.open_step().norm_bound
    return ledger, sink


def _send(ledger: IngestLedger, m: Manifest, chunks: list[bytes], order: list[int]) -> None:
    ledger.on_manifest(m, encode(m)[1])
    for i in order:
        ledger.on_chunk(Chunk(1, m.participant, i, m.chunk_digests[i], chunks[i]))


def _sum(sink: AggregationSink) -> np.ndarray:
    layout, acc = sink._ready()
    return acc.read(0, layout.elements).copy()


def _vector(seed: int, norm: float) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(N)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return _payload(tmp_path / "theta.safetensors", np.zeros(N, np.float32))


def test_a_delta_over_the_bound_leaves_nothing_in_the_sum(tmp_path: Path, base: Path) -> None:
    honest_a, honest_b = _vector(1, 0.9), _vector(2, 0.5)
    big = (honest_a * 3.0).astype(np.float32)  # norm 2.7: chunk 1 or 2 breaks it
    # The reference: a hub that only ever saw the two accepted deltas.
    ref_ledger, ref_sink = _open(tmp_path / "ref", base)
    for p, v in (("org-a", honest_a), ("org-b", honest_b)):
        _send(ref_ledger, *_delta(tmp_path, p, v), [0, 1, 2])
    expected = _sum(ref_sink)
    ref_sink.close()
    ref_ledger.close()

    root = tmp_path / "hub"
    ledger, sink = _open(root, base)
    _send(ledger, *_delta(tmp_path, "org-b", honest_b), [2, 0, 1])
    m, chunks = _delta(tmp_path, "org-a", big)
    with pytest.raises(OverBound, match="update norm over the bound") as info:
        _send(ledger, m, chunks, [0, 1, 2])
    assert f"> {BOUND:.6g}" in info.value.reason
    assert ledger.facts.accepted_id(1, "org-a") is None  # withdrawn: room for another
    assert ledger.delivered(1) == {"org-b"}
    # A chunk of the withdrawn delta arriving late counts for nothing.
    ledger.on_chunk(Chunk(1, "org-a", 2, m.chunk_digests[2], chunks[2]))
    # The member's bounded delta completes the step.
    _send(ledger, *_delta(tmp_path, "org-a", honest_a), [1, 2, 0])
    assert ledger.delivered(1) == set(PARTICIPANTS)
    assert np.array_equal(_sum(sink), expected)
    sink.close()
    ledger.close()
    # A restart replays the store: the same sum, bit for bit, nothing of the big delta.
    ledger, sink = _open(root, base)
    sink.open_step(1, base)
    ledger.replay_open_step()
    assert np.array_equal(_sum(sink), expected)
    sink.close()
    ledger.close()


def test_in_one_group_commit_the_breaking_chunk_takes_its_batch_mates_out_too(
    tmp_path: Path, base: Path
) -> None:
    # Ingest stages a batch of chunks before it commits them together (group commit): the
    # chunks of an oversized delta staged before the one that breaks the bound must not
    # reach the sum when the batch commits, though they were accepted when staged.
    honest_a, honest_b = _vector(1, 0.9), _vector(2, 0.5)
    big = (honest_a * 1.01).astype(np.float32)  # no chunk in common with honest_a
    big[N // 2 :] *= 4.0  # chunk 0 alone is within the bound; a later one breaks it
    ref_ledger, ref_sink = _open(tmp_path / "ref", base)
    for p, v in (("org-a", honest_a), ("org-b", honest_b)):
        _send(ref_ledger, *_delta(tmp_path, p, v), [0, 1, 2])
    expected = _sum(ref_sink)
    ref_sink.close()
    ref_ledger.close()

    ledger, sink = _open(tmp_path / "hub", base)
    _send(ledger, *_delta(tmp_path, "org-b", honest_b), [0, 1, 2])
    m, chunks = _delta(tmp_path, "org-a", big)
    ledger.on_manifest(m, encode(m)[1])
    batch, refused = ChunkBatch(), 0
    for i in range(3):
        try:
            ledger.stage_chunk(batch, Chunk(1, "org-a", i, m.chunk_digests[i], chunks[i]))
        except OverBound:
            refused += 1
    assert refused == 1
    assert batch.deliveries[0].chunk.index == 0  # staged, counted, before the breach
    ledger.commit_chunks(batch)
    for staged in batch.deliveries:
        ledger.apply_chunk(staged)
    # Kept as chunks without a manifest: present, not counted, and not "duplicates" either.
    assert not any(staged.outcome and staged.outcome.duplicate for staged in batch.deliveries)
    assert ledger.delivered(1) == {"org-b"}
    _send(ledger, *_delta(tmp_path, "org-a", honest_a), [2, 1, 0])
    assert ledger.delivered(1) == set(PARTICIPANTS)
    assert np.array_equal(_sum(sink), expected)
    sink.close()
    ledger.close()


def test_without_a_bound_nothing_changes(tmp_path: Path, base: Path) -> None:
    ledger, sink = _open(tmp_path / "hub", base, bound=0.0)
    _send(ledger, *_delta(tmp_path, "org-a", _vector(1, 1e3)), [0, 1, 2])
    assert ledger.delivered(1) == {"org-a"}
    sink.close()
    ledger.close()


# ---------------------------------------------------------------- the member


def _coder(spool: Path, *, clip: bool, spec: str, bound: float) -> UplinkCoder:
    coder = UplinkCoder(spool, "org-a", LIMIT, ChunkStore(spool / "downloads"), clip=clip)
    release = StepReleased(
        1, MODEL, PARTICIPANTS, cycle=1, codec=spec, codec_seed=7, update_norm_bound=bound
    )
    coder.remember(release, None)
    return coder


def _record(tmp: Path, values: np.ndarray) -> DeltaRecord:
    path = _payload(tmp / "delta.safetensors", values)
    return DeltaRecord(1, path, path.stat().st_size, WEIGHT, MODEL, {})


def test_a_member_refuses_an_oversized_delta_without_clip(tmp_path: Path) -> None:
    record = _record(tmp_path, _vector(3, 2.0))
    coder = _coder(tmp_path / "spool", clip=False, spec="fp32:v1", bound=BOUND)
    with pytest.raises(UpdateOverBound, match="over the cycle's bound"):
        coder.bounded_payload(record)
    coded = _coder(tmp_path / "spool2", clip=False, spec=LOSSY, bound=BOUND)
    with pytest.raises(UpdateOverBound, match="FOLDFED_UPDATE_CLIP"):
        coded.prepare(record)
    small = _record(tmp_path, _vector(3, 0.5))
    assert coder.bounded_payload(small) == small.path


def test_a_clipped_fp32_delta_is_scaled_and_accepted(tmp_path: Path, base: Path) -> None:
    values = _vector(4, 3.0)
    coder = _coder(tmp_path / "spool", clip=True, spec="fp32:v1", bound=BOUND)
    path = coder.bounded_payload(_record(tmp_path, values))
    sent = np.frombuffer(path.read_bytes()[-4 * N :], np.float32)
    ratio = sent.astype(np.float64) / values.astype(np.float64)
    assert np.allclose(ratio, ratio[0], rtol=1e-6)  # scaled, direction kept
    assert np.linalg.norm(sent.astype(np.float64)) <= BOUND
    ledger, sink = _open(tmp_path / "hub", base)
    plan = plan_chunks(path, LIMIT)
    m = manifest_of(plan, step=1, participant="org-a", weight=WEIGHT, base_model_digest=MODEL)
    _send(ledger, m, [read_chunk(path, LIMIT, i) for i in range(3)], [0, 1, 2])
    assert ledger.delivered(1) == {"org-a"}
    sink.close()
    ledger.close()


def test_under_a_lossy_codec_the_bound_holds_on_what_the_hub_decodes(
    tmp_path: Path, base: Path
) -> None:
    """2-bit stochastic rotation adds energy: the member measures the decoded vector, not
    x, and the hub's own measure of the same chunks accepts it. The residual keeps only the
    codec error of what was sent, never the clipped excess."""
    values = _vector(5, 3.0)
    coder = _coder(tmp_path / "spool", clip=True, spec=LOSSY, bound=BOUND)
    prepared = coder.prepare(_record(tmp_path, values))
    assert prepared is not None
    payload = prepared.payload.read_bytes()
    m = prepared.manifest
    chunks, at = [], 0
    for size in m.chunk_sizes:
        chunks.append(payload[at : at + size])
        at += size
    ledger, sink = _open(tmp_path / "hub", base, codec=LOSSY)
    _send(ledger, m, chunks, list(range(len(chunks))))
    assert ledger.delivered(1) == {"org-a"}
    assert 0.5 * BOUND < sink._tallies["org-a"].norm() <= BOUND  # clipped, not zeroed
    residual = coder.residuals.load()
    assert residual is not None
    # x was 3.0 long and the sent vector ~1.0: a carried excess would leave |e| near 2.
    assert np.linalg.norm(residual.values.astype(np.float64)) < 1.5
    assert json.loads((coder.folder / "step-000000000001.json").read_bytes())["norm_bound"] == 1.0
    sink.close()
    ledger.close()

"""Which prefix of the global update is final, and which downlink chunks it completes.

Checked against a brute force: every element of every tensor marked covered when the
payload bytes (or coded-vector elements) that hold it lie in a counted chunk.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from foldfed.aggregation.finalize import canonical_header, canonical_order
from foldfed.aggregation.layout import ModelLayout
from foldfed.aggregation.progress import (
    CanonicalVector,
    DownlinkCut,
    MemberCoverage,
    final_prefix,
)
from foldfed.codecs import codec_from_spec, plan_chunks
from foldfed.codedvector import vector_spans
from foldfed.deltafile import write_delta
from foldfed.domain import CODEC_CODED_VECTOR, Manifest, manifest_of
from foldfed.format import MIN_CHUNK_SIZE, chunk_count, chunk_range, parse_layout
from foldfed.payloadfile import plan_chunks as plan_payload
from foldfed.payloadfile import read_layout

SHAPES = {
    "a.weight": (torch.float32, (300, 1000)),
    "b.weight": (torch.bfloat16, (500, 700)),
    "c.bias": (torch.float16, (999,)),
    "d": (torch.float64, (40_000,)),
    "empty": (torch.float32, (0, 4)),
}
SPEC = "rotated:v1;bits=2;block=4096;mult=2.0;rounding=nearest;scale=block"


def model() -> dict[str, torch.Tensor]:
    return {n: torch.zeros(shape, dtype=dtype) for n, (dtype, shape) in SHAPES.items()}


def canonical_of(layout: ModelLayout) -> CanonicalVector:
    return CanonicalVector.of((s.name, s.count) for s in canonical_order(layout))


def brute_prefix(m: Manifest, canonical: CanonicalVector, counted: set[int]) -> int:
    covered = np.zeros(canonical.elements, dtype=bool)
    if m.coded:
        plan = plan_chunks(codec_from_spec(m.codec_spec), m.tensors[-1].end, m.chunk_size)
        held = np.zeros(m.tensors[-1].end, dtype=bool)
        for index in counted:
            span = plan.span(index)
            held[span.begin : span.end] = True
        for t in m.tensors:
            at = canonical.offsets[t.name]
            covered[at : at + t.end - t.begin] = held[t.begin : t.end]
    else:
        ranges = [chunk_range(m.payload_size, m.chunk_size, i) for i in counted]
        for t in m.tensors:
            at = canonical.offsets[t.name]
            byte = t.begin + np.arange((t.end - t.begin) // t.itemsize) * t.itemsize
            for b, end in ranges:
                covered[at : at + byte.size] |= (b <= byte) & (byte < end)
    missing = np.flatnonzero(~covered)
    return int(missing[0]) if missing.size else canonical.elements


def plain_member(tmp: Path, name: str, foreign: bool) -> Manifest:
    path = tmp / f"{name}.safetensors"
    if foreign:  # another writer's order and header (a longer one, with metadata)
        safetensors.torch.save_file(model(), str(path), metadata={"who": name * 300})
    else:
        write_delta(path, model())
    plan = plan_payload(path, MIN_CHUNK_SIZE)
    return manifest_of(plan, step=1, participant=name, weight=1.0, base_model_digest=b"")


def coded_member(layout: ModelLayout, name: str, limit: int) -> Manifest:
    slots = list(reversed(canonical_order(layout)))  # a vector order other than canonical
    tensors = vector_spans([(s.name, s.dtype, s.shape) for s in slots])
    codec = codec_from_spec(SPEC)
    chunks = plan_chunks(codec, tensors[-1].end, limit).chunks
    return Manifest(
        step=1,
        participant=name,
        weight=1.0,
        codec=CODEC_CODED_VECTOR,
        tensors=tensors,
        chunk_size=limit,
        payload_size=chunks,
        chunk_digests=tuple(bytes(32) for _ in range(chunks)),
        payload_digest=bytes(32),
        codec_spec=SPEC,
        cycle=1,
        chunk_sizes=tuple(1 for _ in range(chunks)),
    )


def test_covered_prefixes_match_the_brute_force(tmp_path: Path) -> None:
    write_delta(tmp_path / "model.safetensors", model())
    layout = ModelLayout.from_spans(read_layout(tmp_path / "model.safetensors"))
    canonical = canonical_of(layout)
    members = {
        "ours": plain_member(tmp_path, "ours", foreign=False),
        "foreign": plain_member(tmp_path, "foreign", foreign=True),
        "coded": coded_member(layout, "coded", 40_000),
    }
    rng = random.Random(3)
    for m in members.values():
        coverage = MemberCoverage.of(m, canonical)
        n = len(m.chunk_digests)
        assert n > 2
        assert coverage.covered_prefix(set(range(n))) == canonical.elements
        assert coverage.covered_prefix(set()) == 0
        subsets = [set(range(k)) for k in range(n + 1)]
        subsets += [{i for i in range(n) if rng.random() < 0.7} for _ in range(20)]
        for counted in subsets:
            assert coverage.covered_prefix(counted) == brute_prefix(m, canonical, counted)


def test_the_step_prefix_is_the_slowest_members(tmp_path: Path) -> None:
    write_delta(tmp_path / "model.safetensors", model())
    layout = ModelLayout.from_spans(read_layout(tmp_path / "model.safetensors"))
    canonical = canonical_of(layout)
    a, b = plain_member(tmp_path, "a", False), plain_member(tmp_path, "b", False)
    coverage = {"a": MemberCoverage.of(a, canonical), "b": MemberCoverage.of(b, canonical)}
    everything = set(range(len(a.chunk_digests)))
    assert final_prefix(coverage, {"a": everything, "b": everything}, canonical.elements) == (
        canonical.elements
    )
    partial = coverage["b"].covered_prefix({0, 1})
    assert 0 < partial < canonical.elements
    assert final_prefix(coverage, {"a": everything, "b": {0, 1}}, canonical.elements) == partial
    assert final_prefix(coverage, {"a": everything}, canonical.elements) == 0


def test_plain_downlink_chunks_are_complete_exactly_when_their_bytes_are(tmp_path: Path) -> None:
    write_delta(tmp_path / "model.safetensors", model())
    layout = ModelLayout.from_spans(read_layout(tmp_path / "model.safetensors"))
    header = canonical_header(layout)
    spans = parse_layout(header)
    size = (tmp_path / "model.safetensors").stat().st_size
    cut = DownlinkCut.plain(spans, size, MIN_CHUNK_SIZE)
    assert cut.chunks == chunk_count(size, MIN_CHUNK_SIZE) and cut.ends[-1] == layout.elements
    canonical = canonical_of(layout)

    def bytes_known(prefix: int) -> int:  # the file's bytes written once `prefix` is final
        known = len(header)
        for s in sorted(spans, key=lambda s: s.begin):
            count = (s.end - s.begin) // s.itemsize
            inside = max(0, min(count, prefix - canonical.offsets[s.name]))
            known += inside * s.itemsize
        return known

    for prefix in [0, 1, 1000, *cut.ends, *(e - 1 for e in cut.ends), layout.elements]:
        known = bytes_known(prefix)
        ready = sum(
            1 for i in range(cut.chunks) if chunk_range(size, MIN_CHUNK_SIZE, i)[1] <= known
        )
        assert cut.ready(prefix) == ready, prefix


def test_coded_downlink_chunks_follow_the_plan() -> None:
    codec = codec_from_spec(SPEC)
    plan = plan_chunks(codec, 100_000, 4096)
    cut = DownlinkCut.coded((s.begin, s.end) for s in plan.spans())
    assert cut.ready(0) == 0 and cut.ready(100_000) == plan.chunks
    first = plan.span(0).end
    assert cut.ready(first - 1) == 0 and cut.ready(first) == 1
    assert cut.end_of(0) == 0 and cut.end_of(1) == first

"""How much of a step's global update is final while deltas still arrive. Pure.

The global update is elementwise in the integer sum: element p of the canonical-order
vector (the model's tensors in format.canonical_order, the order every update and model
file is written in) is final as soon as every member's contribution to p is counted. The
step's members and their weights are fixed when it is released, the sum is exact and
order-free, and a counted chunk is never counted again (duplicates are dropped by
(step, participant, chunk index)), so a final element never changes again — unless a
delta can be taken out of the sum after the fact, which only an update norm bound does
(aggregation/normbound.py: a later chunk over the bound withdraws the delta's earlier
chunks); the caller therefore uses this only when the step has no bound.

Each member's chunks carry elements of its own payload (a safetensors file cut into byte
chunks, or a coded vector cut by its codec's chunk plan, foldfed.codedvector): they are
mapped, tensor by tensor and by name, to intervals of the canonical vector
(`MemberCoverage`). With the member's counted chunk indices, the longest canonical prefix
its counted chunks cover is `MemberCoverage.covered_prefix`; the step's final prefix is the
smallest over its members (`final_prefix`).

A downlink chunk of the update is complete once the final prefix reaches its last element
(`DownlinkCut`): for a coded downlink the codec's chunk plan over the canonical vector,
for the plain update file (header, then the tensors in canonical order) its byte chunks.
Members upload in index order, so in practice the prefix advances chunk by chunk behind
the slowest member.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from foldfed.codedvector import chunk_plan, codec_of
from foldfed.domain import Manifest
from foldfed.format import TensorSpan, chunk_count, chunk_range, spans_in_chunk

Interval = tuple[int, int]  # [begin, end) in the canonical vector


@dataclass(frozen=True)
class CanonicalVector:
    """Where each tensor of the model starts in the canonical-order vector."""

    offsets: Mapping[str, int]
    elements: int

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, int]]) -> CanonicalVector:
        """From (name, element count) in canonical order."""
        offsets: dict[str, int] = {}
        at = 0
        for name, count in tensors:
            offsets[name] = at
            at += count
        return cls(offsets, at)

    def interval(self, name: str, first: int, count: int) -> Interval:
        """Elements [first, first + count) of tensor `name`, in the canonical vector."""
        begin = self.offsets[name] + first
        return begin, begin + count


@dataclass(frozen=True)
class MemberCoverage:
    """Per chunk index of one member's payload, the canonical intervals it carries."""

    chunks: tuple[tuple[Interval, ...], ...]

    @classmethod
    def of(cls, m: Manifest, canonical: CanonicalVector) -> MemberCoverage:
        """The coverage of `m`'s chunks (a checked manifest of the model's tensors)."""
        if m.coded:
            return cls(_coded_chunks(m, canonical))
        if m.masked:
            return cls(_masked_chunks(m, canonical))
        return cls(_plain_chunks(m, canonical))

    def covered_prefix(self, counted: Collection[int]) -> int:
        """The longest canonical prefix [0, P) that the chunks `counted` cover together."""
        pieces = sorted(
            interval
            for index in counted
            if 0 <= index < len(self.chunks)
            for interval in self.chunks[index]
        )
        reach = 0
        for begin, end in pieces:
            if begin > reach:
                break
            reach = max(reach, end)
        return reach


def final_prefix(
    members: Mapping[str, MemberCoverage],
    counted: Mapping[str, Collection[int]],
    elements: int,
) -> int:
    """The longest prefix every member has covered (`elements` with no member at all:
    callers require the step's full member set)."""
    reach = elements
    for participant, coverage in members.items():
        reach = min(reach, coverage.covered_prefix(counted.get(participant, ())))
    return reach


@dataclass(frozen=True)
class DownlinkCut:
    """The downlink chunks of the update, by the canonical element each is complete at."""

    ends: tuple[int, ...]  # ascending; the last is the vector's length

    @classmethod
    def coded(cls, spans: Iterable[tuple[int, int]]) -> DownlinkCut:
        """From a coded downlink's chunk plan: (begin, end) element spans in order."""
        return cls(tuple(end for _, end in spans))

    @classmethod
    def plain(cls, spans: Sequence[TensorSpan], payload_size: int, chunk_size: int) -> DownlinkCut:
        """From the plain update file's layout (canonical order, byte spans) and size."""
        canonical = CanonicalVector.of((s.name, _count(s)) for s in spans)
        ends = []
        for index in range(chunk_count(payload_size, chunk_size)):
            _, byte_end = chunk_range(payload_size, chunk_size, index)
            ends.append(_elements_before(spans, canonical, byte_end))
        return cls(tuple(ends))

    @property
    def chunks(self) -> int:
        return len(self.ends)

    def ready(self, prefix: int) -> int:
        """How many chunks, from the first, a final prefix of `prefix` elements completes."""
        return bisect.bisect_right(self.ends, prefix)

    def end_of(self, ready: int) -> int:
        """The element where the first `ready` chunks end (0 for none)."""
        return self.ends[ready - 1] if ready else 0


def _coded_chunks(m: Manifest, canonical: CanonicalVector) -> tuple[tuple[Interval, ...], ...]:
    plan = chunk_plan(m, codec_of(m))
    out = []
    for span in plan.spans():
        pieces = []
        for tensor in m.tensors:  # begin/end: element offsets in the member's vector
            lo, hi = max(tensor.begin, span.begin), min(tensor.end, span.end)
            if lo < hi:
                pieces.append(canonical.interval(tensor.name, lo - tensor.begin, hi - lo))
        out.append(_merged(pieces))
    return tuple(out)


def _masked_chunks(m: Manifest, canonical: CanonicalVector) -> tuple[tuple[Interval, ...], ...]:
    """A masked payload's chunks: whole ring words, tensors at element offsets."""
    size = m.ring_bits // 8
    out = []
    for index in range(chunk_count(m.payload_size, m.chunk_size)):
        begin, end = chunk_range(m.payload_size, m.chunk_size, index)
        pieces = []
        for tensor in m.tensors:
            lo, hi = max(tensor.begin, begin // size), min(tensor.end, end // size)
            if lo < hi:
                pieces.append(canonical.interval(tensor.name, lo - tensor.begin, hi - lo))
        out.append(_merged(pieces))
    return tuple(out)


def _plain_chunks(m: Manifest, canonical: CanonicalVector) -> tuple[tuple[Interval, ...], ...]:
    out = []
    for index in range(chunk_count(m.payload_size, m.chunk_size)):
        begin, end = chunk_range(m.payload_size, m.chunk_size, index)
        pieces = []
        for tensor, lo, hi in spans_in_chunk(m.tensors, begin, end):
            size = tensor.itemsize  # elements never straddle chunks (format.py)
            first = (lo - tensor.begin) // size
            pieces.append(canonical.interval(tensor.name, first, (hi - lo) // size))
        out.append(_merged(pieces))
    return tuple(out)


def _merged(pieces: list[Interval]) -> tuple[Interval, ...]:
    merged: list[Interval] = []
    for begin, end in sorted(pieces):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return tuple(merged)


def _count(span: TensorSpan) -> int:
    return (span.end - span.begin) // span.itemsize


def _elements_before(spans: Sequence[TensorSpan], canonical: CanonicalVector, byte_end: int) -> int:
    """How many canonical elements the file's bytes [0, byte_end) need: the elements of
    every tensor byte before `byte_end` (header bytes need none)."""
    needed = 0
    for span in spans:
        if span.begin >= byte_end:
            break
        inside = min(span.end, byte_end) - span.begin
        needed = canonical.offsets[span.name] + -(-inside // span.itemsize)
    return needed

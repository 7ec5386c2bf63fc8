"""The running sum of the open step, fed chunk by chunk by the ingest ledger.

A chunk of a safetensors payload is read as raw tensor bytes; a chunk of a coded vector
(foldfed.codedvector) is decoded with the codec and context its manifest names (the step's
shared ranges, for codecs that share them). Either way the values go onto the same
fixed-point grid, so the sum stays exact and order-free whatever the codec.

Memory stays about one chunk whatever the model size or the number of participants: the
int64 sum lives in a file (aggregation.Accumulator). The file is a cache of the store:
after a crash the ledger replays every counted chunk into a fresh one, and integer sums
do not depend on order, so the rebuilt sum is bit-identical.

The sum belongs to one step (`step`): opening the step it already holds keeps it, and a
chunk of any other step is refused before anything is stored. So the sum is never zeroed
under a delivery the ledger counted for that step (docs/format.md, section 9.5); the
ledger's rules make sure nothing counts for a step before it is opened.

Update bounds (docs/format.md, "Update bounds"): with the step's bound set, `validate`
also measures each chunk's decoded values and keeps a per-delta tally of sums of squares
(aggregation.normbound); the chunk that would take a delta over the bound raises
OverBound before it is stored. The delta's chunks counted until then are taken out of the
sum again by the ledger (`retract`): integer sums, so the sum is bit-identical to one that
never saw them.

Secure aggregation (docs/format.md, "Masked payloads"; foldfed.secagg): with `ring_bits`
set, every delta is a masked-ring payload and the sum is a masked sum (the accumulator's
ring mode): a chunk's words are added as they are, wrapping, and only the total, reduced
on the ring, means anything. No per-contribution range, finiteness or norm check is
possible on masked words: what is checked is size, shape, digest, signature and sender (as
for every payload), and the norm the member attests in its signed manifest against the
step's bound (`check_manifest`). A member that never delivers leaves the masks of its pairs
in the sum: the step cannot finish, and the barrier waits for it, as for any missing
member (synchronous steps; no dropout recovery).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foldfed.aggregation import (
    Accumulator,
    ModelLayout,
    quantize_chunk,
    quantize_vector_chunk,
)
from foldfed.aggregation.layout import chunk_values
from foldfed.aggregation.normbound import NormTally, squared_norm
from foldfed.codecs import Codec, SharedRanges, codec_from_spec
from foldfed.codedvector import chunk_plan, context_of, shared_rule
from foldfed.domain import Manifest
from foldfed.errors import CodecError, Reject
from foldfed.format import chunk_range
from foldfed.payloadfile import read_layout
from foldfed.secagg.masks import words_from_bytes, words_to_sum_terms

Pieces = list[tuple[int, np.ndarray]]


class AggregationSink:
    def __init__(self, state_dir: Path, ring_bits: int | None = None) -> None:
        self.state_dir = state_dir
        self.ring_bits = ring_bits  # secure aggregation: the masked sum's ring
        self.step: int | None = None  # the step whose deltas the sum holds
        self.layout: ModelLayout | None = None
        self.accumulator: Accumulator | None = None
        self.base_model: Path | None = None
        self.ranges: SharedRanges | None = None
        # The step's L2 bound on each delta as decoded (0.0: none), set with the ranges.
        self.bound = 0.0
        self._tallies: dict[str, NormTally] = {}  # participant -> its delta's tally
        self._codecs: dict[str, Codec] = {}

    def open_step(self, step: int, base_model: Path, ranges: SharedRanges | None = None) -> None:
        """Hold the sum of `step`'s deltas against `base_model` (θ_t): an empty one, unless
        the sum is already `step`'s, which is kept with what it counted. `ranges`: the
        step's shared ranges, for codecs that share them."""
        if step == self.step and self.accumulator is not None:
            self.ranges = ranges
            return
        self.close()
        self._tallies.clear()
        self.step = step
        self.base_model = base_model
        self.ranges = ranges
        self.layout = ModelLayout.from_spans(read_layout(base_model))
        self.accumulator = Accumulator(self.state_dir / "accumulator.i64", self.layout.elements)
        self.accumulator.reset()
        self.accumulator.ring_bits = self.ring_bits

    def close(self) -> None:
        if self.accumulator is not None:
            self.accumulator.close()
            self.accumulator = None
        self.step = None

    def _ready(self) -> tuple[ModelLayout, Accumulator]:
        if self.layout is None or self.accumulator is None:
            raise RuntimeError("no step is open in the aggregator")
        return self.layout, self.accumulator

    # ---------------------------------------------------------------- DeltaSink

    def check_manifest(self, m: Manifest) -> None:
        layout, _ = self._ready()
        layout.check_compatible(m.tensors)  # AggregationError is a Reject
        if m.masked:
            check_masked_layout(layout, m)
            if self.bound > 0 and not m.attested_norm <= self.bound:
                raise Reject(
                    f"attested norm {m.attested_norm:.6g} is above the step's update bound "
                    f"{self.bound:.6g}"
                )

    def validate(self, m: Manifest, index: int, body: bytes) -> Pieces:
        layout, _ = self._ready()
        if m.step != self.step:
            # The ledger's rules never count such a chunk: failing loudly here (before it
            # is stored) beats mixing two steps in one sum.
            raise RuntimeError(f"the running sum is step {self.step}'s, not step {m.step}'s")
        if m.coded:
            return self._validate_coded(layout, m, index, body)
        if m.masked:
            return masked_pieces(layout, m, index, body)
        pieces = quantize_chunk(
            layout, m.tensors, index, m.chunk_size, m.payload_size, body, m.weight
        )
        if self.bound > 0:  # after quantize_chunk: the values are known finite
            values = chunk_values(layout, m.tensors, index, m.chunk_size, m.payload_size, body)
            self._admit(m, index, sum(squared_norm(v) for v in values))
        return pieces

    def _validate_coded(self, layout: ModelLayout, m: Manifest, index: int, body: bytes) -> Pieces:
        values = self._decode(m, index, body)
        pieces = quantize_vector_chunk(layout, m.tensors, self._span_begin(m, index), values,
                                       m.weight)  # fmt: skip
        self._admit(m, index, squared_norm(values))
        return pieces

    def _decode(self, m: Manifest, index: int, body: bytes) -> np.ndarray:
        codec = self._codec(m.codec_spec)
        span = chunk_plan(m, codec).span(index)
        ranges = self.ranges if shared_rule(codec) is not None else None
        try:
            return codec.decode(body, span.elements, context_of(m, ranges), span.first_block)
        except CodecError as exc:
            raise Reject(f"chunk {index} does not decode: {exc}") from None

    def _span_begin(self, m: Manifest, index: int) -> int:
        return chunk_plan(m, self._codec(m.codec_spec)).span(index).begin

    def _admit(self, m: Manifest, index: int, square: float) -> None:
        """Count chunk `index` in its delta's norm, or raise OverBound (normbound)."""
        if self.bound <= 0:
            return
        tally = self._tallies.get(m.participant)
        if tally is None or tally.bound != self.bound:
            tally = self._tallies[m.participant] = NormTally(self.bound)
        tally.admit(index, square)

    def forget(self, m: Manifest) -> None:
        """Drop the norm tally of `m`'s delta (rejected: its next delta starts afresh)."""
        self._tallies.pop(m.participant, None)

    def _codec(self, spec: str) -> Codec:
        codec = self._codecs.get(spec)
        if codec is None:
            codec = self._codecs[spec] = codec_from_spec(spec)
        return codec

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        _, accumulator = self._ready()
        assert isinstance(prepared, list)
        accumulator.add_all(prepared)

    def retract(self, m: Manifest, index: int, body: bytes) -> None:
        """Take a counted chunk of a rejected delta out of the sum: its pieces negated.
        Integer addition, so the sum is bit-identical to one that never counted it."""
        layout, accumulator = self._ready()
        if m.masked:
            pieces = masked_pieces(layout, m, index, body)
            accumulator.add_all([(offset, -q) for offset, q in pieces])
            return
        if m.coded:
            values = self._decode(m, index, body)
            pieces = quantize_vector_chunk(
                layout, m.tensors, self._span_begin(m, index), values, m.weight
            )
        else:
            pieces = quantize_chunk(
                layout, m.tensors, index, m.chunk_size, m.payload_size, body, m.weight
            )
        accumulator.add_all([(offset, -q) for offset, q in pieces])


def check_masked_layout(layout: ModelLayout, m: Manifest) -> None:
    """Reject a masked manifest whose vector is not the model's layout: a member's mask at
    element e must meet the others' at e, so every member masks in the same order."""
    for span in m.tensors:
        if layout.slot(span.name).offset != span.begin:
            raise Reject(f"masked tensor {span.name!r} is not at its place in the model's order")


def masked_pieces(layout: ModelLayout, m: Manifest, index: int, body: bytes) -> Pieces:
    """A masked chunk's words as (element_offset, int64 terms) pieces of the model's tensors
    (no value checks: they are masked; see the module docstring)."""
    begin, end = chunk_range(m.payload_size, m.chunk_size, index)
    if len(body) != end - begin:
        raise Reject(f"chunk {index} has {len(body)} bytes, its range needs {end - begin}")
    size = m.ring_bits // 8
    first = begin // size  # chunk sizes are multiples of 8: words never straddle chunks
    terms = words_to_sum_terms(words_from_bytes(body, m.ring_bits), m.ring_bits)
    last = first + terms.size
    out = []
    for span in m.tensors:
        lo, hi = max(span.begin, first), min(span.end, last)
        if lo < hi:
            slot = layout.slot(span.name)
            out.append((slot.offset + lo - span.begin, terms[lo - first : hi - first]))
    return out

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
from foldfed.codecs import Codec, SharedRanges, codec_from_spec
from foldfed.codedvector import chunk_plan, context_of, shared_rule
from foldfed.domain import Manifest
from foldfed.errors import CodecError, Reject
from foldfed.payloadfile import read_layout

Pieces = list[tuple[int, np.ndarray]]


class AggregationSink:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.step: int | None = None  # the step whose deltas the sum holds
        self.layout: ModelLayout | None = None
        self.accumulator: Accumulator | None = None
        self.base_model: Path | None = None
        self.ranges: SharedRanges | None = None
        self._codecs: dict[str, Codec] = {}

    def open_step(self, step: int, base_model: Path, ranges: SharedRanges | None = None) -> None:
        """Hold the sum of `step`'s deltas against `base_model` (θ_t): an empty one, unless
        the sum is already `step`'s, which is kept with what it counted. `ranges`: the
        step's shared ranges, for codecs that share them."""
        if step == self.step and self.accumulator is not None:
            self.ranges = ranges
            return
        self.close()
        self.step = step
        self.base_model = base_model
        self.ranges = ranges
        self.layout = ModelLayout.from_spans(read_layout(base_model))
        self.accumulator = Accumulator(self.state_dir / "accumulator.i64", self.layout.elements)
        self.accumulator.reset()

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

    def validate(self, m: Manifest, index: int, body: bytes) -> Pieces:
        layout, _ = self._ready()
        if m.step != self.step:
            # The ledger's rules never count such a chunk: failing loudly here (before it
            # is stored) beats mixing two steps in one sum.
            raise RuntimeError(f"the running sum is step {self.step}'s, not step {m.step}'s")
        if m.coded:
            return self._validate_coded(layout, m, index, body)
        return quantize_chunk(
            layout, m.tensors, index, m.chunk_size, m.payload_size, body, m.weight
        )

    def _validate_coded(self, layout: ModelLayout, m: Manifest, index: int, body: bytes) -> Pieces:
        codec = self._codec(m.codec_spec)
        span = chunk_plan(m, codec).span(index)
        ranges = self.ranges if shared_rule(codec) is not None else None
        try:
            values = codec.decode(body, span.elements, context_of(m, ranges), span.first_block)
        except CodecError as exc:
            raise Reject(f"chunk {index} does not decode: {exc}") from None
        return quantize_vector_chunk(layout, m.tensors, span.begin, values, m.weight)

    def _codec(self, spec: str) -> Codec:
        codec = self._codecs.get(spec)
        if codec is None:
            codec = self._codecs[spec] = codec_from_spec(spec)
        return codec

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        _, accumulator = self._ready()
        assert isinstance(prepared, list)
        accumulator.add_all(prepared)

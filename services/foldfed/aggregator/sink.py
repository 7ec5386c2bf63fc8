"""The running sum of the open step, fed chunk by chunk by the ingest ledger.

Memory stays about one chunk whatever the model size or the number of participants: the
int64 sum lives in a file (aggregation.Accumulator). The file is a cache of the store:
after a crash the ledger replays every counted chunk into a fresh one, and integer sums
do not depend on order, so the rebuilt sum is bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foldfed.aggregation import Accumulator, ModelLayout, quantize_chunk
from foldfed.domain import Manifest
from foldfed.payloadfile import read_layout

Pieces = list[tuple[int, np.ndarray]]


class AggregationSink:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.layout: ModelLayout | None = None
        self.accumulator: Accumulator | None = None
        self.base_model: Path | None = None

    def open_step(self, base_model: Path) -> None:
        """Start an empty sum for deltas against `base_model` (θ_t of the open step)."""
        self.close()
        self.base_model = base_model
        self.layout = ModelLayout.from_spans(read_layout(base_model))
        self.accumulator = Accumulator(self.state_dir / "accumulator.i64", self.layout.elements)
        self.accumulator.reset()

    def close(self) -> None:
        if self.accumulator is not None:
            self.accumulator.close()
            self.accumulator = None

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
        return quantize_chunk(
            layout, m.tensors, index, m.chunk_size, m.payload_size, body, m.weight
        )

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        _, accumulator = self._ready()
        assert isinstance(prepared, list)
        accumulator.add_all(prepared)

"""The aggregator's arithmetic: exact fixed-point FedAvg, streamed through files.

No broker, no event loop, no database: chunks in, files out. The service wraps this.

    layout = ModelLayout.from_spans(model_spans)
    layout.check_compatible(manifest.tensors)                  # once per manifest
    with Accumulator(path, layout.elements) as acc:
        acc.add_all(quantize_chunk(layout, manifest.tensors, index, manifest.chunk_size,
                                   manifest.payload_size, body, manifest.weight))
        result = finalize_step(layout, acc, weight_total(weights), theta_t, update_path,
                               model_path, ServerOptimizer("fedavg"), state_dir, step=t)
"""

from foldfed.aggregation.accumulator import Accumulator
from foldfed.aggregation.errors import AggregationError, FinalizeError
from foldfed.aggregation.finalize import (
    DEFAULT_SLICE_ELEMENTS,
    FinalizeResult,
    canonical_header,
    canonical_order,
    finalize_step,
)
from foldfed.aggregation.fixedpoint import (
    DEFAULT_MAX_PARTICIPANTS,
    FRACTION_BITS,
    RESOLUTION,
    SCALE,
    contribution_bound,
    decode_span,
    dequantize_mean,
    quantize,
    weight_total,
)
from foldfed.aggregation.layout import (
    Contribution,
    ModelLayout,
    TensorSlot,
    chunk_contributions,
    quantize_chunk,
    quantize_vector_chunk,
)
from foldfed.aggregation.server_opt import OptimizerKind, ServerOptimizer
from foldfed.aggregation.state import OptimizerState

__all__ = [
    "DEFAULT_MAX_PARTICIPANTS",
    "DEFAULT_SLICE_ELEMENTS",
    "FRACTION_BITS",
    "RESOLUTION",
    "SCALE",
    "Accumulator",
    "AggregationError",
    "Contribution",
    "FinalizeError",
    "FinalizeResult",
    "ModelLayout",
    "OptimizerKind",
    "OptimizerState",
    "ServerOptimizer",
    "TensorSlot",
    "canonical_header",
    "canonical_order",
    "chunk_contributions",
    "contribution_bound",
    "decode_span",
    "dequantize_mean",
    "finalize_step",
    "quantize",
    "quantize_chunk",
    "quantize_vector_chunk",
    "weight_total",
]

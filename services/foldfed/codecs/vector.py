"""A whole flat vector through a codec, chunk by chunk, as an uploader or the hub would.

Each chunk is coded alone (plan.py), so these functions are a loop over the plan's spans;
they exist so callers (error feedback, benchmarks, the uploader and aggregator adapters)
need not repeat it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from foldfed.codecs.base import Codec, flat_float32
from foldfed.codecs.context import CodecContext
from foldfed.codecs.plan import ChunkPlan
from foldfed.errors import CodecError


def encode_vector(
    codec: Codec, values: np.ndarray, ctx: CodecContext, plan: ChunkPlan
) -> list[bytes]:
    """The coded chunks of `values` (float32, plan.elements of them), in order."""
    flat = flat_float32(values)
    if flat.size != plan.elements or codec.block != plan.block:
        raise CodecError(f"plan for {plan.elements} elements, blocks of {plan.block}: "
                         f"got {flat.size} elements, codec blocks of {codec.block}")  # fmt: skip
    return [codec.encode(flat[s.begin : s.end], ctx, s.first_block) for s in plan.spans()]


def decode_vector(
    codec: Codec, chunks: Sequence[bytes | memoryview], ctx: CodecContext, plan: ChunkPlan
) -> np.ndarray:
    """The float32 vector the chunks decode to."""
    if len(chunks) != plan.chunks:
        raise CodecError(f"plan has {plan.chunks} chunks, got {len(chunks)}")
    out = np.empty(plan.elements, dtype=np.float32)
    for span, data in zip(plan.spans(), chunks, strict=True):
        out[span.begin : span.end] = codec.decode(data, span.elements, ctx, span.first_block)
    return out


def wire_bytes(chunks: Sequence[bytes]) -> int:
    return sum(len(c) for c in chunks)

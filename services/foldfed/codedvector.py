"""The coded-vector payload: how a manifest describes an update coded chunk by chunk. Pure.

A manifest with codec `coded-vector` (docs/format.md, "Coded payloads") announces a flat
float32 vector: the trainable tensors, concatenated in the manifest's tensor order, each
tensor's `begin`/`end` being element offsets in the vector. The codec its `codec_spec`
names cuts the vector into chunks of whole blocks (codecs.plan_chunks with the manifest's
`chunk_size` as the limit), and chunk i travels as `codec.encode` of its elements, with the
context (cycle, step, sender, direction, seed, shared ranges) the manifest pins. The
payload is the coded chunks back to back; `chunk_sizes` says where each one ends, since
coded chunks (zstd) vary in size.

This module is the shared arithmetic of both ends: the manifest's checks against the
cycle's coding (`check_coding`, a Reject naming the reason), the codec context a
manifest implies, chunk byte ranges for either payload kind, and the wire forms of the
two per-block arrays that travel beside the codes: a member's block statistics (float64
little-endian sums of squares) and a step's shared ranges (float32 little-endian R_j,
named by their blake3 digest). Everything here is values in, values out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from foldfed.codecs import (
    BlockStats,
    Codec,
    CodecContext,
    SharedRanges,
    codec_from_spec,
    plan_chunks,
    pooled,
    require_allowed_codec,
    shared_ranges,
)
from foldfed.codecs.hadamard import padded_size
from foldfed.codecs.plan import ChunkPlan
from foldfed.codecs.rotated import RotatedCodec
from foldfed.codecs.zstdlayer import ZstdLayer
from foldfed.digests import digest_of, short
from foldfed.domain import REFERENCE_CODEC, Manifest
from foldfed.errors import CodecError, Reject
from foldfed.format import TensorSpan, chunk_range
from foldfed.topology import HUB_ID

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class CycleCoding:
    """What every member of a step codes with: the cycle's spec and seed, and the step's
    shared ranges (their digest; b"" when the codec has none)."""

    spec: str = REFERENCE_CODEC
    seed: int = 0
    cycle: int = 0
    ranges_digest: bytes = b""
    # Per-member specs a member may send instead of `spec` (no shared ranges).
    choices: tuple[str, ...] = ()

    @property
    def reference(self) -> bool:
        """The exact reference: deltas travel as safetensors payloads."""
        return self.spec == REFERENCE_CODEC


REFERENCE_CODING = CycleCoding()


# ---------------------------------------------------------------- the vector


def vector_spans(tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[TensorSpan, ...]:
    """(name, dtype, shape) in vector order -> spans with element offsets."""
    spans, offset = [], 0
    for name, dtype, shape in tensors:
        count = math.prod(shape)
        spans.append(TensorSpan(name, dtype, tuple(shape), offset, offset + count))
        offset += count
    return tuple(spans)


def vector_elements(m: Manifest) -> int:
    return m.tensors[-1].end if m.tensors else 0


def chunk_plan(m: Manifest, codec: Codec) -> ChunkPlan:
    """The plan every coder of `m`'s vector uses: whole blocks up to `chunk_size` bytes."""
    return plan_chunks(codec, vector_elements(m), m.chunk_size)


def chunk_bounds(m: Manifest, index: int) -> tuple[int, int]:
    """Byte range [begin, end) of chunk `index` in the payload, either payload kind."""
    if not m.coded:
        return chunk_range(m.payload_size, m.chunk_size, index)
    if not 0 <= index < len(m.chunk_sizes):
        raise CodecError(f"chunk {index} outside 0..{len(m.chunk_sizes) - 1}")
    begin = sum(m.chunk_sizes[:index])
    return begin, begin + m.chunk_sizes[index]


def context_of(m: Manifest, ranges: SharedRanges | None) -> CodecContext:
    """The codec context `m`'s chunks were coded in: the hub codes the downlink."""
    direction = "down" if m.participant == HUB_ID else "up"
    return CodecContext(m.cycle, m.step, m.participant, direction, m.codec_seed, ranges)


# ---------------------------------------------------------------- shared ranges


def shared_rule(codec: Codec) -> RotatedCodec | None:
    """The rotated codec under `codec` if its ranges are shared (scale=shared), else None."""
    inner = codec.inner if isinstance(codec, ZstdLayer) else codec
    if isinstance(inner, RotatedCodec) and inner.rule is not None:
        return inner
    return None


def ranges_for(codec: Codec, elements: int, reports: Sequence[BlockStats]) -> SharedRanges:
    """A step's shared ranges: from the previous step's members' statistics, or `init`."""
    rotated = shared_rule(codec)
    if rotated is None or rotated.rule is None:
        raise CodecError(f"{codec.spec} has no shared ranges")
    stats = pooled(reports) if reports else None
    rule = rotated.rule
    made = shared_ranges(
        stats, elements, rotated.block, mult=rotated.mult, floor=rule.floor, init=rule.init
    )
    # Ranges travel as float32; every party codes with the float32 values.
    return ranges_from_bytes(ranges_to_bytes(made), elements, rotated.block)


def ranges_to_bytes(ranges: SharedRanges) -> bytes:
    values = ranges.values.astype("<f4")
    # A positive range must stay positive in float32 (a denormal underflow would be 0).
    values = np.maximum(values, np.float32(np.finfo(np.float32).tiny)).astype("<f4")
    return values.tobytes()


def ranges_from_bytes(data: bytes, elements: int, block: int) -> SharedRanges:
    count = -(-elements // block)
    if len(data) != 4 * count:
        raise CodecError(f"shared ranges of {len(data)} bytes; {count} blocks need {4 * count}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float64)
    return SharedRanges(block, values)


def ranges_digest(data: bytes) -> bytes:
    return digest_of(data)


# ---------------------------------------------------------------- block statistics


def stats_to_bytes(stats: BlockStats) -> bytes:
    return stats.square_sums.astype("<f8").tobytes()


def stats_from_bytes(data: bytes, elements: int, block: int) -> BlockStats:
    """A member's reported statistics; CodecError unless one finite S_j >= 0 per block."""
    count = -(-elements // block)
    if len(data) != 8 * count:
        raise CodecError(f"block statistics of {len(data)} bytes; {count} blocks need {8 * count}")
    sums = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(sums)) or np.any(sums < 0):
        raise CodecError("block statistics must be finite and non-negative")
    full, tail = divmod(elements, block)
    padded = [float(block)] * full + ([float(padded_size(tail))] if tail else [])
    return BlockStats(block, sums, np.array(padded, dtype=np.float64))


# ---------------------------------------------------------------- checks


def check_coding(m: Manifest, coding: CycleCoding) -> Codec | None:
    """The codec of a member's manifest (None: a safetensors payload), if it codes exactly
    as the step's members must; Reject naming the first difference otherwise."""
    if coding.reference and not (m.coded and m.codec_spec in coding.choices):
        if m.coded:
            raise Reject(
                f"manifest codec {m.codec_spec!r} does not match the cycle's {REFERENCE_CODEC!r} "
                "(sent as a safetensors payload)"
            )
        return None
    if not m.coded:
        raise Reject(f"manifest sends a safetensors payload; the cycle's codec is {coding.spec!r}")
    try:
        codec = require_allowed_codec(m.codec_spec, coding.spec, coding.choices)
    except CodecError as exc:
        raise Reject(f"manifest codec: {exc}") from None
    if (m.cycle, m.codec_seed) != (coding.cycle, coding.seed):
        raise Reject(
            f"manifest codes for cycle {m.cycle} seed {m.codec_seed}; "
            f"the step's are cycle {coding.cycle} seed {coding.seed}"
        )
    shared = shared_rule(codec) is not None
    if m.shared_ranges_digest != (coding.ranges_digest if shared else b""):
        raise Reject(
            f"manifest coded with shared ranges {short(m.shared_ranges_digest) or '(none)'}; "
            f"the step's are {short(coding.ranges_digest) if shared else '(none)'} for "
            f"{m.codec_spec!r}"
        )
    check_vector_layout(m, codec)
    if shared_rule(codec) is not None:
        try:
            stats_from_bytes(m.block_stats, vector_elements(m), codec.block)
        except CodecError as exc:
            raise Reject(f"manifest {exc}") from None
    elif m.block_stats:
        raise Reject(f"manifest carries block statistics; {m.codec_spec!r} has no shared ranges")
    return codec


def check_vector_layout(m: Manifest, codec: Codec) -> None:
    """Tensors tile the vector; chunk count, sizes and payload size fit the codec's plan."""
    offset = 0
    for t in m.tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise Reject(f"tensor {t.name!r}: a coded vector holds floats, not {t.dtype}")
        if t.begin != offset or t.end - t.begin != math.prod(t.shape):
            raise Reject(f"tensor {t.name!r}: element range does not tile the vector")
        offset = t.end
    if offset < 1:
        raise Reject("manifest's vector is empty")
    try:
        plan = chunk_plan(m, codec)
    except CodecError as exc:
        raise Reject(f"manifest chunk plan: {exc}") from None
    if len(m.chunk_digests) != plan.chunks or len(m.chunk_sizes) != plan.chunks:
        raise Reject(
            f"manifest lists {len(m.chunk_digests)} digests and {len(m.chunk_sizes)} sizes; "
            f"{offset} elements coded {m.codec_spec!r} in chunks of at most {m.chunk_size} "
            f"bytes need {plan.chunks}"
        )
    for span, size in zip(plan.spans(), m.chunk_sizes, strict=True):
        if not 0 < size <= codec.chunk_bytes(span.elements):
            raise Reject(f"chunk {span.index} of {size} bytes cannot hold {span.elements} codes")
    if sum(m.chunk_sizes) != m.payload_size:
        raise Reject(f"chunk sizes add up to {sum(m.chunk_sizes)}, not {m.payload_size}")


def codec_of(m: Manifest) -> Codec:
    """The codec a (checked) coded manifest names."""
    return codec_from_spec(m.codec_spec)

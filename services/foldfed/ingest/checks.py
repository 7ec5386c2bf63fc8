"""Pure checks of a manifest against the rules in docs/format.md. No I/O."""

from __future__ import annotations

from foldfed.codedvector import chunk_bounds
from foldfed.domain import Manifest
from foldfed.errors import CodecError, Reject
from foldfed.format import (
    DTYPE_SIZES,
    MAX_CHUNK_SIZE,
    chunk_count,
    validate_chunk_size,
)


def check_manifest(m: Manifest, max_payload_bytes: int) -> None:
    """Raise Reject(reason) unless the manifest is self-consistent and within limits."""
    try:
        validate_chunk_size(m.chunk_size)
    except CodecError as exc:
        raise Reject(f"bad chunk_size: {exc}") from None
    if not 0 < m.payload_size <= max_payload_bytes:
        raise Reject(f"payload_size {m.payload_size} outside 1..{max_payload_bytes} bytes")
    if m.coded:
        return  # its vector and chunk plan are checked against the cycle's codec (codedvector)
    expected = chunk_count(m.payload_size, m.chunk_size)
    if len(m.chunk_digests) != expected:
        raise Reject(
            f"manifest lists {len(m.chunk_digests)} chunk digests; "
            f"{m.payload_size} bytes in chunks of {m.chunk_size} need {expected}"
        )
    _check_tensors(m)


def _check_tensors(m: Manifest) -> None:
    if not m.tensors:
        raise Reject("manifest lists no tensors")
    names: set[str] = set()
    previous_end = 0
    for t in m.tensors:
        if t.name in names:
            raise Reject(f"tensor {t.name!r} listed twice")
        names.add(t.name)
        size = DTYPE_SIZES.get(t.dtype)
        if size is None:
            raise Reject(f"tensor {t.name!r}: unknown dtype {t.dtype!r}")
        elements = 1
        for dim in t.shape:
            elements *= dim
        if t.end - t.begin != elements * size or t.end < t.begin:
            raise Reject(f"tensor {t.name!r}: byte range does not match {t.dtype}{list(t.shape)}")
        if t.begin < previous_end or t.end > m.payload_size:
            raise Reject(f"tensor {t.name!r}: byte range overlaps another or leaves the payload")
        if previous_end and t.begin != previous_end:
            raise Reject(f"tensor {t.name!r}: gap before it (tensors must be contiguous)")
        if t.begin % size:
            # An element must never straddle two chunks (chunk sizes are multiples of 8).
            raise Reject(f"tensor {t.name!r}: not aligned to its {size}-byte elements")
        previous_end = t.end
    if previous_end != m.payload_size:
        raise Reject(f"tensors end at byte {previous_end}, the payload at {m.payload_size}")


def check_chunk_body(m: Manifest, index: int, digest: bytes, body_size: int) -> None:
    """Raise Reject unless chunk `index` of `m` may have this digest and size."""
    if index >= len(m.chunk_digests):
        raise Reject(f"chunk index {index} out of range: manifest has {len(m.chunk_digests)}")
    begin, end = chunk_bounds(m, index)
    expected = end - begin
    if body_size != expected:
        raise Reject(f"chunk {index} is {body_size} bytes; the manifest says {expected}")
    if digest != m.chunk_digests[index]:
        raise Reject(f"chunk {index} digest {digest.hex()[:12]} is not the manifest's")


def check_body_size(body_size: int) -> None:
    if body_size > MAX_CHUNK_SIZE:
        raise Reject(f"oversized chunk: {body_size} bytes > {MAX_CHUNK_SIZE}")

"""Pure checks of a manifest against the rules in docs/format.md. No I/O."""

from __future__ import annotations

import math

from foldfed.codedvector import chunk_bounds
from foldfed.domain import Manifest
from foldfed.errors import CodecError, Reject
from foldfed.format import (
    DTYPE_SIZES,
    MAX_CHUNK_SIZE,
    chunk_count,
    validate_chunk_size,
)
from foldfed.secagg.masks import RING_BITS


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
    if m.masked:
        _check_chunk_count(m, expected)
        _check_masked(m)
        return
    _check_chunk_count(m, expected)
    _check_tensors(m)


def _check_chunk_count(m: Manifest, expected: int) -> None:
    if len(m.chunk_digests) != expected:
        raise Reject(
            f"manifest lists {len(m.chunk_digests)} chunk digests; "
            f"{m.payload_size} bytes in chunks of {m.chunk_size} need {expected}"
        )


def _check_masked(m: Manifest) -> None:
    """A masked payload: one ring word per element, tensors back to back from element 0."""
    if m.ring_bits not in RING_BITS:
        raise Reject(f"ring_bits {m.ring_bits} is not one of {RING_BITS}")
    if not m.tensors:
        raise Reject("manifest lists no tensors")
    names: set[str] = set()
    at = 0
    for t in m.tensors:
        if t.name in names:
            raise Reject(f"tensor {t.name!r} listed twice")
        names.add(t.name)
        if t.begin != at or t.end - t.begin != math.prod(t.shape):
            raise Reject(f"tensor {t.name!r}: element range does not follow on {list(t.shape)}")
        at = t.end
    if m.payload_size != at * (m.ring_bits // 8):
        raise Reject(
            f"masked payload of {m.payload_size} bytes: {at} elements of {m.ring_bits} bits "
            f"need {at * (m.ring_bits // 8)}"
        )


def check_masking(m: Manifest, *, secure: bool, ring_bits: int, cycle: int) -> None:
    """Raise Reject unless `m` is masked exactly when the hub runs secure aggregation, on
    the hub's ring and for the step's cycle (the masks are keyed by it: another cycle's
    would not cancel)."""
    if secure and not m.masked:
        raise Reject("the hub runs secure aggregation: deltas must be masked (masked-ring)")
    if not secure and m.masked:
        raise Reject("a masked delta, but the hub does not run secure aggregation")
    if m.masked and m.ring_bits != ring_bits:
        raise Reject(f"manifest masks on a {m.ring_bits}-bit ring; the hub's is {ring_bits}")
    if m.masked and m.cycle != cycle:
        raise Reject(f"manifest masks for cycle {m.cycle}; the step's cycle is {cycle}")


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

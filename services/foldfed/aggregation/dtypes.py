"""Floating safetensors dtypes as numpy arrays: decoding to float64, rounding back, adding.

Pure numpy. numpy has no bfloat16, so a BF16 tensor is held as its uint16 bit patterns and
converted through float32 by bit shifts, the way torch converts it.
"""

from __future__ import annotations

import numpy as np

from foldfed.aggregation.errors import AggregationError

# safetensors dtype -> the numpy dtype its bytes are read and written as (little-endian).
STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
FLOATING = frozenset(STORAGE)
_BF16_NAN = np.uint16(0x7FC0)


def require_floating(name: str, dtype: str) -> None:
    """Raise AggregationError unless tensor `name` of `dtype` can be averaged."""
    if dtype not in FLOATING:
        raise AggregationError(
            f"tensor {name!r} has dtype {dtype}: only floating tensors are averaged"
        )


def decode_narrow(body: bytes | memoryview, dtype: str, *, tensor: str = "?") -> np.ndarray:
    """The elements of `dtype` in `body` as float16/32/64, exactly; a view where possible.

    BF16 comes back as float32 (numpy has no bfloat16); the others share `body`'s memory.
    """
    require_floating(tensor, dtype)
    storage = STORAGE[dtype]
    if len(body) % storage.itemsize:
        raise AggregationError(
            f"tensor {tensor!r}: {len(body)} bytes is not a whole number of {dtype} elements"
        )
    stored = np.frombuffer(body, dtype=storage)
    return bf16_bits_to_float32(stored) if dtype == "BF16" else stored


def to_float64(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements of `dtype` as float64: exact for every floating dtype."""
    if dtype == "BF16":
        return bf16_bits_to_float32(stored).astype(np.float64)
    return stored.astype(np.float64)


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` as stored elements, exactly as torch's `.to(dtype)` does.

    Nearest, ties to even. F16 and BF16 go through float32 (two roundings), like torch's
    double -> half casts, so anyone can recompute an update from the mean with torch.
    Out-of-range values become infinities; callers check.
    """
    with np.errstate(over="ignore"):
        if dtype == "BF16":
            return float32_to_bf16_bits(values.astype(np.float32))
        if dtype == "F16":
            return values.astype(np.float32).astype(np.float16)
        return values.astype(STORAGE[dtype])


def add_in_dtype(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """a + b elementwise in `dtype`, bit-identical to torch's CPU `a + b` in that dtype.

    F32/F64: one IEEE addition. F16/BF16: exact float32 sum of the two operands, rounded
    once to the dtype; torch computes half-precision adds the same way, and as float32 holds
    at least twice the significand bits, the result is also the correctly rounded sum.
    """
    # Overflow (inf) and inf - inf (NaN) are left to the caller, who rejects non-finite.
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "BF16":
            return float32_to_bf16_bits(bf16_bits_to_float32(a) + bf16_bits_to_float32(b))
        if dtype == "F16":
            return (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
        total: np.ndarray = np.add(a, b)
        return total


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even; NaN -> 0x7FC0 like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even on the cut at bit 16.
    bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = ((bits + bias) >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(values)] = _BF16_NAN
    return out


def count_nonfinite(stored: np.ndarray, dtype: str) -> int:
    """How many stored elements of `dtype` are NaN or infinite."""
    if dtype == "BF16":
        # All exponent bits set: infinity or NaN.
        return int(np.count_nonzero((stored & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    return int(stored.size - np.count_nonzero(np.isfinite(stored)))

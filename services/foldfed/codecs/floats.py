"""Floating-point codecs: `fp32` (the reference, identity) and `bf16` (rounded to bfloat16).

fp32:v1 — a chunk of n elements is their n little-endian IEEE-754 binary32 values (4n
bytes). decode(encode(x)) = x exactly.

bf16:v1 — a chunk is n little-endian uint16: the upper 16 bits of each binary32 after
rounding to nearest, ties to even (bits + 0x7FFF + bit16, then >> 16; the rule torch and
every accelerator use). decode widens by appending 16 zero bits, which is exact. Bound, for
every finite x whose rounding stays finite:

    |x - decode(encode(x))| ≤ max(2**-8 · |x|, 2**-134)

(bfloat16 keeps 8 significant bits, so half a unit in the last place is at most 2**-8 of
the value; 2**-134 is half the spacing of binary32's subnormals, which bfloat16 shares).
A value that rounds to infinity (|x| ≥ 2**128 · (1 - 2**-9)) is rejected, as is any NaN
or infinity, and a decoder rejects bit patterns of NaN or infinity.

Determinism: integer arithmetic on the bit patterns only.

Neither is linear_shared: a float's bits do not add. Masking fp32/bf16 deltas means masking
their fixed-point values (aggregation/fixedpoint.py) on a 64-bit ring, which undoes any
compression.
"""

from __future__ import annotations

import numpy as np

from foldfed.codecs.base import expect_size, flat_float32
from foldfed.codecs.context import CodecContext
from foldfed.errors import CodecError

PLAN_BLOCK = 4096  # elements; fp32 and bf16 have no blocks of their own, only chunk planning


class Fp32Codec:
    spec = "fp32:v1"
    block = PLAN_BLOCK
    linear_shared = False

    def chunk_bytes(self, elements: int) -> int:
        return 4 * elements

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes:
        return flat_float32(values).astype("<f4", copy=False).tobytes()

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        expect_size(data, 4 * elements, self.spec, elements)
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise CodecError(f"{self.spec}: chunk holds non-finite values")
        return out


class Bf16Codec:
    spec = "bf16:v1"
    block = PLAN_BLOCK
    linear_shared = False

    def chunk_bytes(self, elements: int) -> int:
        return 2 * elements

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes:
        return to_bf16_bits(flat_float32(values)).astype("<u2", copy=False).tobytes()

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        expect_size(data, 2 * elements, self.spec, elements)
        bits = np.frombuffer(data, dtype="<u2")
        if np.any((bits & 0x7F80) == 0x7F80):
            raise CodecError(f"{self.spec}: chunk holds NaN or infinite values")
        return from_bf16_bits(bits)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of finite float32 values, nearest-even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = ((bits + bias) >> np.uint32(16)).astype(np.uint16)
    if np.any((out & 0x7F80) == 0x7F80):
        raise CodecError("bf16: a value rounds to infinity (|x| too large for bfloat16)")
    return out


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint32) << np.uint32(16)).view(np.float32)

"""`int8:v1;block=B` — symmetric 8-bit codes with one float32 scale per block of B elements.

For block j (B elements, the vector's last block possibly fewer) with values x:

    M_j = max_i |x_i|                  (a float32, exact: max involves no rounding)
    s_j = M_j / 127                    (float64; one correctly rounded division)
    c_i = rint(x_i / s_j)  ∈ [-127, 127],  0 when M_j = 0      (ties to even)
    decode: x̂_i = float32(c_i · s_j)

Bound: |x_i - x̂_i| ≤ M_j / 254 + 2**-24 · |x̂_i| (half a grid step, then one float32
rounding). Byte layout of a chunk of n elements in b = ⌈n / B⌉ blocks:

    [M_0 .. M_{b-1}: b little-endian float32] [c_0 .. c_{n-1}: n int8]

A decoder rejects a non-finite or negative M_j, a code of -128 and a code other than 0 in a
block whose M_j is 0. Determinism: max, one division, one rounding per value, all IEEE.

The scale is the member's own (it depends on its data), so int8 is not linear_shared:
codes of two members are on different grids and their integer sum means nothing.
"""

from __future__ import annotations

import numpy as np

from foldfed.codecs.base import blocks_in, expect_size, flat_float32
from foldfed.codecs.context import CodecContext
from foldfed.errors import CodecError


class Int8Codec:
    linear_shared = False

    def __init__(self, block: int = 4096) -> None:
        if not 8 <= block <= 1 << 20 or block % 8:
            raise CodecError(f"int8: block must be a multiple of 8 in [8, 2**20], got {block}")
        self.block = block

    @property
    def spec(self) -> str:
        return f"int8:v1;block={self.block}"

    def chunk_bytes(self, elements: int) -> int:
        return 4 * blocks_in(elements, self.block) + elements

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes:
        flat = flat_float32(values)
        peaks = self._peaks(flat)
        steps = np.repeat(peaks.astype(np.float64) / 127.0, self.block)[: flat.size]
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(steps > 0, flat / steps, 0.0)
        codes = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
        return peaks.astype("<f4").tobytes() + codes.tobytes()

    def _peaks(self, flat: np.ndarray) -> np.ndarray:
        count = blocks_in(flat.size, self.block)
        padded = np.zeros(count * self.block, dtype=np.float32)
        padded[: flat.size] = np.abs(flat)
        return padded.reshape(count, self.block).max(axis=1) if count else padded

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        expect_size(data, self.chunk_bytes(elements), self.spec, elements)
        count = blocks_in(elements, self.block)
        peaks = np.frombuffer(data, dtype="<f4", count=count).astype(np.float64)
        codes = np.frombuffer(data, dtype=np.int8, offset=4 * count)
        if not (np.all(np.isfinite(peaks)) and np.all(peaks >= 0)):
            raise CodecError(f"{self.spec}: a block scale is negative or not finite")
        if np.any(codes == -128):
            raise CodecError(f"{self.spec}: code -128 is not used")
        steps = np.repeat(peaks / 127.0, self.block)[:elements]
        if np.any((steps == 0) & (codes != 0)):
            raise CodecError(f"{self.spec}: non-zero code in a block whose scale is 0")
        return (codes * steps).astype(np.float32)

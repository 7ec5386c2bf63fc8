"""`+zstd:v1;level=N` — an optional outer layer: zstd over one chunk's coded bytes.

Byte layout of a chunk: one flag byte, then

    0x00  the inner codec's bytes, unchanged (zstd would not have made them smaller)
    0x01  one zstd frame (RFC 8878) whose declared content size is the inner bytes' size

so a chunk never grows by more than one byte. A decoder MUST read the frame's declared
content size and reject it unless it equals what the inner codec expects for the chunk's
element count, before decompressing (no decompression bombs), and MUST reject any other
flag. Decoding is deterministic (zstd decompression is exact). Encoding is deterministic
for one zstd library version and level; a member restarted under another zstd version may
compress to other bytes (a new chunk id for the same content): pin zstandard for a cycle.

Where it pays: codes whose symbols are far from uniform (b-bit codes of Gaussian-like
rotated coordinates: the middle levels dominate), sparse or mostly-zero chunks, and int8.
Not on fp32 deltas (their mantissas are noise) and never on masked codes, which are
uniform on their ring by design. bench/codecs.py measures it.
"""

from __future__ import annotations

import numpy as np
import zstandard

from foldfed.codecs.base import Codec
from foldfed.codecs.context import CodecContext
from foldfed.errors import CodecError

RAW, FRAME = 0, 1


class ZstdLayer:
    def __init__(self, inner: Codec, level: int = 3) -> None:
        if not 1 <= level <= 19:
            raise CodecError(f"zstd: level must be 1..19, got {level}")
        self.inner, self.level = inner, level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)

    @property
    def spec(self) -> str:
        return f"{self.inner.spec}+zstd:v1;level={self.level}"

    @property
    def block(self) -> int:
        return self.inner.block

    @property
    def linear_shared(self) -> bool:
        return self.inner.linear_shared

    def chunk_bytes(self, elements: int) -> int:
        return 1 + self.inner.chunk_bytes(elements)

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes:
        raw = self.inner.encode(values, ctx, first_block)
        packed = self._compressor.compress(raw)
        return bytes([FRAME]) + packed if len(packed) < len(raw) else bytes([RAW]) + raw

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        body = bytes(data[1:])
        if len(data) < 1 or data[0] not in (RAW, FRAME):
            raise CodecError(f"{self.spec}: chunk must start with 0x00 or 0x01")
        if data[0] == FRAME:
            want = self.inner.chunk_bytes(elements)
            try:
                declared = zstandard.frame_content_size(body)
            except zstandard.ZstdError as exc:
                raise CodecError(f"{self.spec}: not a zstd frame: {exc}") from None
            if declared != want:
                raise CodecError(f"{self.spec}: frame declares {declared} bytes, expected {want}")
            try:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=want)
            except zstandard.ZstdError as exc:
                raise CodecError(f"{self.spec}: corrupt zstd frame: {exc}") from None
        return self.inner.decode(body, elements, ctx, first_block)

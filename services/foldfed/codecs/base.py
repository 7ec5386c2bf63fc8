"""The codec contract: a flat float32 vector, cut into blocks, coded chunk by chunk.

A codec turns the elements of one wire chunk — whole blocks of `block` elements, starting
at global block index `first_block`; only the vector's last block may be shorter — into
bytes, and back. A chunk's bytes depend only on its own elements and the context
(context.py), never on another chunk, so each chunk encodes, decodes, is verified and
finalized alone (docs/format.md section 4).

`encode` is a pure function of (elements, context, first_block): the same inputs give the
same bytes on every machine. `decode` is a pure function of (bytes, element count, context,
first_block), returns float32, and rejects bytes that are not exactly what `encode` could
have written for that many elements (wrong length, stray padding bits, non-finite scales)
with CodecError.

A *linear shared* codec (`LinearCodec`) also exposes its integer codes: with parameters
shared by a step's members, Σ_i decode(c_i) = decode_sum(Σ_i c_i, count) exactly in real
arithmetic, so a hub that only sees a (masked) sum of codes decodes the sum once. The sum of
`count` code vectors fits a ring of `ring_bits(count)` bits.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from foldfed.codecs.context import CodecContext
from foldfed.errors import CodecError


@runtime_checkable
class Codec(Protocol):
    @property
    def spec(self) -> str:
        """The canonical, versioned parameter string (spec.py)."""
        ...

    @property
    def block(self) -> int:
        """Elements per block; chunks hold whole blocks."""
        ...

    @property
    def linear_shared(self) -> bool:
        """True when masked integer sums of codes decode exactly (see LinearCodec)."""
        ...

    def chunk_bytes(self, elements: int) -> int:
        """The most bytes a chunk of `elements` may take (exact for fixed-size codecs)."""
        ...

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes: ...

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray: ...


@runtime_checkable
class LinearCodec(Codec, Protocol):
    @property
    def levels(self) -> int:
        """Codes are integers 0 .. levels - 1."""
        ...

    def codes(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> np.ndarray:
        """The chunk's codes (uint8, one per coded coordinate), before packing."""
        ...

    def pack(self, codes: np.ndarray) -> bytes: ...

    def unpack(self, data: bytes | memoryview, elements: int) -> np.ndarray: ...

    def decode_sum(
        self, code_sum: np.ndarray, count: int, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        """Σ of `count` members' decoded chunks (float64) from the sum of their codes."""
        ...


def ring_bits(levels: int, count: int) -> int:
    """The fewest bits r with 2**r > count·(levels - 1): a ring that holds the sum of
    `count` code vectors without wrapping (DESIGN: masks live on the smallest ring)."""
    if levels < 2 or count < 1:
        raise ValueError(f"need levels >= 2 and count >= 1, got {levels}, {count}")
    return (count * (levels - 1)).bit_length()


def flat_float32(values: np.ndarray, what: str = "delta") -> np.ndarray:
    """`values` as a flat float32 array; CodecError if any is NaN or infinite."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype != np.float32:
        raise CodecError(f"{what}: codecs take float32, got {flat.dtype}")
    if not np.all(np.isfinite(flat)):
        bad = flat.size - int(np.count_nonzero(np.isfinite(flat)))
        raise CodecError(f"{what}: {bad} non-finite values (NaN or inf)")
    return flat


def expect_size(data: bytes | memoryview, want: int, codec: str, elements: int) -> None:
    if len(data) != want:
        raise CodecError(f"{codec}: {elements} elements take {want} bytes, got {len(data)}")


def blocks_in(elements: int, block: int) -> int:
    return -(-elements // block)

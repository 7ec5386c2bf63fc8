"""Bit packing of b-bit codes (b = 1..8) into bytes, least significant bit first.

Code j of a sequence occupies bits [j·b, (j+1)·b) of the packed bit string, bit i of the
string being bit (i mod 8) of byte i // 8, and each code's own bits in order from its least
significant. Trailing bits of the last byte are zero; a reader MUST reject a packed string
whose length is not ⌈count·b / 8⌉ or whose trailing bits are not zero (so each code
sequence has exactly one packed form, and a chunk id names one content).

b = 1, 2, 4, 8 pack whole codes into each byte (8/b per byte, the first in the low bits);
other widths go through explicit bit planes. Both give the bytes defined above.
"""

from __future__ import annotations

import numpy as np

from foldfed.errors import CodecError


def packed_size(count: int, bits: int) -> int:
    """⌈count·bits / 8⌉: the bytes of `count` packed codes."""
    return -(-count * bits // 8)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Codes (unsigned ints < 2**bits) packed as the module docstring says."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: flat.size] = flat
        grid = padded.reshape(-1, per_byte)
        out = np.zeros(grid.shape[0], dtype=np.uint8)
        for j in range(per_byte):
            out |= grid[:, j] << np.uint8(j * bits)
        return out.tobytes()
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """The `count` codes in `data` (uint8); CodecError on a wrong length or stray bits."""
    _check_bits(bits)
    want = packed_size(count, bits)
    if len(data) != want:
        raise CodecError(f"{count} codes of {bits} bits take {want} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    used = count * bits
    if used % 8 and int(raw[-1]) >> (used % 8):
        raise CodecError("packed codes have non-zero padding bits")
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        grid = np.empty((raw.size, per_byte), dtype=np.uint8)
        for j in range(per_byte):
            grid[:, j] = (raw >> np.uint8(j * bits)) & mask
        return grid.reshape(-1)[:count].copy()
    planes = np.unpackbits(raw, bitorder="little")[:used].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (planes * weights).sum(axis=1, dtype=np.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CodecError(f"code width must be 1..8 bits, got {bits}")

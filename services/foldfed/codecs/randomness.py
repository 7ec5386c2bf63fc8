"""Deterministic randomness for codecs: sign flips and uniforms from a blake3 stream.

A codec's random choices (the Hadamard rotation's sign flips, stochastic rounding) must be
the same on every machine, in every numpy version and after any restart, so that a member
that re-encodes a step sends the same bytes and every member of a step rotates with the same
signs. They therefore come from blake3's extendable output (XOF), never from numpy's or
Python's generators, whose streams are not promised stable across versions.

A *stream* is blake3 over a UTF-8 key naming its purpose and everything it depends on:

    key = "foldfed-codec/v1/<purpose>/<part>/<part>/..."

and the bytes for global element position p start at offset p * (bytes per element) of the
stream (blake3's XOF `seek`). Position, not chunk, indexes the stream, so a chunk's bytes
depend only on which elements it holds: chunk i encodes alone, whatever the chunk size.

- sign of element p: bit (p mod 8) of stream byte p // 8, least significant bit first;
  bit 0 → +1, bit 1 → -1.
- uniform of element p: stream bytes [4p, 4p + 4) as a little-endian uint32 u; the value is
  u / 2**32, in [0, 1) with resolution 2**-32 (exact in float64).
"""

from __future__ import annotations

import blake3
import numpy as np

STREAM_VERSION = "foldfed-codec/v1"


def stream_key(purpose: str, *parts: int | str) -> bytes:
    """The key of one stream; parts are joined with "/" (ints in decimal)."""
    return "/".join((STREAM_VERSION, purpose, *(str(p) for p in parts))).encode("utf-8")


def stream_bytes(key: bytes, offset: int, length: int) -> bytes:
    """`length` bytes of the stream named `key`, starting at byte `offset`."""
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    return blake3.blake3(key, max_threads=1).digest(length=length, seek=offset)


def signs(key: bytes, first: int, count: int) -> np.ndarray:
    """±1.0 (float64) for elements first .. first + count - 1; `first` a multiple of 8."""
    if first % 8:
        raise ValueError(f"sign streams start on a byte: first={first} is not a multiple of 8")
    raw = np.frombuffer(stream_bytes(key, first // 8, -(-count // 8)), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:count]
    return 1.0 - 2.0 * bits.astype(np.float64)


def uniforms(key: bytes, first: int, count: int) -> np.ndarray:
    """u / 2**32 in [0, 1) (float64) for elements first .. first + count - 1."""
    raw = stream_bytes(key, 4 * first, 4 * count)
    return np.frombuffer(raw, dtype="<u4").astype(np.float64) * (1.0 / 4294967296.0)

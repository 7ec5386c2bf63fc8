"""Content ids: blake3-256 over bytes. A chunk's id is its digest and its file name."""

from __future__ import annotations

from pathlib import Path

import blake3

DIGEST_SIZE = 32


def digest_of(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte blake3 digest of `data`."""
    return blake3.blake3(data).digest()


def hex_of(digest: bytes) -> str:
    return digest.hex()


def short(digest: bytes) -> str:
    """The first 12 hex digits: enough to tell digests apart in logs."""
    return digest.hex()[:12]


def file_digest(path: Path) -> bytes:
    """blake3 of a whole file, memory-mapped: O(1) memory for GB-sized models.

    A model's digest is this over its canonical safetensors file (deltafile.write_delta)."""
    return blake3.blake3(max_threads=1).update_mmap(path).digest()

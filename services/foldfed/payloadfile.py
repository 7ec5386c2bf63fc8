"""A payload file on disk, read without torch: its layout, its chunks and their digests.

The uploader cuts the trainer's delta into chunks here, and the hub reads θ_t's layout
and re-cuts the global update here: neither loads torch (~200 MiB of RSS and two seconds
of start-up per process). The format itself (header, chunk arithmetic) is foldfed.format;
writing tensors is foldfed.deltafile.

Everything here blocks (disk, hashing): async callers run it in a worker thread.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import blake3

from foldfed.errors import CodecError
from foldfed.format import (
    DEFAULT_CHUNK_SIZE,
    LEN_PREFIX,
    ChunkPlan,
    TensorSpan,
    chunk_range,
    header_length,
    parse_layout,
    validate_chunk_size,
)


def read_layout(path: Path) -> tuple[TensorSpan, ...]:
    """The layout of the payload at `path`, reading only its header from disk."""
    return _layout_and_size(path)[0]


def _layout_and_size(path: Path) -> tuple[tuple[TensorSpan, ...], int]:
    with open(path, "rb") as f:
        prefix = f.read(LEN_PREFIX)
        source = prefix + f.read(header_length(prefix))
        size = os.fstat(f.fileno()).st_size
    spans = parse_layout(source)
    # Bytes past the last tensor would travel and be hashed but decode to nothing.
    data_end = spans[-1].end if spans else len(source)
    if data_end != size:
        raise CodecError(f"{path.name}: tensors end at byte {data_end}, file has {size}")
    return spans, size


def plan_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkPlan:
    """Cut the payload at `path` into chunks: one sequential read, one chunk in memory."""
    validate_chunk_size(chunk_size)
    tensors, expected = _layout_and_size(path)
    whole = blake3.blake3()
    digests: list[bytes] = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := _read_full(f, view):
            piece = view[:n]
            digests.append(blake3.blake3(piece).digest())
            whole.update(piece)
            size += n
    if size != expected:
        raise CodecError(f"{path.name} changed while being read: {size} != {expected} bytes")
    return ChunkPlan(size, chunk_size, tuple(digests), whole.digest(), tensors)


def _read_full(f: io.FileIO, view: memoryview) -> int:
    # A raw read may return fewer bytes than asked before EOF; a chunk must be whole.
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def read_chunk(path: Path, chunk_size: int, index: int) -> bytes:
    """The bytes of chunk `index` of the payload at `path`."""
    validate_chunk_size(chunk_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        begin, end = chunk_range(os.fstat(fd).st_size, chunk_size, index)
        body = os.pread(fd, end - begin, begin)
    finally:
        os.close(fd)
    if len(body) != end - begin:
        raise CodecError(f"{path.name}: short read of chunk {index}")
    return body


def read_range(path: Path, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of the file at `path` (a coded payload's chunk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        body = os.pread(fd, end - begin, begin)
    finally:
        os.close(fd)
    if len(body) != end - begin:
        raise CodecError(f"{path.name}: short read of bytes {begin}..{end}")
    return body

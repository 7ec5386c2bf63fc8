"""Chunk plans: which blocks of a flat vector each wire chunk holds.

A vector of n elements in blocks of B is cut into chunks of `blocks_per_chunk` = k whole
blocks: chunk i holds blocks [i·k, (i+1)·k) — elements [i·k·B, min((i+1)·k·B, n)) — so
only the last chunk may be shorter and no block straddles two chunks. k is the largest
count whose coded size (codec.chunk_bytes(k·B)) fits the wire's chunk limit, so every
member of a step with the same codec and limit cuts the same chunks: chunk i of the global
update depends only on chunk i of each member (DESIGN, "Finalize per chunk index").
Block indices are global, so a chunk's coding does not depend on the plan (randomness.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from foldfed.codecs.base import Codec
from foldfed.errors import CodecError

MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class ChunkSpan:
    index: int
    first_block: int
    begin: int  # element offsets in the flat vector, end exclusive
    end: int

    @property
    def elements(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ChunkPlan:
    elements: int
    block: int
    blocks_per_chunk: int

    def __post_init__(self) -> None:
        if self.elements < 1 or self.block < 1 or self.blocks_per_chunk < 1:
            raise CodecError(f"invalid chunk plan {self}")

    @property
    def chunk_elements(self) -> int:
        return self.block * self.blocks_per_chunk

    @property
    def chunks(self) -> int:
        return -(-self.elements // self.chunk_elements)

    def span(self, index: int) -> ChunkSpan:
        if not 0 <= index < self.chunks:
            raise CodecError(f"chunk {index} outside 0..{self.chunks - 1}")
        begin = index * self.chunk_elements
        end = min(begin + self.chunk_elements, self.elements)
        return ChunkSpan(index, index * self.blocks_per_chunk, begin, end)

    def spans(self) -> list[ChunkSpan]:
        return [self.span(i) for i in range(self.chunks)]


def plan_chunks(codec: Codec, elements: int, max_chunk_bytes: int = 4 << 20) -> ChunkPlan:
    """The plan that puts as many whole blocks in each chunk as `max_chunk_bytes` allows."""
    if elements < 1:
        raise CodecError(f"cannot plan an empty vector ({elements} elements)")
    per_block = codec.chunk_bytes(codec.block)
    fixed = codec.chunk_bytes(0)  # a per-chunk overhead, if any (the zstd flag byte)
    blocks = (max_chunk_bytes - fixed) // max(1, per_block - fixed)
    if blocks < 1:
        raise CodecError(f"{codec.spec}: one block ({per_block} bytes) exceeds {max_chunk_bytes}")
    needed = -(-elements // codec.block)
    return ChunkPlan(elements, codec.block, min(blocks, needed))

"""Grid ranges: the shared per-block ranges of a step, and a coder's own.

A linear codec decodes a sum of codes exactly only if every member quantized on the same
grid, so the range R_j of block j is *shared*: it comes with the step's release, the same
bytes for every member. The hub derives it from statistics the members report about their
own deltas (the sums of squares below, one float per block: 1/1024 of an fp32 update with
blocks of 4096), so it follows the deltas' real size:

    S_ij  = Σ_{k in block j} Δ_i[k]²          (member i's delta; real elements only)
    r_j   = √(Σ_i S_ij / (N · P_j))           (RMS of block j's rotated coordinates, pooled)
    r     = √(Σ_ij S_ij / (N · Σ_j P_j))      (the same over the whole vector)
    R_j   = mult · max(r_j, floor · r)        when r > 0;   R_j = init when r = 0

P_j is block j's padded size (hadamard.padded_size); after rotation each coordinate of a
block has variance ‖Δ_block‖²/P_j, so r_j is the natural unit. `mult` sets how many units
the grid spans before it saturates (what saturates stays in the error-feedback residual);
`floor` keeps a block whose deltas were (nearly) zero able to send; `init` serves when no
statistics exist yet. The statistics are of the members' *deltas*, never of decoded
updates or of delta + residual: a range derived from coded values feeds back on itself
(a 1-bit code's decoded RMS is its range, so "range = mult x RMS of the last decoded
update" grows by mult every step; measured, it diverges).

Which step's statistics: the uploader may report S_i of Δ_{t-1} with step t-1's upload,
so release t carries ranges for step t with no extra round trip (ranges lag one step;
step 1 uses `init`), or report S_i of Δ_t first and wait for the ranges (no lag, one more
round trip per step). The codec does not care: it reads the ranges from the context.

A coder's own ranges (`scale=block`, per member, not maskable) use the same rule on its
own block: R_j = mult · √(Σ_k y_k² / P_j), sent with the codes.

Determinism: Δ[k]² of a float32 is exact in float64 (24 + 24 < 53 bits). Sums are taken by
a fixed pairwise tree of element-wise additions (`tree_sum`, never numpy's reductions, whose
order may change with the machine) and √, x, ÷ and max are single IEEE operations, so a
coder that computes its ranges again computes the same bits. Shared ranges need not even
be recomputed by members: they receive the hub's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from foldfed.codecs.hadamard import padded_size
from foldfed.errors import CodecError


@dataclass(frozen=True)
class SharedRanges:
    """R_j (float64, > 0) for every block j of the vector, blocks of `block` elements."""

    block: int
    values: np.ndarray

    def __post_init__(self) -> None:
        if not (np.all(np.isfinite(self.values)) and np.all(self.values > 0)):
            raise CodecError("shared ranges must be finite and positive")

    def of_blocks(self, first_block: int, count: int) -> np.ndarray:
        if first_block < 0 or first_block + count > self.values.size:
            raise CodecError(
                f"blocks {first_block}..{first_block + count - 1} outside the shared ranges "
                f"of {self.values.size} blocks"
            )
        return self.values[first_block : first_block + count]


@dataclass(frozen=True)
class BlockStats:
    """S_j (float64) and P_j for each block: one member's report, or the sum of several."""

    block: int
    square_sums: np.ndarray
    padded: np.ndarray
    members: int = 1

    def __add__(self, other: BlockStats) -> BlockStats:
        if self.block != other.block or self.square_sums.shape != other.square_sums.shape:
            raise CodecError("block statistics of different layouts cannot be added")
        return BlockStats(
            self.block, self.square_sums + other.square_sums, self.padded,
            self.members + other.members,
        )  # fmt: skip


def block_count(elements: int, block: int) -> int:
    return -(-elements // block)


def tree_sum(rows: np.ndarray) -> np.ndarray:
    """Σ along axis 1 of a float64 (rows, width) array, by a fixed pairwise tree."""
    width = rows.shape[1]
    size = 1 << max(0, (width - 1).bit_length())
    work = np.zeros((rows.shape[0], size), dtype=np.float64)
    work[:, :width] = rows
    while size > 1:
        size //= 2
        work = work[:, :size] + work[:, size : 2 * size]
    return work[:, 0]


def block_stats(values: np.ndarray, block: int) -> BlockStats:
    """S_j and P_j for each block of `values` (a member's delta, float32, flat)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    full = flat.size // block
    sums = [np.zeros(0)]
    sizes = [np.zeros(0)]
    if full:
        squares = np.square(flat[: full * block].reshape(full, block), dtype=np.float64)
        sums.append(tree_sum(squares))
        sizes.append(np.full(full, float(block)))
    tail = flat[full * block :]
    if tail.size:
        sums.append(tree_sum(np.square(tail, dtype=np.float64).reshape(1, -1)))
        sizes.append(np.array([float(padded_size(tail.size))]))
    return BlockStats(block, np.concatenate(sums), np.concatenate(sizes))


def pooled(reports: Sequence[BlockStats]) -> BlockStats:
    """The members' reports summed, per block, with math.fsum: correctly rounded, so the
    result does not depend on the order the reports arrived in."""
    if not reports:
        raise CodecError("no block statistics to pool")
    first = reports[0]
    if any(r.block != first.block or r.square_sums.shape != first.square_sums.shape
           for r in reports):  # fmt: skip
        raise CodecError("block statistics of different layouts cannot be pooled")
    columns = np.stack([r.square_sums for r in reports], axis=1)
    sums = np.array([math.fsum(row) for row in columns.tolist()], dtype=np.float64)
    return BlockStats(first.block, sums, first.padded, sum(r.members for r in reports))


def shared_ranges(
    stats: BlockStats | None, elements: int, block: int, *, mult: float, floor: float, init: float
) -> SharedRanges:
    """R_j for a vector of `elements` by the module's rule; `stats` None gives `init`."""
    count = block_count(elements, block)
    if stats is None:
        return SharedRanges(block, np.full(count, float(init)))
    if stats.block != block or stats.square_sums.size != count:
        raise CodecError(f"statistics for {stats.square_sums.size} blocks of {stats.block}, "
                         f"expected {count} of {block}")  # fmt: skip
    if not np.all(np.isfinite(stats.square_sums)) or np.any(stats.square_sums < 0):
        raise CodecError("block statistics must be finite and non-negative")
    n = float(stats.members)
    total = float(tree_sum(stats.square_sums.reshape(1, -1))[0])
    if total == 0.0:
        return SharedRanges(block, np.full(count, float(init)))
    overall = math.sqrt(total / (n * float(tree_sum(stats.padded.reshape(1, -1))[0])))
    per_block = np.sqrt(stats.square_sums / (n * stats.padded))
    return SharedRanges(block, mult * np.maximum(per_block, floor * overall))


def own_ranges(rotated: np.ndarray, mult: float) -> np.ndarray:
    """mult · RMS of each row of `rotated` (float64 (rows, P)): a coder's own R_j."""
    if rotated.size == 0:
        return np.zeros(rotated.shape[0])
    return mult * np.sqrt(tree_sum(np.square(rotated)) / float(rotated.shape[1]))

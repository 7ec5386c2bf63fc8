"""Shared per-block ranges: the scale every member of a step derives alone.

A linear codec decodes a sum of codes exactly only if every member quantized with the same
grid, so the grid's range R_j for block j cannot come from the member's own data. It comes
from the *previous applied global update* U_{t-1} (the decoded update every member and the
hub added to θ_{t-1}; all hold it bit-identically, since θ digests agree), by this rule:

    S_j   = Σ_{i in block j} U[i]²            (sum over the block's real elements)
    r_j   = √(S_j / P_j)                      (RMS of block j's rotated coordinates)
    r     = √(Σ_j S_j / Σ_j P_j)              (RMS over the whole vector, rotated)
    R_j   = mult · max(r_j, floor · r)        when r > 0
    R_j   = init                              when r = 0 (step 1, or an all-zero update)

P_j is block j's padded size (hadamard.padded_size). After rotation every coordinate of a
block has variance ‖x_block‖²/P_j, so r_j is the natural unit for block j of the next
delta; `mult` (the cycle's choice, ~2-4) sets how many of those units the grid spans
before it saturates; `floor` keeps a block whose last update was (nearly) zero able to
send at all; `init` is the cycle's guess for step 1. A guess that is too small saturates
the grid: the clipped part stays in each member's error-feedback residual, and the next
update (hence range) grows by up to `mult`x, so ranges catch up within a few steps.

Determinism: U[i]² of a float32 is exact in float64 (24 + 24 < 53 bits). Sums are taken
by a fixed pairwise tree of element-wise additions (rows padded with zeros to a power of
two; never numpy's reductions, whose order may change with the machine), and √, x, ÷ and
max are single correctly rounded IEEE operations, so every member computes the same R_j.
"""

from __future__ import annotations

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


def block_square_sums(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(S_j, P_j) for each block of `values` (float32, flat)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    full = flat.size // block
    sums = []
    sizes = []
    if full:
        squares = np.square(flat[: full * block].reshape(full, block), dtype=np.float64)
        sums.append(tree_sum(squares))
        sizes.append(np.full(full, block, dtype=np.float64))
    tail = flat[full * block :]
    if tail.size:
        squares = np.square(tail, dtype=np.float64).reshape(1, -1)
        sums.append(tree_sum(squares))
        sizes.append(np.array([padded_size(tail.size)], dtype=np.float64))
    if not sums:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sums), np.concatenate(sizes)


def shared_ranges(
    previous: np.ndarray | None,
    elements: int,
    block: int,
    *,
    mult: float,
    floor: float,
    init: float,
) -> SharedRanges:
    """R_j for a vector of `elements` by the module's rule; `previous` is U_{t-1} or None."""
    count = block_count(elements, block)
    if previous is None:
        return SharedRanges(block, np.full(count, float(init)))
    flat = np.asarray(previous, dtype=np.float32).reshape(-1)
    if flat.size != elements:
        raise CodecError(f"previous update has {flat.size} elements, expected {elements}")
    if not np.all(np.isfinite(flat)):
        raise CodecError("previous update has non-finite values")
    sums, sizes = block_square_sums(flat, block)
    total = float(tree_sum(sums.reshape(1, -1))[0]) if count else 0.0
    if total == 0.0:
        return SharedRanges(block, np.full(count, float(init)))
    overall = float(np.sqrt(total / float(tree_sum(sizes.reshape(1, -1))[0])))
    per_block = np.sqrt(sums / sizes)
    ranges = mult * np.maximum(per_block, floor * overall)
    return SharedRanges(block, ranges)

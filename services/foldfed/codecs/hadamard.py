"""The randomized Hadamard rotation: y = H·D·x / √P on blocks of P = 2**k elements.

D is a diagonal of ±1 sign flips (randomness.signs), H the PxP Sylvester-Hadamard matrix
(H_1 = [1], H_2P = [[H_P, H_P], [H_P, -H_P]]). H·H = P·I and D·D = I, so R = H·D/√P is
orthonormal: ‖R·x‖ = ‖x‖, and its inverse is R⁻¹ = D·H/√P. For any fixed x, the random signs
spread x's energy evenly: every rotated coordinate has mean 0 and variance ‖x‖²/P, and for
large P it is close to a Gaussian. That is what lets a scalar quantizer with one scale per
block do well on deltas whose coordinates differ by orders of magnitude (EDEN, DRIVE).

The short last block. A vector's last block may hold m < B elements. It is cut into
sub-blocks by the binary digits of m, largest first: one of 2**k elements for each bit k ≥ 3
set in m, then, if m mod 8 = r > 0, one of 8 elements holding the last r elements padded
with 8 - r zeros (`tail_sizes`). Each sub-block is rotated on its own. The padded zeros'
rotated coordinates are not zero, so they are coded too and the decoder drops them after
rotating back: at most 7 extra coordinates per vector (P_tail = 8·⌈m/8⌉ in all).

Determinism: the transform is log2(P) passes of element-wise float64 additions and
subtractions in a fixed pattern, then one multiplication by the float64 constant 1/√P. Each
of these is a single IEEE-754 operation, correctly rounded, never a reduction whose order a
library may change, so the result is the same bits on every machine and numpy version.
"""

from __future__ import annotations

import math

import numpy as np

MIN_BLOCK = 8
BATCH_BYTES = 1 << 18  # a batch of rows of fwht: fits a core's L2 cache
LOW_SPAN = 32  # fwht's passes with half < LOW_SPAN run on the transpose


def tail_sizes(m: int) -> list[int]:
    """The sub-block sizes of a short last block of m elements (see the module docstring)."""
    if m < 1:
        raise ValueError(f"a block holds at least one element, got {m}")
    sizes = [1 << k for k in range(m.bit_length() - 1, 2, -1) if m >> k & 1]
    return sizes + ([MIN_BLOCK] if m % MIN_BLOCK else [])


def padded_size(m: int) -> int:
    """The coded coordinates of a block of m elements: 8·⌈m/8⌉ (m itself if a power of 2 ≥ 8)."""
    return sum(tail_sizes(m))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def fwht(blocks: np.ndarray) -> np.ndarray:
    """H·x for each row of `blocks` (float64, shape (rows, P), C-contiguous), in place.

    The passes are the fixed butterflies of the module docstring, half = 1, 2, 4, …, P/2:
    (a, b) → (a + b, a - b) for every pair of elements `half` apart. Two things make it
    fast without changing a single operation, so the bits are those of the plain loop:
    rows go through in batches of about BATCH_BYTES (all passes of a batch run while it is
    in cache), and the passes with half < LOW_SPAN run on the transpose of each row seen as
    a (P/LOW_SPAN, LOW_SPAN) matrix, where the pairs become whole contiguous rows instead
    of runs of 1-8 elements (numpy's slowest case).
    """
    rows, size = blocks.shape
    if not is_power_of_two(size):
        raise ValueError(f"block size {size} is not a power of two")
    if not blocks.flags.c_contiguous:
        raise ValueError("fwht needs a C-contiguous array")
    span = min(LOW_SPAN, size)
    per = max(1, BATCH_BYTES // (8 * size))
    work = np.empty(min(per, rows) * size)  # the transposed batch
    diffs = np.empty(min(per, rows) * size // 2)  # a - b of each pass, before b is overwritten
    for first in range(0, rows, per):
        batch = blocks[first : first + per]
        if span > 1:
            _low_passes(batch, span, work, diffs)
        _butterflies(batch, span, diffs)
    return blocks


def _butterflies(rows: np.ndarray, half: int, diffs: np.ndarray) -> None:
    """The passes half, 2·half, …, P/2 on each row of `rows` (n, P), in place."""
    n, size = rows.shape
    while half < size:
        _pass(rows.reshape(n, size // (2 * half), 2, half), diffs)
        half *= 2


def _pass(view: np.ndarray, diffs: np.ndarray) -> None:
    """(a, b) → (a + b, a - b) for a = view[:, :, 0], b = view[:, :, 1]."""
    top, bottom = view[:, :, 0, :], view[:, :, 1, :]
    diff = diffs[: top.size].reshape(top.shape)
    np.subtract(top, bottom, out=diff)
    top += bottom
    bottom[...] = diff


def _low_passes(rows: np.ndarray, span: int, work: np.ndarray, diffs: np.ndarray) -> None:
    """The passes half = 1 … span/2 of each row, done on its (span, P/span) transpose.

    Element k = a·span + i of a row sits at (i, a) of the transpose; the pass `half` pairs
    k with k + half for i's bit `half` clear, i.e. transposed rows i and i + half at the
    same a: the same pairs, the same operations, in long contiguous runs.
    """
    n, size = rows.shape
    cols = size // span
    grid = work[: n * size].reshape(n, span, cols)
    np.copyto(grid, rows.reshape(n, cols, span).transpose(0, 2, 1))
    half = 1
    while half < span:
        _pass(grid.reshape(n, span // (2 * half), 2, half * cols), diffs)
        half *= 2
    np.copyto(rows.reshape(n, cols, span), grid.transpose(0, 2, 1))


def reference_fwht(blocks: np.ndarray) -> np.ndarray:
    """The definition fwht must match bit for bit: each pass over all rows at once, in place.

    Kept for the tests (same bits) and bench/codecs.py (the speed-up, measured in one run).
    """
    rows, size = blocks.shape
    half = 1
    while half < size:
        view = blocks.reshape(rows, size // (2 * half), 2, half)
        top, bottom = view[:, :, 0, :], view[:, :, 1, :]
        diff = top - bottom
        top += bottom
        bottom[...] = diff
        half *= 2
    return blocks


def inverse_sqrt(size: int) -> float:
    """1/√P as the float64 every implementation computes (two correctly rounded ops)."""
    return 1.0 / math.sqrt(size)


def rotate(blocks: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """R·x = H·D·x/√P for each row; `flips` (±1, same shape). Returns a new float64 array."""
    out = np.multiply(blocks, flips, dtype=np.float64)
    fwht(out)
    out *= inverse_sqrt(out.shape[1])
    return out


def unrotate(blocks: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """R⁻¹·y = D·H·y/√P for each row. Returns a new float64 array."""
    out = np.array(blocks, dtype=np.float64, copy=True)
    fwht(out)
    out *= inverse_sqrt(out.shape[1])
    out *= flips
    return out

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
    """H·x for each row of `blocks` (float64, shape (rows, P)), in place; returns it."""
    rows, size = blocks.shape
    if not is_power_of_two(size):
        raise ValueError(f"block size {size} is not a power of two")
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

"""The randomized Hadamard rotation: y = H·D·x / √P on blocks of P = 2**k elements.

D is a diagonal of ±1 sign flips (randomness.signs), H the PxP Sylvester-Hadamard matrix
(H_1 = [1], H_2P = [[H_P, H_P], [H_P, -H_P]]). H·H = P·I and D·D = I, so R = H·D/√P is
orthonormal: ‖R·x‖ = ‖x‖, and its inverse is R⁻¹ = D·H/√P. For any fixed x, the random signs
spread x's energy evenly: every rotated coordinate has mean 0 and variance ‖x‖²/P, and for
large P it is close to a Gaussian. That is what lets a scalar quantizer with one scale per
block do well on deltas whose coordinates differ by orders of magnitude (EDEN, DRIVE).

Padding: a block of m elements, m not a power of two (only the last block of a vector), is
padded with zeros to P = max(8, next power of two ≥ m). Its rotated form has P coordinates,
all of which are coded; the decoder drops the padded positions after rotating back. (The
rotated zeros are not zero, so padding costs codes: at most P - m < m extra, once per vector.)

Determinism: the transform is log2(P) passes of element-wise float64 additions and
subtractions in a fixed pattern, then one multiplication by the float64 constant 1/√P. Each
of these is a single IEEE-754 operation, correctly rounded, never a reduction whose order a
library may change, so the result is the same bits on every machine and numpy version.
"""

from __future__ import annotations

import math

import numpy as np

MIN_BLOCK = 8


def padded_size(m: int) -> int:
    """P for a block of m elements: max(8, the next power of two ≥ m)."""
    if m < 1:
        raise ValueError(f"a block holds at least one element, got {m}")
    return max(MIN_BLOCK, 1 << (m - 1).bit_length())


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

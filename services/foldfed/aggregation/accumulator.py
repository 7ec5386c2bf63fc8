"""The running int64 sum of a step, kept in a file so memory stays O(chunk), not O(model).

One little-endian int64 per element of the model (see layout.ModelLayout). Adding a chunk
reads only the slice it touches (os.preadv into a numpy buffer), adds, and writes the slice
back: the process holds one chunk's worth of numbers at a time, whatever the model size or
the number of participants; the rest lives in the file and the page cache.

No overflow: each contribution is bounded by fixedpoint.contribution_bound(P), i.e.
|q| <= 2**63 // P - 1, and an element receives at most one contribution per participant
(the caller drops duplicates by (step, participant, chunk index)), so any partial sum of at
most P of them is below 2**63 in magnitude. `add` still guards, because a caller that lets
a duplicate or a too-large P through must get an error, not a wrong model: it keeps a bound
on every |sum| (the sum of the largest |q| of each add so far); while that bound plus the
new piece's largest |q| is below 2**63, a plain np.add cannot wrap. Past it (never, with
real deltas, which use a sliver of the grid), each element is checked — two's-complement
overflow flips the sign — and an add that would wrap is refused before anything is written.

Crash model: the file is a cache, not a record. Adds are not fsynced, and a crash can leave
a read-modify-write half done, so its content after a crash means nothing. Opening an
Accumulator therefore starts from zeros, and the aggregator rebuilds the sum by re-adding
every applied chunk from its content-addressed store — integer sums make the rebuilt total
identical to the lost one. That is also why no add pays for an fsync.

Masked sums (secure aggregation, foldfed.secagg): with `ring_bits` set, the pieces are
masked words that wrap by design. Their int64 sum is kept mod 2**64 (np.add wraps, no
overflow check: there is no overflow to detect), and `read` returns each sum reduced mod
2**ring_bits as a signed number: the masks cancel there, leaving the plaintext Q.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from foldfed.aggregation.fileio import pread_into, pwrite_from
from foldfed.errors import StoreError
from foldfed.secagg.masks import check_ring_bits, ring_reduce

_ITEM = np.dtype("<i8")
# Elements per block of the exact overflow check: two 512 KiB operands, in a core's L2.
_BLOCK = 1 << 16


class Accumulator:
    """A zero-initialised int64 vector of `elements` entries in the file at `path`."""

    def __init__(self, path: Path, elements: int) -> None:
        if elements < 0:
            raise ValueError(f"elements must be non-negative, got {elements}")
        self._path = path
        self._elements = elements
        self._ring_bits: int | None = None  # set: a masked sum (module docstring)
        self._scratch = np.empty(0, dtype=_ITEM)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self.reset()
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def elements(self) -> int:
        return self._elements

    @property
    def ring_bits(self) -> int | None:
        return self._ring_bits

    @ring_bits.setter
    def ring_bits(self, bits: int | None) -> None:
        """Make this a masked sum on a ring of `bits` (None: the plain, checked sum)."""
        if bits is not None:
            check_ring_bits(bits)
        self._ring_bits = bits

    def reset(self) -> None:
        """Back to all zeros, disk space reserved up front."""
        # Every |sum| is at most the sum of the largest |q| of every add so far: while that
        # stays below 2**63, an add needs no per-element overflow check. Far from the
        # bound in practice (real deltas use a tiny part of the grid), so the check is free.
        self._magnitude_bound = 0
        size = self._elements * _ITEM.itemsize
        os.ftruncate(self._fd, 0)  # drops the old blocks: they read back as zeros
        os.ftruncate(self._fd, size)
        if size and hasattr(os, "posix_fallocate"):
            # Reserve the blocks now: a full disk fails here, not halfway through a step.
            os.posix_fallocate(self._fd, 0, size)

    def read(self, element_offset: int, count: int) -> np.ndarray:
        """The `count` sums starting at `element_offset`."""
        self._check_range(element_offset, count)
        out = np.empty(count, dtype=_ITEM)
        pread_into(self._fd, out, element_offset * _ITEM.itemsize)
        return out if self._ring_bits is None else ring_reduce(out, self._ring_bits)

    def add(self, element_offset: int, q: np.ndarray) -> None:
        """Add the int64 quanta `q` to the sums from `element_offset` on."""
        self.add_all([(element_offset, q)])

    def add_all(self, pieces: Iterable[tuple[int, np.ndarray]]) -> None:
        """Add several pieces (one chunk's): every sum is checked before any is written.

        The pieces must not overlap: each is read before any is written back.
        """
        staged: list[tuple[int, np.ndarray]] = []
        used, end, added = 0, -1, 0
        for element_offset, q in sorted(pieces, key=lambda piece: piece[0]):
            if q.dtype != _ITEM or q.ndim != 1:
                raise ValueError(f"quanta must be a 1-d int64 array, got {q.dtype} {q.shape}")
            if element_offset < end:
                raise ValueError(f"pieces overlap at element {element_offset}")
            end = element_offset + q.size
            self._check_range(element_offset, q.size)
            current = self._scratch_slice(used, q.size)
            used += q.size
            pread_into(self._fd, current, element_offset * _ITEM.itemsize)
            peak = max(int(q.max()), -int(q.min())) if q.size else 0
            if self._ring_bits is not None:
                np.add(current, q, out=current)  # masked words: wraps mod 2**64 by design
            elif self._magnitude_bound + peak < 1 << 63:
                np.add(current, q, out=current)  # cannot overflow: see _magnitude_bound
            else:
                _add_checked(current, q, element_offset)
            added = max(added, peak)
            staged.append((element_offset, current))
        for element_offset, summed in staged:
            pwrite_from(self._fd, summed, element_offset * _ITEM.itemsize)
        self._magnitude_bound += added

    def _scratch_slice(self, start: int, count: int) -> np.ndarray:
        # One buffer reused across adds: a fresh multi-MiB array per chunk costs more in
        # page faults than the addition itself. It grows to the largest chunk seen; views
        # already handed out keep the old buffer alive.
        if self._scratch.size < start + count:
            self._scratch = np.empty(max(start + count, 2 * self._scratch.size), dtype=_ITEM)
            start = 0
        return self._scratch[start : start + count]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Accumulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_range(self, element_offset: int, count: int) -> None:
        if element_offset < 0 or count < 0 or element_offset + count > self._elements:
            raise ValueError(
                f"elements [{element_offset}, {element_offset + count}) outside "
                f"[0, {self._elements})"
            )


def _add_checked(total: np.ndarray, q: np.ndarray, element_offset: int) -> None:
    """total += q in place, unless some sum would leave int64 (then StoreError).

    Block by block, so each block is still in cache for the add after its checks. Two
    reductions per operand (no temporaries) prove a block safe: if the largest magnitudes
    add up to less than 2**63, no element can overflow. Nothing is written to the file
    unless every block passed, so a refused add leaves the sum as it was.
    """
    for start in range(0, total.size, _BLOCK):
        t, d = total[start : start + _BLOCK], q[start : start + _BLOCK]
        if max(int(t.max()), -int(t.min())) + max(int(d.max()), -int(d.min())) >= 1 << 63:
            summed = t + d  # wraps silently; two's-complement overflow flips the sign
            if np.any(((t ^ summed) & (d ^ summed)) < 0):
                raise StoreError(
                    f"int64 overflow adding {q.size} elements at {element_offset}: "
                    "a duplicate contribution or more participants than the grid allows"
                )
        np.add(t, d, out=t)

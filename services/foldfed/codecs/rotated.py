"""`rotated:v1` — b-bit scalar codes after a randomized Hadamard rotation (EDEN/DRIVE style).

For each block of B = 2**k elements (the vector's last block of m < B elements: its
sub-blocks, hadamard.tail_sizes, P = 8·⌈m/8⌉ coordinates in all, one range for all of
them), with the rotation R of hadamard.py whose signs come from the context's rotation
stream at the block's global element positions:

    y     = R · x                                   (P coordinates, float64)
    L     = 2**b levels;   s = 2·R_j / (L - 1)      (grid step; the grid spans [-R_j, R_j])
    v     = min(max((y + R_j) / s, 0), L - 1)       (position on the grid, saturating)
    c     = ⌊v⌋ + [u < v - ⌊v⌋]   (rounding=stochastic; u from the sender's rounding stream)
          = rint(v)               (rounding=nearest, ties to even)
    decode: ŷ = c·s - R_j;  x̂ = first m coordinates of R⁻¹·ŷ, rounded to float32

R_j comes from the context's shared ranges (`scale=shared`, scale.py: every member of a
step has the same, so the codec is linear_shared) or is the coder's own mult · RMS(y) of
the block, rounded to float32 and sent in front of the codes (`scale=block`: per member,
so not maskable). `mult` trades grid resolution against saturation: about 0.8 suits one
bit with nearest rounding (E|y| of a Gaussian is 0.8 sigma), 1.5-2 two bits.

Bound. Per coordinate, |y - ŷ| ≤ s·(1 if stochastic, ½ if nearest) + max(0, |y| - R_j)
(the second term only where the grid saturates). R is orthonormal,
so per block ‖x - x̂‖₂ ≤ ‖y - ŷ‖₂ + (float rounding: the two transforms and the float32
cast, ≤ 2**-22·(‖x‖₂ + ‖ŷ‖₂)). Stochastic rounding is unbiased inside the grid,
E[ŷ] = y, so E[x̂] = x when nothing saturates.

Linearity (scale=shared). With shared R_j and s, Σ_i ŷ_i = s·Σ_i c_i - count·R_j, and R⁻¹ is
linear with shared signs, so decode_sum(Σ_i c_i, count) = R⁻¹(s·C - count·R_j) equals
Σ_i decode(c_i) in real arithmetic; in floats both are within rounding of each other.
A sum of `count` code vectors is at most count·(L - 1): it fits a ring of
base.ring_bits(L, count) bits.

Byte layout of a chunk of n elements in blocks P_0 .. P_{q-1} (all B but the last of the
vector):

    scale=block:  [R_0 .. R_{q-1}: q little-endian float32] [packed codes]
    scale=shared: [packed codes]

packed codes: the Σ P_j codes, block after block, packed as packing.py says (each block's
codes start on a byte, since P_j·b is a multiple of 8).

Determinism: the signs and uniforms come from blake3 streams (randomness.py), the
transform is element-wise IEEE arithmetic in a fixed order (hadamard.py), the grid and
rounding are single IEEE operations per value. A member that encodes a step again (after a
restart) sends the same bytes; every party decodes the same float32 values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from foldfed.codecs import hadamard, packing, randomness
from foldfed.codecs.base import expect_size, flat_float32
from foldfed.codecs.context import CodecContext
from foldfed.codecs.scale import own_ranges
from foldfed.codecs.spec import canonical_float
from foldfed.errors import CodecError

ROUNDINGS = ("nearest", "stochastic")
SCALES = ("block", "shared")


@dataclass(frozen=True)
class SharedScaleRule:
    """How the hub makes a step's shared ranges (scale.py), part of the cycle's spec."""

    floor: float = 0.01
    init: float = 1e-3

    def __post_init__(self) -> None:
        if not (0 <= self.floor <= 1 and self.init > 0):
            raise CodecError(f"rotated: need 0 <= floor <= 1 and init > 0: {self}")


@dataclass(frozen=True)
class _Layout:
    """A chunk's blocks: how many are full, and the sub-blocks of a short last one."""

    elements: int
    full: int
    tail: int  # elements in the short last block (0: none)
    tail_parts: tuple[int, ...]  # hadamard.tail_sizes(tail)

    @property
    def blocks(self) -> int:
        return self.full + (1 if self.tail else 0)

    @property
    def tail_padded(self) -> int:
        return sum(self.tail_parts)

    def coordinates(self, block: int) -> int:
        return self.full * block + self.tail_padded


class RotatedCodec:
    def __init__(
        self,
        bits: int,
        block: int = 4096,
        *,
        mult: float = 2.0,
        rounding: str = "stochastic",
        scale: str = "shared",
        rule: SharedScaleRule | None = None,
    ) -> None:
        if not 1 <= bits <= 8:
            raise CodecError(f"rotated: bits must be 1..8, got {bits}")
        if not hadamard.is_power_of_two(block) or not 8 <= block <= 1 << 20:
            raise CodecError(f"rotated: block must be a power of two in [8, 2**20], got {block}")
        if not 0 < mult <= 1e6:
            raise CodecError(f"rotated: mult must be in (0, 1e6], got {mult}")
        if rounding not in ROUNDINGS or scale not in SCALES:
            raise CodecError(f"rotated: rounding in {ROUNDINGS}, scale in {SCALES}")
        if scale == "shared" and rule is None:
            rule = SharedScaleRule()
        self.bits, self.block, self.rounding, self.scale = bits, block, rounding, scale
        self.mult = float(mult)
        self.rule = rule if scale == "shared" else None
        self.levels = 1 << bits

    @property
    def linear_shared(self) -> bool:
        return self.scale == "shared"

    @property
    def spec(self) -> str:
        text = f"rotated:v1;bits={self.bits};block={self.block}"
        if self.rule is not None:
            text += (
                f";floor={canonical_float(self.rule.floor)};init={canonical_float(self.rule.init)}"
            )
        return (
            text + f";mult={canonical_float(self.mult)};rounding={self.rounding};scale={self.scale}"
        )

    def _layout(self, elements: int) -> _Layout:
        full, tail = divmod(elements, self.block)
        parts = tuple(hadamard.tail_sizes(tail)) if tail else ()
        return _Layout(elements, full, tail, parts)

    def chunk_bytes(self, elements: int) -> int:
        layout = self._layout(elements)
        header = 4 * layout.blocks if self.scale == "block" else 0
        return header + packing.packed_size(layout.coordinates(self.block), self.bits)

    # --- encoding ---------------------------------------------------------------------

    def _rotated(
        self, flat: np.ndarray, ctx: CodecContext, first_block: int
    ) -> tuple[list[np.ndarray], _Layout]:
        """y for each group of equal-size blocks: [full blocks (q, B)] [+ tail (1, P_tail)]."""
        layout = self._layout(flat.size)
        key, start = ctx.rotation_key(), first_block * self.block
        groups = []
        if layout.full:
            count = layout.full * self.block
            x = flat[:count].reshape(layout.full, self.block)
            flips = randomness.signs(key, start, count).reshape(x.shape)
            groups.append(hadamard.rotate(x, flips))
        if layout.tail:
            x = np.zeros(layout.tail_padded)
            x[: layout.tail] = flat[layout.full * self.block :]
            flips = randomness.signs(key, start + layout.full * self.block, layout.tail_padded)
            groups.append(self._tail_apply(hadamard.rotate, x, flips, layout).reshape(1, -1))
        return groups, layout

    @staticmethod
    def _tail_apply(
        transform: Callable[[np.ndarray, np.ndarray], np.ndarray],
        values: np.ndarray,
        flips: np.ndarray,
        layout: _Layout,
    ) -> np.ndarray:
        """`transform` (rotate or unrotate) on each sub-block of the short last block."""
        out, at = [], 0
        for size in layout.tail_parts:
            part = values[at : at + size].reshape(1, -1)
            out.append(transform(part, flips[at : at + size].reshape(1, -1))[0])
            at += size
        return np.concatenate(out)

    def _ranges(
        self, ctx: CodecContext, first_block: int, layout: _Layout, rotated: list[np.ndarray]
    ) -> np.ndarray:
        if self.scale == "block":
            own = [own_ranges(g, self.mult) for g in rotated]
            # Rounded to float32 first: the encoder uses the R_j the decoder will read.
            return np.concatenate(own).astype(np.float32) if own else np.zeros(0, np.float32)
        if ctx.ranges is None or ctx.ranges.block != self.block:
            raise CodecError(
                f"{self.spec}: needs the step's shared ranges for blocks of {self.block}"
            )
        return ctx.ranges.of_blocks(first_block, layout.blocks)

    def codes(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> np.ndarray:
        return self._encode_codes(flat_float32(values), ctx, first_block)[0]

    def _encode_codes(
        self, flat: np.ndarray, ctx: CodecContext, first_block: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rotated, layout = self._rotated(flat, ctx, first_block)
        ranges = self._ranges(ctx, first_block, layout, rotated)
        total = sum(g.size for g in rotated)
        uniforms = None
        if self.rounding == "stochastic":
            uniforms = randomness.uniforms(ctx.rounding_key(), first_block * self.block, total)
        codes, at, row = np.empty(total, dtype=np.uint8), 0, 0
        for group in rotated:
            rows, size = group.shape
            r = ranges[row : row + rows].astype(np.float64).reshape(rows, 1)
            u = None if uniforms is None else uniforms[at : at + group.size].reshape(rows, size)
            codes[at : at + group.size] = self._quantize(group, r, u).reshape(-1)
            at, row = at + group.size, row + rows
        return codes, np.asarray(ranges)

    def _quantize(self, y: np.ndarray, r: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        """The codes of rotated rows `y` (overwritten) with ranges `r` (rows, 1): the grid
        of the module docstring, in place and one range per row (no per-coordinate copies);
        each value goes through the same IEEE operations as written there."""
        top = float(self.levels - 1)
        step = 2.0 * r / top
        flat_rows = ~(step[:, 0] > 0)  # a block of zeros with its own range 0
        y += r
        with np.errstate(divide="ignore", invalid="ignore"):
            y /= step
        y[flat_rows] = 0.0
        np.clip(y, 0.0, top, out=y)
        if u is None:
            return np.rint(y, out=y).astype(np.uint8)
        low = np.floor(y)
        y -= low  # the fraction v - ⌊v⌋, exactly
        codes = low.astype(np.uint8)
        codes += u < y
        return codes

    def _per_coordinate(self, ranges: np.ndarray, layout: _Layout) -> np.ndarray:
        sizes = [self.block] * layout.full + ([layout.tail_padded] if layout.tail else [])
        return np.repeat(ranges, sizes)

    def pack(self, codes: np.ndarray) -> bytes:
        return packing.pack(codes, self.bits)

    def unpack(self, data: bytes | memoryview, elements: int) -> np.ndarray:
        return packing.unpack(data, self.bits, self._layout(elements).coordinates(self.block))

    def encode(self, values: np.ndarray, ctx: CodecContext, first_block: int) -> bytes:
        codes, ranges = self._encode_codes(flat_float32(values), ctx, first_block)
        header = ranges.astype("<f4").tobytes() if self.scale == "block" else b""
        return header + self.pack(codes)

    # --- decoding ---------------------------------------------------------------------

    def decode(
        self, data: bytes | memoryview, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        expect_size(data, self.chunk_bytes(elements), self.spec, elements)
        layout = self._layout(elements)
        view = memoryview(data)
        if self.scale == "block":
            head = 4 * layout.blocks
            ranges = np.frombuffer(view[:head], dtype="<f4").astype(np.float64)
            if not (np.all(np.isfinite(ranges)) and np.all(ranges >= 0)):
                raise CodecError(f"{self.spec}: a block range is negative or not finite")
            view = view[head:]
        else:
            ranges = self._ranges(ctx, first_block, layout, [])
        codes = self.unpack(view, elements)
        if int(codes.max(initial=0)) >= self.levels:
            raise CodecError(f"{self.spec}: code out of range")
        return self._reconstruct(codes.astype(np.float64), 1, ranges, layout, ctx, first_block)

    def decode_sum(
        self, code_sum: np.ndarray, count: int, elements: int, ctx: CodecContext, first_block: int
    ) -> np.ndarray:
        if self.scale != "shared":
            raise CodecError(f"{self.spec}: per-member scales; sums of codes do not decode")
        layout = self._layout(elements)
        total = np.asarray(code_sum).reshape(-1)
        if total.size != layout.coordinates(self.block):
            raise CodecError(f"{self.spec}: code sum has {total.size} coordinates")
        if total.min(initial=0) < 0 or total.max(initial=0) > count * (self.levels - 1):
            raise CodecError(f"{self.spec}: code sum out of range for {count} members")
        ranges = self._ranges(ctx, first_block, layout, [])
        out = self._reconstruct(total.astype(np.float64), count, ranges, layout, ctx, first_block)
        return out.astype(np.float64)

    def _reconstruct(
        self,
        codes: np.ndarray,
        count: int,
        ranges: np.ndarray,
        layout: _Layout,
        ctx: CodecContext,
        first_block: int,
    ) -> np.ndarray:
        r = self._per_coordinate(ranges, layout)
        y_hat = codes * (2.0 * r / float(self.levels - 1)) - count * r
        key, start = ctx.rotation_key(), first_block * self.block
        parts = []
        if layout.full:
            count_full = layout.full * self.block
            flips = randomness.signs(key, start, count_full).reshape(layout.full, self.block)
            y = y_hat[:count_full].reshape(layout.full, self.block)
            parts.append(hadamard.unrotate(y, flips).reshape(-1))
        if layout.tail:
            flips = randomness.signs(key, start + layout.full * self.block, layout.tail_padded)
            y = y_hat[layout.full * self.block :]
            parts.append(self._tail_apply(hadamard.unrotate, y, flips, layout)[: layout.tail])
        flat = np.concatenate(parts) if parts else np.zeros(0)
        return flat.astype(np.float32) if count == 1 else flat

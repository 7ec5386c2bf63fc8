"""Update bounds: the L2 norm of one member's delta as the hub decodes it, chunk by chunk,
and the clip a member applies so that the hub never sees it above the cycle's bound.

What is bounded (docs/format.md, "Update bounds"): v, the vector the hub adds to its sum
for a member before weighting, i.e. the raw tensor values of a safetensors payload, or
decode(encode(x)) of a coded one. A delta is within bound B when

    S = fsum(s_i) <= B * B,   s_i = sum(float64(v_j)^2 for j in chunk i)

`s_i` is a function of chunk i's bytes only (the chunk's digest is in the manifest), and
`math.fsum` is correctly rounded whatever the order of its terms, so S, and the verdict,
do not depend on the order chunks arrive in, on redeliveries, or on a crash and replay. S
only grows as chunks come, so the first chunk that takes it over B*B is refused before
it is stored: a delta over the bound never has all its chunks counted.

A member computes the same S over the same decoded chunks before sending. Only the
summation order inside one chunk's dot product may differ between two machines
(numpy/BLAS), a relative error far below 2^-40 for any chunk size we cut; a member
therefore sends only when its S <= (B * (1 - AGREEMENT_HEADROOM))^2, and the hub's
verdict cannot differ from the member's.

Clipping: x is scaled by `clip_scale` to CLIP_TARGET * B before coding. A lossy codec may
still decode to a longer vector (quantization noise adds energy), so the member measures
the decoded norm and scales again by the ratio, a few times at most (`MAX_CLIP_ROUNDS`);
a delta that still does not fit is not sent. Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from foldfed.errors import Reject

# What a clip aims at, relative to the bound: the headroom for codec error before the
# decoded norm is measured (a lossless codec lands here exactly, a lossy one near it).
CLIP_TARGET = 1.0 - 2.0**-8
# A member sends only what is within (1 - this) * B by its own sums: more than the
# difference a dot product's summation order can make between two machines.
AGREEMENT_HEADROOM = 2.0**-30
# Rounds of "encode, measure the decoded norm, scale down" before a member gives up.
MAX_CLIP_ROUNDS = 6


class OverBound(Reject):
    """A delta's decoded L2 norm exceeds the cycle's bound (the reason says by how much)."""


def squared_norm(values: np.ndarray) -> float:
    """s_i: the sum of squares of one chunk's values, in float64."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return float(np.dot(flat, flat))


def norm_of(squares: list[float] | tuple[float, ...]) -> float:
    """The L2 norm of a vector from its chunks' sums of squares (order-free)."""
    return math.sqrt(math.fsum(squares))


def within(squares: list[float] | tuple[float, ...], bound: float) -> bool:
    """Whether the hub accepts a delta with these chunk sums of squares (0: no bound)."""
    return bound <= 0 or math.fsum(squares) <= bound * bound


@dataclass
class NormTally:
    """The hub's running sum of squares of one delta, keyed by chunk index.

    A chunk counts once however often it is checked (redeliveries, a replay), because its
    bytes are fixed by the manifest's digest for that index."""

    bound: float
    squares: dict[int, float] = field(default_factory=dict)

    def admit(self, index: int, square: float) -> None:
        """Count chunk `index`, or raise OverBound (counting nothing) if it breaks the bound."""
        if self.bound <= 0:
            return
        trial = {**self.squares, index: square}
        if not within(list(trial.values()), self.bound):
            raise OverBound(
                f"update norm over the bound: chunks so far reach L2 norm "
                f"{norm_of(list(trial.values())):.6g} > {self.bound:.6g} "
                f"(at chunk {index}, {len(trial)} chunks counted)"
            )
        self.squares[index] = square

    def norm(self) -> float:
        return norm_of(list(self.squares.values()))


def sendable(norm: float, bound: float) -> bool:
    """Whether a member may send a delta whose decoded norm is `norm` by its own sums."""
    return bound <= 0 or norm <= bound * (1.0 - AGREEMENT_HEADROOM)


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings a vector of L2 norm `norm` to CLIP_TARGET * bound (1.0 if it
    is already there or no bound is set)."""
    if bound <= 0 or norm <= bound * CLIP_TARGET:
        return 1.0
    return bound * CLIP_TARGET / norm

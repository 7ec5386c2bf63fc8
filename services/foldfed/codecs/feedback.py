"""Error feedback (EF-SGD): what a lossy codec did not send is sent later, never lost.

Each coder — a member on the uplink, the hub on the downlink — keeps a residual e. For
step t, with delta Δ_t (a member's θ_local - θ_t, or the hub's global update U_t):

    x_t   = Δ_t + e_{t-1}                  (float32)
    sent  = encode(x_t)                    (the chunks that travel)
    d_t   = decode(sent)                   (what every receiver adds)
    e_t   = x_t - d_t                      (float32), tagged with step t

so for any T: Σ_{t≤T} d_t + e_T = Σ_{t≤T} Δ_t (up to float32 rounding of the two
subtractions per step). The error of the coded run is one residual, not a sum of T
errors; this is what keeps SGD's rate with any compressor, biased ones included (sign-like
1-bit codes, saturating grids, nearest rounding).

Downlink: the hub runs the same loop on U_t with its own residual and the context
direction "down", sender "hub". Every party — the hub included — applies θ_{t+1} = θ_t + d_t
from the same decoded bytes, so all still hold bit-identical θ and the step's model
digests agree; the hub's residual is the only place the difference U_t - d_t lives.

Durable state and crash rules. The residual is {cycle, step, values}: `step` is the step
whose encoding *left* it, 0 for "none yet". An adapter (codecs_store.py) persists it; the
rules that make a restart neither lose it nor apply it twice:

1. Encoding step t is a pure function of (Δ_t, e_{t-1}, context): the same inputs give the
   same chunks, byte for byte (the codecs are deterministic, stochastic rounding included).
2. Write order: first the coded chunks of step t (the spool or chunk store, durably), then
   e_t. e_t's write is the commit point of "step t is encoded".
3. On restart, with stored residual e (tag s) and step t to send:
   - s < t: step t was not committed. Encode again from Δ_t + e: by rule 1 that gives the
     bytes a crashed earlier attempt may already have sent (same chunk ids, which the hub
     deduplicates). `carried` returns e for exactly this case.
   - s = t: step t is committed: send its stored chunks, never re-encode (e_{t-1} is gone
     and e_t must not be added to Δ_t). `carried` refuses with ResidualAlreadyApplied.
   - s > t: a stale request for an older step: refused the same way.
4. A residual of another cycle is dropped (zeros): a new cycle may start from another
   model or codec, and its members agree on nothing that old residual refers to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from foldfed.codecs.base import Codec, flat_float32
from foldfed.codecs.context import CodecContext
from foldfed.codecs.plan import ChunkPlan
from foldfed.codecs.vector import decode_vector, encode_vector
from foldfed.errors import CodecError


class ResidualAlreadyApplied(CodecError):
    """The stored residual belongs to this step or a later one: send the stored chunks."""


@dataclass(frozen=True)
class Residual:
    cycle: int
    step: int  # the step whose encoding left this residual; 0: none yet
    values: np.ndarray  # float32, flat

    @classmethod
    def zero(cls, cycle: int, elements: int) -> Residual:
        return cls(cycle, 0, np.zeros(elements, dtype=np.float32))

    def __post_init__(self) -> None:
        if self.step < 0 or self.cycle < 0:
            raise CodecError(f"residual cycle and step must be >= 0, got {self.cycle}, {self.step}")
        if self.values.dtype != np.float32 or self.values.ndim != 1:
            raise CodecError("residual values must be a flat float32 array")


@dataclass(frozen=True)
class Compensated:
    """One step through error feedback: what travels, what receivers add, what stays."""

    chunks: list[bytes]
    decoded: np.ndarray  # float32: d_t, the update every receiver applies
    residual: Residual  # e_t, tagged with this step


def carried(residual: Residual | None, *, cycle: int, step: int, elements: int) -> np.ndarray:
    """e_{t-1} to add to step `step`'s delta (rule 3 and 4 of the module docstring)."""
    if residual is None or residual.cycle != cycle:
        return np.zeros(elements, dtype=np.float32)
    if residual.step >= step:
        raise ResidualAlreadyApplied(
            f"residual of step {residual.step} (cycle {cycle}) is already past step {step}: "
            "its coded chunks are stored; send those, do not encode again"
        )
    if residual.values.size != elements:
        raise CodecError(f"residual has {residual.values.size} elements, delta has {elements}")
    return residual.values


def compensate(
    delta: np.ndarray,
    residual: Residual | None,
    codec: Codec,
    ctx: CodecContext,
    plan: ChunkPlan,
) -> Compensated:
    """Encode Δ_t + e_{t-1}; return the chunks, d_t and e_t (tagged ctx.step)."""
    flat = flat_float32(delta)
    x = flat + carried(residual, cycle=ctx.cycle, step=ctx.step, elements=flat.size)
    chunks = encode_vector(codec, x, ctx, plan)
    decoded = decode_vector(codec, chunks, ctx, plan)
    return Compensated(chunks, decoded, Residual(ctx.cycle, ctx.step, x - decoded))

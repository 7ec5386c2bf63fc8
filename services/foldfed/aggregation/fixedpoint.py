"""Exact, order-free weighted FedAvg on a fixed-point int64 grid. Pure numpy.

Participant i contributes, for each element x of its delta,

    q = rint(w_i * x * 2**FRACTION_BITS)        (an int64)

and the aggregator keeps only the integer sum Q = sum_i q. Integer addition is associative
and commutative, so Q is the same whatever the order chunks arrive in, however they are
split, and whether a crashed aggregator rebuilt it from its store: the global model is
bit-identical however the run went. The mean is Q / (W * 2**FRACTION_BITS), W = sum_i w_i.

Resolution: one grid step is 2**-FRACTION_BITS (about 6e-8) in units of w * x; rounding
costs each contribution at most half a step, so the mean of P participants is within
P * 2**-(FRACTION_BITS + 1) / W of the exact weighted mean (plus float64 rounding of the
final division, relative 2**-53). Weights that are sample counts (W in the thousands) make
this far finer than float32; weights normalised to sum to 1 make it about 1e-7 absolute,
coarse for deltas around 1e-5 — prefer sample counts.

Determinism of q: w * x is computed in float64 with one IEEE multiplication, rounded to
nearest even, then scaled by a power of two (exact) and rounded to an integer by np.rint
(ties to even). Every float32/float16/bfloat16 value and every integer weight below 2**53 is
exact in float64, so q depends only on (w, x), on any IEEE-754 machine, with any numpy.

Range: with at most `max_participants` contributions per element, each |q| must be at most
2**63 // max_participants - 1, so that no sum of them can overflow int64. With the default
256 participants that admits |w * x| up to about 2.1e9; anything beyond is rejected, as is
any NaN or infinity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import NoReturn

import numpy as np

from foldfed.aggregation.dtypes import decode_narrow
from foldfed.aggregation.errors import AggregationError

FRACTION_BITS = 24
SCALE = float(1 << FRACTION_BITS)
RESOLUTION = 1.0 / SCALE
DEFAULT_MAX_PARTICIPANTS = 256
# Elements per block in `quantize`: 512 KiB of float64, well inside a core's L2 cache.
_BLOCK = 1 << 16


def contribution_bound(max_participants: int = DEFAULT_MAX_PARTICIPANTS) -> int:
    """The largest |q| one contribution may have so that `max_participants` never overflow."""
    if max_participants < 1:
        raise ValueError(f"max_participants must be at least 1, got {max_participants}")
    return (1 << 63) // max_participants - 1


def _float_at_most(bound: int) -> float:
    # The largest float64 <= bound: float(bound) may round up past it (2**55 - 1 does).
    limit = float(bound)
    return float(np.nextafter(limit, 0.0)) if int(limit) > bound else limit


def check_weight(weight: float) -> None:
    """Raise AggregationError unless `weight` is a finite, positive number."""
    real = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
    if not (real and math.isfinite(weight) and weight > 0):
        raise AggregationError(f"weight must be finite and positive, got {weight!r}")


def quantize(
    values: np.ndarray,
    weight: float,
    *,
    tensor: str = "?",
    max_participants: int = DEFAULT_MAX_PARTICIPANTS,
) -> np.ndarray:
    """rint(weight * values * 2**FRACTION_BITS) as int64; `tensor` names them in errors.

    `values` may be float16/32/64: they are widened to float64 (exactly) as they are
    multiplied. Works through blocks small enough to stay in cache between the passes
    (multiply, round, range check, convert), so memory is read and written once.
    """
    check_weight(weight)
    flat = np.asarray(values).reshape(-1)
    # weight * SCALE is exact (a power-of-two scaling), so this is the single rounding of
    # w * x followed by an exact scaling, as the module docstring promises.
    factor = float(weight) * SCALE
    limit = _float_at_most(contribution_bound(max_participants))
    out = np.empty(flat.size, dtype=np.int64)
    scratch = np.empty(min(flat.size, _BLOCK), dtype=np.float64)
    for start in range(0, flat.size, _BLOCK):
        part = flat[start : start + _BLOCK]
        scaled = scratch[: part.size]
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN: rejected just below
            np.multiply(part, factor, out=scaled, dtype=np.float64)
        np.rint(scaled, out=scaled)
        # Two reductions and no temporary; NaN fails both comparisons.
        low, high = float(scaled.min()), float(scaled.max())
        if not (-limit <= low and high <= limit):
            _reject(flat, max(-low, high), tensor, weight, max_participants)
        np.copyto(out[start : start + part.size], scaled, casting="unsafe")
    return out.reshape(np.shape(values))


def _reject(
    values: np.ndarray, peak: float, tensor: str, weight: float, max_participants: int
) -> NoReturn:
    finite = np.isfinite(values)
    if not finite.all():
        bad = values.size - int(np.count_nonzero(finite))
        raise AggregationError(f"tensor {tensor!r} has {bad} non-finite values (NaN or inf)")
    bound = contribution_bound(max_participants)
    raise AggregationError(
        f"value out of range for the fixed-point grid: |w·x| = {peak / SCALE:.6g} > "
        f"{bound / SCALE:.6g} in tensor {tensor!r} "
        f"(weight {weight!r}, up to {max_participants} participants)"
    )


def dequantize_mean(total: np.ndarray, weight_sum: float) -> np.ndarray:
    """The weighted mean total / (weight_sum * 2**FRACTION_BITS), in float64."""
    check_weight(weight_sum)
    return total.astype(np.float64) / (float(weight_sum) * SCALE)


def weight_total(weights: Iterable[float]) -> float:
    """sum(weights), correctly rounded, hence independent of their order (math.fsum)."""
    return math.fsum(weights)


def decode_span(body: bytes | memoryview, dtype: str, *, tensor: str = "?") -> np.ndarray:
    """The little-endian elements of `dtype` in `body`, as float64 (exact)."""
    return decode_narrow(body, dtype, tensor=tensor).astype(np.float64)

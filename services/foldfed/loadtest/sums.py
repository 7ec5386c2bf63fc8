"""An independent check of the hub's arithmetic: is each step's global update the weighted
mean of the deltas the participants actually wrote?

For step t it reads every participant's `outbox/delta-<t>.safetensors` and the hub's
`updates/update-<t>.safetensors` straight from their bytes (the safetensors layout: an
8-byte little-endian header length, a JSON header, the raw little-endian data; no foldfed
reader, no torch), computes the weighted mean in float64 with numpy, block by block
through memory maps (memory stays a few blocks whatever the model size), and compares.

Tolerance per element, what the hub's documented arithmetic allows (FedAvg, server lr 1;
aggregation/fixedpoint.py): each of the P contributions is rounded to the fixed-point grid
(half a step of 2**-FRACTION_BITS in units of w * x), so the mean is within
P * RESOLUTION / (2 W) of the exact one; the update is then rounded once to float32 (half
an ulp, |mean| * 2**-24). An element beyond that makes the step wrong.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldfed.aggregation.fixedpoint import RESOLUTION

BLOCK = 1 << 20  # elements per comparison block: 8 MiB of float64
_F32_HALF_ULP = 2.0**-24


@dataclass(frozen=True)
class StepSum:
    step: int
    elements: int
    # Elements beyond the tolerance, and the largest |update - mean| / tolerance seen.
    wrong_elements: int
    worst_ratio: float
    # Why the step could not be checked ("" when it was).
    missing: str = ""

    @property
    def wrong(self) -> bool:
        return bool(self.missing) or self.wrong_elements > 0


def block_errors(
    deltas: Sequence[np.ndarray], weights: Sequence[float], update: np.ndarray
) -> tuple[int, float]:
    """(elements beyond tolerance, worst |update - mean| / tolerance) of one block."""
    total = float(sum(weights))
    mean = np.zeros(update.shape, dtype=np.float64)
    for delta, weight in zip(deltas, weights, strict=True):
        mean += delta.astype(np.float64) * weight
    mean /= total
    grid = len(deltas) * RESOLUTION / (2 * total)
    tolerance = grid + np.abs(mean) * _F32_HALF_ULP
    ratio = np.abs(update.astype(np.float64) - mean) / tolerance
    bad = int(np.count_nonzero(~(ratio <= 1.0)))  # NaN counts as wrong
    return bad, float(np.nanmax(ratio)) if ratio.size else 0.0


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Name -> float32 memory map of each tensor of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {entry['dtype']}, the check reads F32 only")
        start, end = entry["data_offsets"]
        count = (end - start) // 4
        out[name] = np.memmap(path, np.float32, "r", offset=8 + size + start, shape=(count,))
    return out


def check_step(
    step: int, deltas: Mapping[str, Path], weights: Mapping[str, float], update: Path
) -> StepSum:
    """The update of `step` against the weighted mean of `deltas` (participant -> file)."""
    missing = [str(p) for p in (*deltas.values(), update) if not p.exists()]
    if missing:
        return StepSum(step, 0, 0, 0.0, missing="not on disk: " + ", ".join(missing))
    hub = read_tensors(update)
    members = {name: read_tensors(path) for name, path in deltas.items()}
    names = sorted(members)
    bad, worst, elements = 0, 0.0, 0
    for tensor, u in hub.items():
        parts = [members[n].get(tensor) for n in names]
        if any(p is None or p.shape != u.shape for p in parts):
            return StepSum(step, elements, bad, worst, missing=f"{tensor}: layouts differ")
        for lo in range(0, u.size, BLOCK):
            hi = min(lo + BLOCK, u.size)
            b, w = block_errors(
                [p[lo:hi] for p in parts if p is not None], [weights[n] for n in names], u[lo:hi]
            )
            bad, worst, elements = bad + b, max(worst, w), elements + hi - lo
    return StepSum(step, elements, bad, worst)


def check_run(
    hub_dir: Path,
    spools: Mapping[str, Path],
    weights: Mapping[str, float],
    members: Mapping[int, Sequence[str]],
) -> list[StepSum]:
    """Every step of `members` (step -> the participants whose deltas it summed), from the
    files a run left (spools: participant -> its spool folder)."""
    return [
        check_step(
            t,
            {n: spools[n] / "outbox" / f"delta-{t:012d}.safetensors" for n in names},
            weights,
            hub_dir / "updates" / f"update-{t:012d}.safetensors",
        )
        for t, names in sorted(members.items())
    ]

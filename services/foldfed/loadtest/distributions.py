"""Seeded compute times: the same (seed, participant, step) always gives the same draw, in
any process, so the simulated trainer, the prediction and a rerun agree exactly. Pure."""

from __future__ import annotations

import math
import random

from foldfed.loadtest.scenario import Compute


def _rng(seed: int, participant: str, step: int, what: str) -> random.Random:
    # random.Random seeds a str through SHA-512: stable across processes and versions.
    return random.Random(f"foldfed-loadtest:{seed}:{participant}:{step}:{what}")


def compute_seconds(compute: Compute, seed: int, participant: str, step: int) -> float:
    """Real seconds `participant` computes in global step `step` (>= 0)."""
    rng = _rng(seed, participant, step, "compute")
    if compute.dist == "fixed":
        value = compute.seconds
    elif compute.dist == "normal":
        value = max(0.0, rng.gauss(compute.seconds, compute.sd))
    elif compute.dist == "lognormal":
        value = compute.seconds * math.exp(rng.gauss(0.0, compute.sigma))
    else:  # pareto: minimum `seconds`, tail index alpha
        value = compute.seconds * rng.paretovariate(compute.alpha)
    if compute.pause_probability > 0 and rng.random() < compute.pause_probability:
        value += compute.pause_seconds
    return value


def mean_seconds(compute: Compute) -> float:
    """The distribution's expected value (for plans over many steps)."""
    if compute.dist == "fixed":
        base = compute.seconds
    elif compute.dist == "normal":
        # The cut at 0 is negligible unless sd is comparable to the mean.
        mu, sd = compute.seconds, compute.sd
        if sd == 0:
            base = mu
        else:
            z = mu / sd
            pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
            cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            base = mu * cdf + sd * pdf
    elif compute.dist == "lognormal":
        base = compute.seconds * math.exp(compute.sigma**2 / 2)
    else:
        base = compute.seconds * compute.alpha / (compute.alpha - 1)
    return base + compute.pause_probability * compute.pause_seconds

"""Server optimizers: the global update from the mean delta. Pure numpy, float64.

The mean delta (the pseudo-gradient, pointing towards the participants' models) becomes
the update the barrier releases:

    fedavg   update = lr * mean                                         lr 1.0
    fedavgm  m = beta * m + mean;           update = lr * m             lr 1.0, beta 0.9
    fedadam  m = b1 * m + (1 - b1) * mean
             v = b2 * v + (1 - b2) * mean**2
             update = lr * m / (sqrt(v) + tau)                          lr 1e-3, b1 0.9,
                                                                        b2 0.99, tau 1e-3

FedAdam is Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
without bias correction and with m = 0, v = tau**2 before the first step, as the paper
starts it. Its default lr 1e-3 is chosen for fine-tuning: deltas per element are then far
below tau, where update ~ (lr / tau) * m, so lr = tau moves the model at about the pace of
FedAvg; a run that wants FedAdam's acceleration raises lr (the paper tunes it in
[1e-2, 1]).

State (m, v) is float64 and every operation here is one IEEE-754 operation that is
correctly rounded (+, -, *, /, sqrt), applied elementwise in a fixed order: the result is
bit-identical on any machine and however the model is sliced. float64 also keeps hundreds
of rounds of momentum from drifting by float32 rounding; it costs 8 bytes per parameter
and state array on disk (never in memory: state is streamed, see finalize.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

OptimizerKind = Literal["fedavg", "fedavgm", "fedadam"]

_DEFAULT_LR: dict[str, float] = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-3}
_STATE: dict[str, tuple[str, ...]] = {"fedavg": (), "fedavgm": ("m",), "fedadam": ("m", "v")}


@dataclass(frozen=True)
class ServerOptimizer:
    """Which server optimizer, with its hyper-parameters.

    `beta1` is FedAvgM's momentum or FedAdam's first-moment decay; `beta2` and `tau` are
    FedAdam's. `lr` defaults per kind (see the module docstring).
    """

    kind: OptimizerKind = "fedavg"
    lr: float = field(default=math.nan)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in _STATE:
            raise ValueError(f"unknown server optimizer {self.kind!r}: use {sorted(_STATE)}")
        if math.isnan(self.lr):
            object.__setattr__(self, "lr", _DEFAULT_LR[self.kind])
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server lr must be finite and positive, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be finite and positive, got {self.tau}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """The float64 arrays this optimizer keeps between steps, one element per param."""
        return _STATE[self.kind]

    def initial_state(self, count: int) -> dict[str, np.ndarray]:
        """State before the first step, for `count` elements."""
        state = {"m": np.zeros(count)} if "m" in self.state_names else {}
        if "v" in self.state_names:
            state["v"] = np.full(count, self.tau * self.tau)
        return state

    def step(
        self, mean: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(update, next state) for a slice of the mean delta and the same slice of state."""
        if self.kind == "fedavg":
            return (mean if self.lr == 1.0 else self.lr * mean), {}  # 1.0 * x == x exactly
        if self.kind == "fedavgm":
            m = self.beta1 * state["m"]
            m += mean
            return self.lr * m, {"m": m}
        return self._adam(mean, state["m"], state["v"])

    def _adam(
        self, mean: np.ndarray, m_prev: np.ndarray, v_prev: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # In place where it saves a temporary, but the same operations in the same order as
        # the formulas in the module docstring (IEEE * is commutative), hence the same bits.
        m = self.beta1 * m_prev
        scratch = (1.0 - self.beta1) * mean
        m += scratch
        v = self.beta2 * v_prev
        np.multiply(mean, mean, out=scratch)
        scratch *= 1.0 - self.beta2
        v += scratch
        np.sqrt(v, out=scratch)
        scratch += self.tau
        update = self.lr * m
        update /= scratch
        return update, {"m": m, "v": v}

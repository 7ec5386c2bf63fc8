"""The `sim` family: the load tests' trainer. Training is replaced by a wait of the
scenario's compute time; everything else is the real trainer's (build θ_t from the
released update, commit and report it, write Δ_t through the spool).

Settings: `FOLDFED_LOADTEST_SIM` (declared in the settings registry, a text there), JSON
written by the load-test runner and parsed here:

| key | meaning |
|---|---|
| `weight` | the weight every delta claims (> 0) |
| `elements` | float32 values of θ_0 (`foldfed initial-model` with this family) |
| `compute_s` | `{step: seconds}`: the compute time of each step, in run seconds |

The runner draws the compute times from the scenario's distributions, already divided by
its time scale: the trainer knows nothing of scenarios. A round waits until `compute_s`
after it began (its Δ is made meanwhile), so the delta appears when the scenario says.

Δ_t names exactly θ's tensors, with values from a generator seeded by (FOLDFED_SEED,
participant, step): the same scenario gives the same bytes in every run, so final model
digests of a disturbed and an undisturbed run are comparable bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import file_digest
from foldfed.errors import ConfigError
from foldfed.localround import RoundResult, StopCheck, TrainingInterrupted, derive_seed
from foldfed.settings import Settings, env_for, variable
from foldfed.trainer.backend import TrainerSettings

SIM_VAR = variable("loadtest_sim")
# How often a waiting round looks at the stop request; the wait itself ends on time.
_STOP_POLL_S = 0.01
_DELTA_SCALE = 1e-3


@dataclass(frozen=True)
class SimSettings:
    weight: float
    elements: int
    compute_s: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"{SIM_VAR}: weight must be > 0, got {self.weight}")
        if self.elements < 2:
            raise ConfigError(f"{SIM_VAR}: elements must be >= 2, got {self.elements}")
        bad = sorted(step for step, s in self.compute_s.items() if not s >= 0)
        if bad:
            raise ConfigError(f"{SIM_VAR}: compute_s of steps {bad} must be >= 0")

    def to_json(self) -> str:
        return json.dumps(
            {
                "weight": self.weight,
                "elements": self.elements,
                "compute_s": {str(k): v for k, v in sorted(self.compute_s.items())},
            }
        )

    def env(self) -> dict[str, str]:
        """The trainer's environment for this plan: the `sim` family and its JSON."""
        return env_for(model="sim", loadtest_sim=self.to_json())

    @classmethod
    def from_settings(cls, settings: Settings) -> SimSettings:
        raw = settings.loadtest_sim
        if raw is None:
            raise ConfigError(f"{SIM_VAR} is not set: the sim family needs it")
        try:
            body = json.loads(raw)
            return cls(
                weight=float(body["weight"]),
                elements=int(body["elements"]),
                compute_s={int(k): float(v) for k, v in body.get("compute_s", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{SIM_VAR}: {exc!r}") from None


def initial_state(elements: int, seed: int) -> dict[str, torch.Tensor]:
    """θ_0: float32 tensors of `elements` values in all, seeded."""
    gen = torch.Generator().manual_seed(seed)
    # Two tensors, as a model has several: the aggregator maps chunks to tensors by name.
    head = min(1024, max(1, elements // 8))
    return {
        "body.weight": torch.randn(elements - head, generator=gen, dtype=torch.float32),
        "head.bias": torch.zeros(head, dtype=torch.float32),
    }


class SimBackend:
    def __init__(self, settings: TrainerSettings, sim: SimSettings) -> None:
        self.participant = settings.participant
        self.seed = settings.seed
        self.sim = sim
        # Touch the model and the generator once now, so that the first round's compute
        # time is not spent warming up (the real families, too, build before "ready").
        self._delta(load_delta(settings.initial_model), 0)

    def evaluate(self, theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {}  # a simulated model has no loss

    def train(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: StopCheck
    ) -> RoundResult:
        started = time.monotonic()
        planned = self.sim.compute_s.get(step)
        if planned is None:
            raise ConfigError(f"{SIM_VAR}: no compute time for step {step}")
        delta = self._delta(theta, step)
        deadline = started + planned
        while (remaining := deadline - time.monotonic()) > 0:
            if should_stop():
                raise TrainingInterrupted("stop requested during the simulated round")
            time.sleep(min(remaining, _STOP_POLL_S))
        metrics = {
            # Run seconds; the load-test report multiplies them by the time scale.
            "compute_s": time.monotonic() - started,
            "planned_compute_s": planned,
            "overrun_s": max(0.0, -remaining),
        }
        return RoundResult(delta=delta, weight=self.sim.weight, metrics=metrics)

    def _delta(self, theta: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "sim", self.participant, step))
        return {
            name: (torch.randn(t.shape, generator=gen, dtype=torch.float32) * _DELTA_SCALE).to(
                t.dtype
            )
            for name, t in sorted(theta.items())
        }


class SimFamily:
    def settings_from(self, settings: Settings) -> SimSettings:
        return SimSettings.from_settings(settings)

    def make_backend(self, settings: TrainerSettings) -> SimBackend:
        sim = settings.family_settings
        if not isinstance(sim, SimSettings):
            raise TypeError(f"sim: family_settings must be SimSettings, got {sim!r}")
        return SimBackend(settings, sim)

    def write_initial_model(self, path: Path, settings: Settings, seed: int) -> bytes:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_delta(path, initial_state(SimSettings.from_settings(settings).elements, seed))
        return file_digest(path)

    def demo_env(self, participants: tuple[str, ...], sample_dir: Path) -> dict[str, str]:
        raise ConfigError("the sim family is for load tests (foldfed loadtest), not the demo")


def family(name: str) -> SimFamily:
    return SimFamily()

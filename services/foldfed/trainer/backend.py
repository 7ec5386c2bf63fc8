"""The model-family boundary: what the trainer gives a model family, what it asks of it, and
which families exist.

The trainer process (trainer/service.py) knows nothing of any model. It reads its settings
(`TrainerSettings`, here because they are what a family is built from), asks the
registry (trainer/families.py) for the family `FOLDFED_MODEL` names, and from then on only
calls the family's `Backend`:
`evaluate(θ)` for the model report and `train(θ, step, should_stop)` for one round, whose
`localround.RoundResult` (Δ, weight, metrics) it writes through the spool.

Which families exist is trainer/families.py's business (the registry); this module
imports no family: families import it.

Seeding: a backend's randomness is a function of (FOLDFED_SEED, participant index, step)
alone (`localround.derive_seed`), so a round trained again after a crash writes the same
bytes; the round result, the seeds and torch's deterministic mode live in localround.py,
below both the trainer and the model libraries its families wrap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, get_args, runtime_checkable

from foldfed.config import spool_dir_of
from foldfed.errors import ConfigError
from foldfed.localround import RoundResult, StopCheck
from foldfed.settings import Settings, default, load, required, variable
from foldfed.settings.registry import LocalOptimizer

if TYPE_CHECKING:
    import torch

MODEL_VAR = variable("model")
DEFAULT_MODEL: str = default("model")
# FOLDFED_OPTIMIZER: the local optimizer of the families that let it be chosen (mlp).
Optimizer = LocalOptimizer
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)


# ---------------------------------------------------------------- what a family does


class Backend(Protocol):
    """A model family's side of the trainer: metrics of θ, and one round of training.

    Both are blocking (the trainer calls them in a worker thread) and deterministic: the
    same θ, step and settings give the same result, in any process."""

    def evaluate(self, theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Aggregate metrics of θ on this site's data (only aggregates leave the site)."""
        ...

    def train(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: StopCheck
    ) -> RoundResult:
        """One round from θ_t; raises localround.TrainingInterrupted once `should_stop`."""
        ...


@runtime_checkable
class ReleaseEvaluation(Protocol):
    """A backend that evaluates some releases more deeply than others (the federated
    evaluation of docs/federated_evaluation.md): the trainer then asks it, not `evaluate`,
    for the model report's metrics, telling it which release θ is."""

    def evaluate_release(
        self, theta: Mapping[str, torch.Tensor], step: int, final: bool
    ) -> dict[str, float]:
        """Aggregate metrics of release `step` (`final`: the cycle's last model)."""
        ...


def report_metrics(
    backend: Backend, theta: Mapping[str, torch.Tensor], step: int, final: bool
) -> dict[str, float]:
    """The model report's metrics of release `step`, from whichever hook the backend has."""
    if isinstance(backend, ReleaseEvaluation):
        return backend.evaluate_release(theta, step, final)
    return backend.evaluate(theta)


class Family(Protocol):
    """What the trainer, `foldfed initial-model` and `foldfed demo` need of a family."""

    def settings_from(self, settings: Settings) -> Any:
        """The family's own settings, validated (ConfigError naming the variable); stored
        in TrainerSettings.family_settings and handed back to `make_backend`."""
        ...

    def make_backend(self, settings: TrainerSettings) -> Backend:
        """The backend of one trainer process (builds the model, loads the site's data)."""
        ...

    def write_initial_model(self, path: Path, settings: Settings, seed: int) -> bytes:
        """θ_0 at `path`, canonically (every party computes the same bytes); its digest."""
        ...

    def demo_env(self, participants: tuple[str, ...], sample_dir: Path) -> dict[str, str]:
        """Settings of a short CPU demo run of this family (settings.env_for), its data
        prepared if needed."""
        ...


# ---------------------------------------------------------------- the trainer's settings


@dataclass(frozen=True)
class TrainerSettings:
    participant: str
    participant_index: int
    n_participants: int
    spool_dir: Path
    initial_model: Path
    local_steps: int = 10
    grad_accum: int = 8
    micro_batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    optimizer: Optimizer = "adamw"
    # Samples of the demo task drawn for this participant (one in five held out).
    samples: int = 2048
    poll_s: float = 0.2
    # FOLDFED_MODEL: a name in FAMILIES; the family's own settings (FOLDFED_OF3_*, ...),
    # as its `settings_from` returned them.
    model: str = DEFAULT_MODEL
    family_settings: Any = None

    @classmethod
    def common_from_env(cls, env: Mapping[str, str] = os.environ) -> TrainerSettings:
        return cls.common_from_settings(load(env))

    @classmethod
    def common_from_settings(cls, s: Settings) -> TrainerSettings:
        """Every setting but the family's own (`family_settings` stays None): the registry
        adds those (families.trainer_settings_from_env), as only it knows the families."""
        participant = required(s.participant, "participant")
        participants = required(s.participants, "participants")
        return cls(
            participant=participant,
            participant_index=_participant_index(s, participant, participants),
            n_participants=len(participants),
            spool_dir=spool_dir_of(s, participant),
            initial_model=required(s.initial_model, "initial_model"),
            local_steps=s.local_steps,
            grad_accum=s.grad_accum,
            micro_batch=s.micro_batch,
            lr=s.lr,
            seed=s.seed,
            optimizer=s.optimizer,
            samples=s.samples,
            poll_s=s.poll_s,
            model=s.model,
        )


def _participant_index(s: Settings, participant: str, names: tuple[str, ...]) -> int:
    # The participant's place in the sorted list, unless pinned explicitly (a deployment
    # may keep a site's data shard when the list changes). Two variables meet here, so
    # the check is here, not in the registry.
    if participant not in names:
        raise ConfigError(
            f"{variable('participants')} does not name {variable('participant')}={participant}"
        )
    index = names.index(participant) if s.participant_index is None else s.participant_index
    if index >= len(names):
        raise ConfigError(
            f"{variable('participant_index')}={index} must be < {len(names)}"
            f" ({variable('participants')})"
        )
    return index

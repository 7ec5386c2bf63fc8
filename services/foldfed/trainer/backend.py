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
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from foldfed.config import _float, _get, _int, _participants
from foldfed.errors import ConfigError
from foldfed.localround import RoundResult, StopCheck
from foldfed.topology import is_valid_participant_id

if TYPE_CHECKING:
    import torch

MODEL_VAR = "FOLDFED_MODEL"
DEFAULT_MODEL = "mlp"
# FOLDFED_OPTIMIZER: the local optimizer of the families that let it be chosen (mlp).
Optimizer = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[Optimizer, ...] = ("adamw", "sgd")


def model_of(env: Mapping[str, str]) -> str:
    """The family the environment names (`mlp` when unset)."""
    return env.get(MODEL_VAR) or DEFAULT_MODEL


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


class Family(Protocol):
    """What the trainer, `foldfed initial-model` and `foldfed demo` need of a family."""

    def settings_from_env(self, env: Mapping[str, str]) -> Any:
        """The family's own settings, validated (ConfigError naming the variable); stored
        in TrainerSettings.family_settings and handed back to `make_backend`."""
        ...

    def make_backend(self, settings: TrainerSettings) -> Backend:
        """The backend of one trainer process (builds the model, loads the site's data)."""
        ...

    def write_initial_model(self, path: Path, env: Mapping[str, str], seed: int) -> bytes:
        """θ_0 at `path`, canonically (every party computes the same bytes); its digest."""
        ...

    def demo_env(self, participants: tuple[str, ...], sample_dir: Path) -> dict[str, str]:
        """Settings of a short CPU demo run of this family, its data prepared if needed."""
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
    # as its `settings_from_env` returned them.
    model: str = DEFAULT_MODEL
    family_settings: Any = None

    @classmethod
    def common_from_env(cls, env: Mapping[str, str] = os.environ) -> TrainerSettings:
        """Every setting but the family's own (`family_settings` stays None): the registry
        adds those (families.trainer_settings_from_env), as only it knows the families."""
        participant = _get(env, "FOLDFED_PARTICIPANT")
        if not is_valid_participant_id(participant):
            raise ConfigError(f"FOLDFED_PARTICIPANT: {participant!r} is not a valid id")
        participants = _participants(env, "FOLDFED_PARTICIPANTS")
        model = model_of(env)
        return cls(
            participant=participant,
            participant_index=_participant_index(env, participant, participants),
            n_participants=len(participants),
            spool_dir=Path(_get(env, "FOLDFED_SPOOL_DIR", f"var/spool/{participant}")),
            initial_model=Path(_get(env, "FOLDFED_INITIAL_MODEL")),
            local_steps=_int(env, "FOLDFED_LOCAL_STEPS", 10, 1),
            grad_accum=_int(env, "FOLDFED_GRAD_ACCUM", 8, 1),
            micro_batch=_int(env, "FOLDFED_MICRO_BATCH", 32, 1),
            lr=_positive(env, "FOLDFED_LR", 1e-3),
            seed=_int(env, "FOLDFED_SEED", 0, 0),
            optimizer=_optimizer(env),
            samples=_int(env, "FOLDFED_SAMPLES", 2048, 5),
            poll_s=_positive(env, "FOLDFED_POLL_S", 0.2),
            model=model,
        )


def _participant_index(env: Mapping[str, str], participant: str, names: tuple[str, ...]) -> int:
    # The participant's place in the sorted list, unless pinned explicitly (a deployment
    # may keep a site's data shard when the list changes).
    if participant not in names:
        raise ConfigError(f"FOLDFED_PARTICIPANTS does not name FOLDFED_PARTICIPANT={participant}")
    index = _int(env, "FOLDFED_PARTICIPANT_INDEX", names.index(participant), 0)
    if index >= len(names):
        raise ConfigError(
            f"FOLDFED_PARTICIPANT_INDEX={index} must be < {len(names)} (FOLDFED_PARTICIPANTS)"
        )
    return index


def _positive(env: Mapping[str, str], key: str, default: float) -> float:
    value = _float(env, key, default, 0.0)
    if value == 0.0:
        raise ConfigError(f"{key} must be > 0")
    return value


def _optimizer(env: Mapping[str, str]) -> Optimizer:
    value = env.get("FOLDFED_OPTIMIZER") or "adamw"
    if value not in OPTIMIZERS:
        raise ConfigError(f"FOLDFED_OPTIMIZER={value!r} must be one of {', '.join(OPTIMIZERS)}")
    return cast(Optimizer, value)

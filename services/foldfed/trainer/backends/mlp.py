"""The `mlp` family: the demo's small CPU task (trainer/task.py), trained by one round of
local training (trainer/local.py). Its settings are the trainer's own (FOLDFED_LOCAL_STEPS,
FOLDFED_GRAD_ACCUM, FOLDFED_MICRO_BATCH, FOLDFED_LR, FOLDFED_OPTIMIZER, FOLDFED_SAMPLES)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from foldfed.localround import RoundResult, StopCheck
from foldfed.settings import Settings
from foldfed.trainer import task
from foldfed.trainer.backend import TrainerSettings
from foldfed.trainer.local import LocalConfig, Split, evaluate_state, train_round


def local_config(settings: TrainerSettings) -> LocalConfig:
    """The round's shape and optimizer, from the trainer's settings."""
    return LocalConfig(
        local_steps=settings.local_steps,
        grad_accum=settings.grad_accum,
        micro_batch=settings.micro_batch,
        lr=settings.lr,
        optimizer=settings.optimizer,
    )


class MlpBackend:
    """A small MLP; each participant sees its own region of input space (trainer.task)."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.config = local_config(settings)
        self.model = task.make_model(settings.seed)
        train, heldout = task.participant_dataset(
            settings.participant_index, settings.n_participants, settings.seed, settings.samples
        )
        self.train_split = train
        self.evals: dict[str, Split] = {
            "eval_loss": heldout,
            "global_eval_loss": task.global_testset(settings.n_participants, settings.seed),
        }

    def evaluate(self, theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return evaluate_state(self.model, theta, self.evals)

    def train(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: StopCheck
    ) -> RoundResult:
        s = self.settings
        return train_round(
            self.model,
            theta,
            self.train_split,
            self.evals,
            self.config,
            seed=s.seed,
            participant_index=s.participant_index,
            step=step,
            should_stop=should_stop,
        )


class MlpFamily:
    def settings_from(self, settings: Settings) -> None:
        return None  # everything it needs is in TrainerSettings

    def make_backend(self, settings: TrainerSettings) -> MlpBackend:
        return MlpBackend(settings)

    def write_initial_model(self, path: Path, settings: Settings, seed: int) -> bytes:
        return task.initial_model(path, seed)

    def demo_env(self, participants: tuple[str, ...], sample_dir: Path) -> dict[str, str]:
        return {}


def family(name: str) -> MlpFamily:
    return MlpFamily()

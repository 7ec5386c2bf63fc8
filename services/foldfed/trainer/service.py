"""The trainer process: releases in, model reports and deltas out, all through the spool.

It never touches the network. For each release t, in step order:

1. build θ_t: θ_0 (the initial model file) for the first release, else the committed
   θ_{t-1} plus the release's update; snapshot it canonically, its digest is the model
   digest, and commit it (model/current.json);
2. compare that digest with the one the release announced; a mismatch is logged loudly
   and still reported: the hub, which sees every participant's digest, decides;
3. write the model report (digest + θ_t's losses) to the outbox;
4. train one round from θ_t and write Δ_t and its description to the outbox.

Restart-safe without a journal: each stage looks in the spool first (model already
committed at t, report or delta already written) and skips what is done. A round cut short
produces nothing and is trained again; it is deterministic, so the bytes are the same.

Blocking work (torch, hashing, disk) runs in worker threads: the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import structlog
import torch

from foldfed import tracing
from foldfed.config import _float, _get, _int, _participants
from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import short
from foldfed.errors import ConfigError, StoreError
from foldfed.spool import CurrentModel, Release, Spool
from foldfed.topology import is_valid_participant_id
from foldfed.trainer import task
from foldfed.trainer.local import (
    OPTIMIZERS,
    LocalConfig,
    Optimizer,
    RoundResult,
    Split,
    TrainingInterrupted,
    apply_update,
    evaluate_state,
    file_digest,
    train_round,
)

if TYPE_CHECKING:
    from foldfed.of3.backend import Of3Settings
    from foldfed.of3.training import DistContext, Of3RoundResult

log = structlog.get_logger(__name__)
State = dict[str, torch.Tensor]


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
    # FOLDFED_MODEL: "mlp" (the demo task) or an OpenFold3 size ("openfold3-tiny", ...),
    # whose own settings (FOLDFED_OF3_*) are in `of3`.
    model: str = "mlp"
    of3: Of3Settings | None = None

    @property
    def local(self) -> LocalConfig:
        return LocalConfig(
            local_steps=self.local_steps,
            grad_accum=self.grad_accum,
            micro_batch=self.micro_batch,
            lr=self.lr,
            optimizer=self.optimizer,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TrainerSettings:
        participant = _get(env, "FOLDFED_PARTICIPANT")
        if not is_valid_participant_id(participant):
            raise ConfigError(f"FOLDFED_PARTICIPANT: {participant!r} is not a valid id")
        participants = _participants(env, "FOLDFED_PARTICIPANTS")
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
            model=env.get("FOLDFED_MODEL") or "mlp",
            of3=_of3_settings(env),
        )


def _of3_settings(env: Mapping[str, str]) -> Of3Settings | None:
    model = env.get("FOLDFED_MODEL") or "mlp"
    if model == "mlp":
        return None
    from foldfed.of3.backend import Of3Settings

    return Of3Settings.from_env(env)


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


class Backend(Protocol):
    """What a model family gives the Trainer: metrics of θ, and one round of training."""

    def evaluate(self, theta: Mapping[str, torch.Tensor]) -> dict[str, float]: ...

    def train(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: Callable[[], bool]
    ) -> RoundResult | Of3RoundResult: ...


class MlpBackend:
    """The synthetic demo task (trainer.task): a small MLP, per-site regions of input space."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
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
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: Callable[[], bool]
    ) -> RoundResult:
        s = self.settings
        return train_round(
            self.model,
            theta,
            self.train_split,
            self.evals,
            s.local,
            seed=s.seed,
            participant_index=s.participant_index,
            step=step,
            should_stop=should_stop,
        )


def make_backend(settings: TrainerSettings, dist: DistContext | None = None) -> Backend:
    """The backend FOLDFED_MODEL names; OpenFold3 joins the DDP job torchrun started, if any."""
    if settings.of3 is None:
        return MlpBackend(settings)
    from foldfed.of3.backend import Of3Backend
    from foldfed.of3.ddp import init_from_env

    return Of3Backend(
        settings.of3,
        participant=settings.participant,
        participant_index=settings.participant_index,
        seed=settings.seed,
        local_steps=settings.local_steps,
        grad_accum=settings.grad_accum,
        dist=dist if dist is not None else init_from_env(),
    )


class Trainer:
    """The blocking half of the trainer: one method per stage, each idempotent."""

    def __init__(self, settings: TrainerSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.backend = make_backend(settings)

    # The demo task's parts, for callers that train it directly (tests compare a lone
    # participant with the federation).
    @property
    def _mlp(self) -> MlpBackend:
        if not isinstance(self.backend, MlpBackend):
            raise AttributeError("only the mlp model has a bare model, train and evals")
        return self.backend

    @property
    def model(self) -> torch.nn.Module:
        return self._mlp.model

    @property
    def train(self) -> Split:
        return self._mlp.train_split

    @property
    def evals(self) -> dict[str, Split]:
        return self._mlp.evals

    def resume_after(self) -> int:
        """The step after which to look for releases: the committed one is looked at again,
        since its report or delta may be missing."""
        current = self.spool.current_model()
        return -1 if current is None else current.step - 1

    def build_model(self, release: Release) -> tuple[State, CurrentModel]:
        """θ_t for `release`, committed to the spool (or read back if it already was)."""
        current = self.spool.current_model()
        if current is not None and current.step == release.step:
            self.spool.drop_update(release.step)  # in case a crash came between the two
            return load_delta(current.path), current
        base = self._base_for(release, current)
        if release.update_path is not None:
            base = _apply(base, release.step, release.update_path)
        snapshot = self.spool.snapshot_path(release.step)
        write_delta(snapshot, base)
        committed = self.spool.commit_model(release.step, file_digest(snapshot))
        # The update's effect now lives in the snapshot; updates are model-sized.
        self.spool.drop_update(release.step)
        return base, committed

    def _base_for(self, release: Release, current: CurrentModel | None) -> State:
        if current is None:
            if release.update_path is not None:
                raise StoreError(
                    f"release {release.step} carries an update but there is no model to apply "
                    "it to: the first release a trainer sees must carry none"
                )
            return load_delta(self.settings.initial_model)
        if current.step != release.step - 1:
            raise StoreError(
                f"release {release.step} does not follow the current model (step "
                f"{current.step}): a release is missing from the spool"
            )
        return load_delta(current.path)

    def report_model(self, step: int, theta: State, model: CurrentModel) -> None:
        if self.spool.has_model_report(step):
            return
        metrics = self.backend.evaluate(theta)
        self.spool.write_model_report(step, model.model_digest, metrics)
        log.info("model reported", **metrics)

    def train_delta(
        self, step: int, theta: State, model: CurrentModel, stop: asyncio.Event
    ) -> None:
        if self.spool.has_delta(step):
            return
        # Reading an asyncio.Event's flag from a worker thread is a plain bool read.
        result = self.backend.train(theta, step, stop.is_set)
        write_delta(self.spool.delta_path(step), result.delta)
        self.spool.write_delta(
            step, self.spool.delta_path(step), result.weight, model.model_digest, result.metrics
        )
        log.info("delta written", weight=result.weight, **result.metrics)


def _apply(base: State, step: int, update_path: Path) -> State:
    try:
        update = load_delta(update_path)
    except FileNotFoundError:
        raise StoreError(f"release {step}: update {update_path.name} is missing") from None
    return apply_update(base, update)


async def run_trainer(settings: TrainerSettings, stop: asyncio.Event) -> None:
    """Serve releases from the spool until `stop` is set."""
    # Files the trainer writes carry the context of the span around the stage writing them.
    spool = await asyncio.to_thread(Spool, settings.spool_dir, tracing.carrier)
    if not settings.initial_model.is_file():
        raise ConfigError(f"FOLDFED_INITIAL_MODEL: {settings.initial_model} is not a file")
    trainer = await asyncio.to_thread(Trainer, settings, spool)
    after = await asyncio.to_thread(trainer.resume_after)
    log.info("trainer ready", participant=settings.participant, resume_after=after)
    while not stop.is_set():
        release = await asyncio.to_thread(spool.next_release, after)
        if release is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.poll_s)
            continue
        with structlog.contextvars.bound_contextvars(step=release.step):
            if not await _serve(trainer, release, stop):
                return
        after = release.step


async def _serve(trainer: Trainer, release: Release, stop: asyncio.Event) -> bool:
    """Handle one release; False when `stop` cut it short.

    Spans: "apply" (θ_t = θ_{t-1} + U_{t-1}, in step t-1's trace) or "load" (the first
    release), then "evaluate" and "train" under the release's context (the uploader's span
    that received it); the model report and the delta carry their span's context on."""
    log.info("release", has_update=release.update_path is not None)
    if release.update_path is not None:
        building = tracing.span(
            "apply", parent=release.update_trace or release.trace, step=release.step - 1
        )
    else:
        building = tracing.span("load", parent=release.trace, step=release.step)
    with building:
        theta, model = await asyncio.to_thread(trainer.build_model, release)
    if model.model_digest != release.model_digest:
        log.error(
            "model digest mismatch",
            expected=release.model_digest.hex(),
            actual=model.model_digest.hex(),
        )
    else:
        log.info("model ready", digest=short(model.model_digest))
    with tracing.span("evaluate", parent=release.trace, step=release.step):
        await asyncio.to_thread(trainer.report_model, release.step, theta, model)
    if release.final:
        log.info("cycle over: final model reported, no more training")
        return True
    settings = trainer.settings
    try:
        with tracing.span(
            "train",
            parent=release.trace,
            step=release.step,
            k=settings.local_steps,
            grad_accum=settings.grad_accum,
        ):
            await asyncio.to_thread(trainer.train_delta, release.step, theta, model, stop)
    except TrainingInterrupted:
        log.info("stopped during local training; the round will be trained again")
        return False
    return True

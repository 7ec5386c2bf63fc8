"""The trainer process: releases in, model reports and deltas out, all through the spool.

It never touches the network. For each release t, in step order:

1. build θ_t: θ_0 (the initial model file) for the first release, else the committed
   θ_{t-1} plus the release's update; snapshot it canonically, its digest is the model
   digest, and commit it (model/current.json);
2. compare that digest with the one the release announced; a mismatch is logged loudly
   and still reported: the hub, which sees every participant's digest, decides;
3. write the model report (digest + θ_t's aggregate metrics; on every k-th release and
   the final one, the federated evaluation against θ₀: docs/federated_evaluation.md) to the
   outbox;
4. train one round from θ_t and write Δ_t and its description to the outbox.

The model is the family's business (trainer/backend.py): this loop calls its backend's
`evaluate` and `train` and nothing else, whichever family FOLDFED_MODEL names.

Restart-safe without a journal: each stage looks in the spool first (model already
committed at t, report or delta already written) and skips what is done. A round cut short
produces nothing and is trained again; it is deterministic, so the bytes are the same.

Blocking work (torch, hashing, disk) runs in worker threads: the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
import torch

from foldfed import tracing
from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import file_digest, short
from foldfed.errors import ConfigError, StoreError
from foldfed.localround import TrainingInterrupted
from foldfed.spool import CurrentModel, Release, Spool
from foldfed.trainer.backend import TrainerSettings, report_metrics
from foldfed.trainer.families import make_backend
from foldfed.trainer.local import apply_update

log = structlog.get_logger(__name__)
State = dict[str, torch.Tensor]


class Trainer:
    """The blocking half of the trainer: one method per stage, each idempotent."""

    def __init__(self, settings: TrainerSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.backend = make_backend(settings)

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

    def report_model(
        self, step: int, theta: State, model: CurrentModel, final: bool = False
    ) -> None:
        if self.spool.has_model_report(step):
            return
        metrics = report_metrics(self.backend, theta, step, final)
        self.spool.write_model_report(step, model.model_digest, metrics)
        log.info("model reported", **metrics)

    def train_delta(
        self,
        step: int,
        theta: State,
        model: CurrentModel,
        stop: asyncio.Event,
        agreed_weight: float | None = None,
    ) -> None:
        """Train Δ_step; it counts with `agreed_weight` (the cycle's, from the release) if
        the cycle agreed one, else with the samples it used."""
        if self.spool.has_delta(step):
            return
        # Reading an asyncio.Event's flag from a worker thread is a plain bool read.
        result = self.backend.train(theta, step, stop.is_set)
        weight = result.weight if agreed_weight is None else agreed_weight
        write_delta(self.spool.delta_path(step), result.delta)
        self.spool.write_delta(
            step, self.spool.delta_path(step), weight, model.model_digest, result.metrics
        )
        log.info("delta written", weight=weight, samples=result.weight, **result.metrics)


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
        await asyncio.to_thread(trainer.report_model, release.step, theta, model, release.final)
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
            await asyncio.to_thread(
                trainer.train_delta, release.step, theta, model, stop, release.weight
            )
    except TrainingInterrupted:
        log.info("stopped during local training; the round will be trained again")
        return False
    return True

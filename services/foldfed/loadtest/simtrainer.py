"""The simulated trainer (`foldfed sim-trainer`): the real trainer's spool protocol with the
training replaced by a sleep of the scenario's compute time.

Per release t, exactly as `trainer.service`: build θ_t (θ_0, or θ_{t-1} plus the release's
update, one float32 addition per element), write it canonically and commit it, report its
digest, then — instead of training — wait until c_t / S seconds after the release was
seen (c_t: the participant's seeded compute draw, S: the time scale) and publish Δ_t.

Δ_t names exactly θ's tensors, with values drawn from a generator seeded by (seed,
participant, step): the same scenario gives the same bytes in every run, so final model
digests of a disturbed and an undisturbed run are comparable. Δ_t is prepared (and written
under a dot-name the uploader ignores) while the compute time runs, so disk work does not
add to the participant's step time; at the deadline it is renamed into place.

Restart-safe like the real trainer: a committed model, a written report or delta is not
redone. Settings: FOLDFED_PARTICIPANT, FOLDFED_SPOOL_DIR, FOLDFED_INITIAL_MODEL,
FOLDFED_LOADTEST_SIM (JSON: seed, time_scale, weight, compute), FOLDFED_POLL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3
import structlog

from foldfed.config import _float, _get
from foldfed.errors import ConfigError, StoreError
from foldfed.loadtest.distributions import compute_seconds
from foldfed.loadtest.scenario import Compute, ScenarioError, parse_compute
from foldfed.spool import CurrentModel, Release, Spool
from foldfed.topology import is_valid_participant_id

log = structlog.get_logger(__name__)
SIM_ENV = "FOLDFED_LOADTEST_SIM"


@dataclass(frozen=True)
class SimSettings:
    participant: str
    spool_dir: Path
    initial_model: Path
    seed: int
    time_scale: float
    weight: float
    compute: Compute
    poll_s: float = 0.01

    def sim_json(self) -> str:
        return sim_json(self.seed, self.time_scale, self.weight, self.compute)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SimSettings:
        participant = _get(env, "FOLDFED_PARTICIPANT")
        if not is_valid_participant_id(participant):
            raise ConfigError(f"FOLDFED_PARTICIPANT: {participant!r} is not a valid id")
        try:
            raw = json.loads(_get(env, SIM_ENV))
            compute = parse_compute(raw["compute"], f"{SIM_ENV}.compute")
            seed, scale, weight = int(raw["seed"]), float(raw["time_scale"]), float(raw["weight"])
        except (ValueError, KeyError, TypeError, ScenarioError) as exc:
            raise ConfigError(f"{SIM_ENV}: {exc}") from None
        if not (scale >= 1.0 and weight > 0):
            raise ConfigError(f"{SIM_ENV}: time_scale must be >= 1 and weight > 0")
        return cls(
            participant=participant,
            spool_dir=Path(_get(env, "FOLDFED_SPOOL_DIR")),
            initial_model=Path(_get(env, "FOLDFED_INITIAL_MODEL")),
            seed=seed,
            time_scale=scale,
            weight=weight,
            compute=compute,
            poll_s=_float(env, "FOLDFED_POLL_S", 0.01, 0.001),
        )


def sim_json(seed: int, time_scale: float, weight: float, compute: Compute) -> str:
    return json.dumps(
        {"seed": seed, "time_scale": time_scale, "weight": weight, "compute": asdict(compute)}
    )


def delta_seed(seed: int, participant: str, step: int) -> int:
    digest = blake3.blake3(f"foldfed-loadtest-delta:{seed}:{participant}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SimTrainer:
    """The blocking half: one method per stage, each idempotent (like trainer.Trainer)."""

    def __init__(self, settings: SimSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool

    def warm_up(self) -> None:
        import torch

        from foldfed.deltafile import load_delta

        theta = load_delta(self.settings.initial_model)
        gen = torch.Generator().manual_seed(0)
        for t in theta.values():
            torch.randn(t.shape, generator=gen, dtype=torch.float32)

    def resume_after(self) -> int:
        current = self.spool.current_model()
        return -1 if current is None else current.step - 1

    def build_model(self, release: Release) -> CurrentModel:
        from foldfed.deltafile import load_delta, write_delta
        from foldfed.trainer.local import apply_update, file_digest

        current = self.spool.current_model()
        if current is not None and current.step == release.step:
            self.spool.drop_update(release.step)
            return current
        if current is None:
            if release.update_path is not None:
                raise StoreError(
                    f"release {release.step} carries an update but there is no model to apply "
                    "it to: the first release a trainer sees must carry none"
                )
            base = load_delta(self.settings.initial_model)
        elif current.step != release.step - 1:
            raise StoreError(
                f"release {release.step} does not follow the current model (step {current.step})"
            )
        else:
            base = load_delta(current.path)
        if release.update_path is not None:
            base = apply_update(base, load_delta(release.update_path))
        snapshot = self.spool.snapshot_path(release.step)
        write_delta(snapshot, base)
        committed = self.spool.commit_model(release.step, file_digest(snapshot))
        self.spool.drop_update(release.step)
        return committed

    def report_model(self, step: int, model: CurrentModel) -> None:
        if not self.spool.has_model_report(step):
            self.spool.write_model_report(step, model.model_digest, {})

    def compute_s(self, step: int) -> float:
        """This step's compute time in run seconds (the real draw divided by S)."""
        s = self.settings
        return compute_seconds(s.compute, s.seed, s.participant, step) / s.time_scale

    def prepare_delta(self, step: int, model: CurrentModel) -> Path:
        """Write Δ_step's tensors under a dot-name (ignored by the uploader)."""
        import torch

        from foldfed.deltafile import load_delta, write_delta

        theta = load_delta(model.path)
        gen = torch.Generator().manual_seed(
            delta_seed(self.settings.seed, self.settings.participant, step)
        )
        delta = {
            name: (torch.randn(t.shape, generator=gen, dtype=torch.float32) * 1e-3).to(t.dtype)
            for name, t in sorted(theta.items())
        }
        tmp = self.spool.outbox / f".sim-delta-{step:012d}.safetensors"
        write_delta(tmp, delta)
        return tmp

    def publish_delta(
        self, step: int, tmp: Path, model: CurrentModel, metrics: dict[str, float]
    ) -> None:
        self.spool.write_delta(step, tmp, self.settings.weight, model.model_digest, metrics)


async def run_sim_trainer(settings: SimSettings, stop: asyncio.Event) -> None:
    spool = await asyncio.to_thread(Spool, settings.spool_dir)
    if not settings.initial_model.is_file():
        raise ConfigError(f"FOLDFED_INITIAL_MODEL: {settings.initial_model} is not a file")
    trainer = SimTrainer(settings, spool)
    # Load torch and touch the model once now, so the first step's compute time is not
    # spent importing (the real trainer, too, builds its model before it is ready).
    await asyncio.to_thread(trainer.warm_up)
    after = await asyncio.to_thread(trainer.resume_after)
    log.info("sim trainer ready", participant=settings.participant, resume_after=after)
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


async def _serve(trainer: SimTrainer, release: Release, stop: asyncio.Event) -> bool:
    seen = time.monotonic()
    model = await asyncio.to_thread(trainer.build_model, release)
    if model.model_digest != release.model_digest:
        log.error(
            "model digest mismatch",
            expected=release.model_digest.hex(),
            actual=model.model_digest.hex(),
        )
    await asyncio.to_thread(trainer.report_model, release.step, model)
    if release.final or trainer.spool.has_delta(release.step):
        return True
    planned = trainer.compute_s(release.step)
    tmp = await asyncio.to_thread(trainer.prepare_delta, release.step, model)
    remaining = seen + planned - time.monotonic()
    if remaining > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), remaining)
    if stop.is_set():
        return False
    metrics = {
        # Run seconds; the report multiplies by the time scale.
        "compute_s": time.monotonic() - seen,
        "planned_compute_s": planned,
        "overrun_s": max(0.0, -remaining),
    }
    await asyncio.to_thread(trainer.publish_delta, release.step, tmp, model, metrics)
    log.info("delta written", planned_s=round(planned, 4), overrun_s=metrics["overrun_s"])
    return True


def write_initial_model(path: Path, elements: int, seed: int) -> None:
    """θ_0 for a scenario: float32 tensors of `elements` values in all (canonical file)."""
    import torch

    from foldfed.deltafile import write_delta

    gen = torch.Generator().manual_seed(seed)
    # Two tensors, as a model has several: the aggregator maps chunks to tensors by name.
    head = min(1024, max(1, elements // 8))
    tensors = {
        "body.weight": torch.randn(elements - head, generator=gen, dtype=torch.float32),
        "head.bias": torch.zeros(head, dtype=torch.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_delta(path, tensors)

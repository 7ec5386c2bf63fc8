"""OpenFold3 as a model backend: θ in, metrics or (Δ, weight, metrics) out.

The trainer runs it as the `openfold3-tiny` and `openfold3-full` families
(trainer/backends/openfold3.py); nothing here imports the trainer.

Settings: `FOLDFED_MODEL` (`openfold3-tiny` or `openfold3-full`) and the `FOLDFED_OF3_*`
variables, declared (type, default, doc) in the settings registry, foldfed/settings;
`Of3Settings.from_settings` adds the checks the registry cannot make (the checkpoint is a
file, the overrides are a JSON object of config paths, the finetune mode's prefixes).

Evaluation (`FOLDFED_OF3_EVAL`): `heldout` scores the site's held-out split (`eval_*`
metrics); `global` scores every site's held-out entries of the shared sample instead
(`global_eval_*`: demos and benchmarks on a public sample); `both` does both; `none`
reports no metrics. Federated evaluation (`FOLDFED_EVAL_EVERY`, of3/release_eval.py): every
k-th release and the final one are scored on the site's held-out split beside θ₀ and the
site's local-only model (`FOLDFED_EVAL_LOCAL_MODEL`, if any), with the PoseBusters-valid
rate of the predicted poses (of3/pose_check.py); those reports carry `eval_*`,
`eval_pb_*`, `theta0_eval_*` and `local_eval_*`.

What is federated: the raw trainable weights (θ, Δ, updates hold exactly the trainable
parameters; see finetune.py). OpenFold3's EMA is a local evaluation smoothing; here a round
rebuilds the optimizer at θ_t and lasts K steps, so an EMA inside a round would sit at θ_t
(decay 0.999 over 10 steps) and one across rounds would be state outside θ that a restart
would have to persist. Evaluation therefore scores θ_t itself, the model every site holds
and whose digest the hub checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from foldfed.errors import ConfigError
from foldfed.of3.finetune import FinetuneMode, apply_mode
from foldfed.of3.presets import model_config, parse_overrides, size_of_model
from foldfed.settings import Settings, load, variable
from foldfed.settings.registry import Of3Eval

if TYPE_CHECKING:
    import torch

    from foldfed.localround import RoundResult, StopCheck
    from foldfed.of3.data.sample import SampleEntry
    from foldfed.of3.release_eval import ReleaseEvaluator
    from foldfed.of3.training import DistContext

State = dict[str, "torch.Tensor"]
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Of3Settings:
    model: str
    sample_dir: Path | None  # required to train; not to build θ_0
    finetune: FinetuneMode = field(default_factory=FinetuneMode)
    checkpoint: Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 1.8e-3
    warmup_steps: int = 1000
    eval_mode: Of3Eval = "heldout"
    company: str | None = None
    eval_every: int = 10  # federated evaluation: every k-th release (0: off)
    eval_local_model: Path | None = None  # this site's local-only model, a baseline

    @property
    def size(self) -> str:
        return size_of_model(self.model)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Of3Settings:
        return cls.from_settings(load(env))

    @classmethod
    def from_settings(cls, s: Settings) -> Of3Settings:
        size_of_model(s.model)  # validates
        checkpoint = s.of3_checkpoint
        if checkpoint is not None and not checkpoint.is_file():
            raise ConfigError(f"{variable('of3_checkpoint')}: {checkpoint} is not a file")
        local_model = s.eval_local_model
        if local_model is not None and not local_model.is_file():
            raise ConfigError(f"{variable('eval_local_model')}: {local_model} is not a file")
        return cls(
            model=s.model,
            sample_dir=s.of3_sample,
            finetune=FinetuneMode.parse(s.of3_finetune),
            checkpoint=checkpoint,
            overrides=parse_overrides(s.of3_overrides or ""),
            lr=s.of3_lr,
            warmup_steps=s.of3_warmup,
            eval_mode=s.of3_eval,
            company=s.of3_company,
            eval_every=s.eval_every,
            eval_local_model=local_model,
        )


@dataclass
class Of3Model:
    """The model with its frozen part in place, the trainable names and the loss."""

    model: torch.nn.Module
    trainable: list[str]
    loss_fn: torch.nn.Module
    confidence_only: bool


def build(settings: Of3Settings, seed: int) -> Of3Model:
    """OpenFold3 from the preset, seeded, then the checkpoint (if any), then the mode."""
    _quiet_warnings()  # before openfold3's first import, which warns about Triton
    from openfold3.core.loss.loss_module import OpenFold3Loss

    from foldfed.of3.checkpoint import load_into, read_checkpoint
    from foldfed.of3.presets import build_model

    mode = settings.finetune
    cfg = model_config(settings.size, settings.overrides, confidence_only=mode.confidence_only)
    model = build_model(cfg, seed)
    if settings.checkpoint is not None:
        load_into(model, read_checkpoint(settings.checkpoint), str(settings.checkpoint))
    trainable = apply_mode(model, mode)
    return Of3Model(
        model, trainable, OpenFold3Loss(cfg.architecture.loss_module), mode.confidence_only
    )


def initial_state(settings: Of3Settings, seed: int) -> State:
    """θ_0: the trainable parameters of the built model (seeded preset or checkpoint)."""
    from foldfed.of3.training import trainable_state

    built = build(settings, seed)
    return trainable_state(built.model, built.trainable)


def write_initial_model(path: Path, settings: Of3Settings, seed: int) -> bytes:
    """Write θ_0 canonically (deltafile.write_delta); returns its model digest."""
    from foldfed.deltafile import write_delta
    from foldfed.digests import file_digest

    write_delta(path, initial_state(settings, seed))
    return file_digest(path)


class Of3Backend:
    """What the Trainer calls for OpenFold3. In a DDP job, rank 0's backend leads: before
    each round it sends (step, θ_t) to the other ranks, which run `follow()`."""

    def __init__(
        self,
        settings: Of3Settings,
        *,
        participant: str,
        participant_index: int,
        seed: int,
        local_steps: int,
        grad_accum: int,
        dist: DistContext | None = None,
        initial_model: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """`initial_model` (θ₀'s file) turns on the federated evaluation of releases;
        `cache_dir` keeps its baselines' metrics across restarts."""
        from foldfed.of3.data.features import load_batch
        from foldfed.of3.data.sample import open_sample
        from foldfed.of3.training import BatchCache, DistContext, Of3TrainConfig

        self.settings = settings
        self.participant_index = participant_index
        self.seed = seed
        self.dist = dist or DistContext()
        self.config = Of3TrainConfig(
            local_steps=local_steps,
            grad_accum=grad_accum,
            lr=settings.lr,
            warmup_steps=settings.warmup_steps,
        )
        if settings.sample_dir is None:
            raise ConfigError("FOLDFED_OF3_SAMPLE is not set: the trainer needs its data")
        _quiet_warnings()
        self.built = build(settings, seed)
        # One GPU per rank when there are GPUs (LOCAL_RANK under torchrun), else the CPU.
        if self.dist.device != "cpu":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic GEMMs
            self.built.model.to(self.dist.device)
        sample = open_sample(settings.sample_dir)
        company = settings.company or participant
        self.train_set: list[Path] = [e.features for e in sample.of(company, "train")]
        heldout = sample.of(company, "heldout")
        self.heldout: list[Path] = [e.features for e in heldout]
        self.ligands: dict[Path, str] = {e.features: e.ligand for e in heldout}
        self.global_heldout: list[Path] = [e.features for e in sample.heldout()]
        if not self.train_set:
            raise ConfigError(f"FOLDFED_OF3_SAMPLE: no training structures for {company}")
        self.load = BatchCache(load_batch)
        self.release_eval = self._release_evaluator(initial_model, cache_dir, company, heldout)

    def _release_evaluator(
        self,
        initial_model: Path | None,
        cache_dir: Path | None,
        company: str,
        heldout: Sequence[SampleEntry],
    ) -> ReleaseEvaluator | None:
        from foldfed.of3.release_eval import (
            LOCAL_PREFIX,
            THETA0_PREFIX,
            Baseline,
            BaselineCache,
            ReleaseEvaluator,
            file_key,
            load_model_file,
        )

        s = self.settings
        if s.eval_every == 0 or initial_model is None:
            return None
        if not self.heldout:
            log.warning("release evaluation off: no held-out structures", company=company)
            return None
        baselines = [Baseline(THETA0_PREFIX, initial_model)]
        if s.eval_local_model is not None:
            baselines.append(Baseline(LOCAL_PREFIX, s.eval_local_model))
        else:
            log.info("release evaluation: no local-only model (FOLDFED_EVAL_LOCAL_MODEL)")
        settings = [s.model, repr(sorted(s.overrides.items())), str(s.finetune), str(self.seed)]
        identity = "|".join([*settings, *sorted(p.name for p in self.heldout)])
        cache = BaselineCache(None if cache_dir is None else cache_dir / "release-eval.json")
        return ReleaseEvaluator(
            self._score_release,
            baselines,
            cache,
            identity=identity,
            load_model=load_model_file,
            model_key=file_key,
            state_key=lambda state: tensors_digest(state, self.trainable),
            private_names=[e.entry_id for e in heldout] + [p.name for p in self.heldout],
        )

    @property
    def trainable(self) -> Sequence[str]:
        return self.built.trainable

    def evaluate_release(
        self, theta: Mapping[str, torch.Tensor], step: int, final: bool
    ) -> dict[str, float]:
        """The model report's metrics of release `step`: `evaluate`'s, and on a due release
        the federated evaluation (which then scores the held-out split itself)."""
        from foldfed.of3.release_eval import is_due

        if self.release_eval is None or not is_due(step, self.settings.eval_every, final):
            return self.evaluate(theta)
        out = self.evaluate(theta, heldout=False)
        out.update(self.release_eval.evaluate(theta))
        return out

    def _score_release(self, theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """θ on the held-out split with the PoseBusters verdicts of its predicted poses."""
        from foldfed.of3.pose_check import PoseTally, judge_pose
        from foldfed.of3.training import evaluate, load_trainable

        tally = PoseTally()

        def judge(entry: Path, outputs: Mapping[str, Any]) -> None:
            predicted = outputs["atom_positions_predicted"]
            first = predicted.reshape(-1, predicted.shape[-2], 3)[0]
            verdict = judge_pose(self.load(entry), first, self.ligands.get(entry, ""))
            if not verdict.valid:
                log.debug("pose not valid", reason=verdict.reason)  # stays in the local log
            tally.add(verdict)

        load_trainable(self.built.model, self.trainable, theta)
        out = evaluate(
            self.built.model,
            self.built.loss_fn,
            self.heldout,
            self.load,
            seed=self.seed,
            prefix="eval",
            confidence_only=self.built.confidence_only,
            on_fold=judge,
        )
        out.update({f"eval_{k}": v for k, v in tally.summary().items()})
        return out

    def evaluate(
        self, theta: Mapping[str, torch.Tensor], *, heldout: bool = True
    ) -> dict[str, float]:
        """Aggregate metrics of θ on this site's held-out split (rank 0 alone); `heldout`
        False leaves that split to the release evaluation."""
        from foldfed.of3.training import evaluate, load_trainable

        mode = self.settings.eval_mode
        sets = {}
        if heldout and mode in ("heldout", "both"):
            sets["eval"] = self.heldout
        if mode in ("global", "both"):
            sets["global_eval"] = self.global_heldout
        load_trainable(self.built.model, self.trainable, theta)
        out: dict[str, float] = {}
        for prefix, entries in sets.items():
            if entries:
                out.update(
                    evaluate(
                        self.built.model,
                        self.built.loss_fn,
                        entries,
                        self.load,
                        seed=self.seed,
                        prefix=prefix,
                        confidence_only=self.built.confidence_only,
                    )
                )
        return out

    def train(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: StopCheck | None
    ) -> RoundResult:
        from foldfed.of3 import ddp

        if self.dist.world_size > 1:
            ddp.send_round(self.dist, step, theta, self.trainable)
            should_stop = ddp.agreed_stop(self.dist, should_stop)
        return self._round(theta, step, should_stop)

    def _round(
        self, theta: Mapping[str, torch.Tensor], step: int, should_stop: StopCheck | None
    ) -> RoundResult:
        from foldfed.of3.training import train_round

        result = train_round(
            self.built.model,
            self.built.loss_fn,
            self.trainable,
            theta,
            self.train_set,
            self.load,
            self.config,
            seed=self.seed,
            participant_index=self.participant_index,
            step=step,
            confidence_only=self.built.confidence_only,
            dist=self.dist,
            should_stop=should_stop,
        )
        if self.dist.world_size > 1:
            # Every rank must end on the same θ: each says which Δ it computed.
            log.info(
                "round trained",
                rank=self.dist.rank,
                round_step=step,
                delta_digest=tensors_digest(result.delta, self.trainable),
            )
        return result

    def follow(self) -> None:
        """Ranks > 0: train the rounds rank 0 sends until it says stop."""
        from foldfed.localround import TrainingInterrupted
        from foldfed.of3 import ddp

        params = dict(self.built.model.named_parameters())
        shapes = {name: params[name].shape for name in self.trainable}
        while (job := ddp.receive_round(self.dist, shapes)) is not None:
            step, theta = job
            try:
                self._round(theta, step, ddp.agreed_stop(self.dist, None))
            except TrainingInterrupted:
                continue  # rank 0 stopped mid-round; its next word is stop


def _quiet_warnings() -> None:
    """OpenFold3 on a CPU warns on every forward (autocast dtypes, no Triton): noise that
    would bury the trainer's own log lines."""
    import warnings

    warnings.filterwarnings("ignore", message=r"(?s).*CPU [Aa]utocast")
    warnings.filterwarnings("ignore", message="Triton is not available")


def tensors_digest(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> str:
    """blake3 (hex) of the tensors' bytes in `names` order: equal iff bitwise equal."""
    import blake3

    hasher = blake3.blake3()
    for name in names:
        hasher.update(tensors[name].detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()

"""One round of local training: from θ_t, K optimizer steps, then Δ = θ_local - θ_t.

Pure torch, no I/O but a scratch file for digests. The round is a function of its inputs
alone — θ_t, the data, the config and the seeds (base seed, participant index, step) — so
a trainer that crashed mid-round trains the same round again and writes the same bytes.
That is what makes the trainer idempotent without journaling its progress.

Optimizer state does not survive a round: each round builds a fresh optimizer at θ_t.
Keeping Adam's moments across rounds (common in FL) would make Δ_t depend on every earlier
round, hence on state that a restart must persist and restore exactly; a fresh optimizer
keeps the trainer stateless between releases and the delta reproducible from the spool
alone. The cost is that Adam's first steps of each round are large (bias-corrected moments
of one gradient, about lr per coordinate): a lower lr, or SGD, tempers that.

Determinism: indices come from a private generator seeded per round (no global RNG);
training runs under `localround.deterministic_torch` (deterministic algorithms, one
intra-op thread), shared with every model family.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from foldfed.deltafile import write_delta
from foldfed.digests import file_digest
from foldfed.errors import CodecError
from foldfed.localround import (
    RoundResult,
    StopCheck,
    TrainingInterrupted,
    derive_seed,
    deterministic_torch,
)
from foldfed.trainer.backend import OPTIMIZERS, Optimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_EVAL_BATCH = 4096


@dataclass(frozen=True)
class Split:
    """Inputs and targets, row i of `x` going with row i of `y`."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows, y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class LocalConfig:
    local_steps: int = 10
    grad_accum: int = 8
    micro_batch: int = 32
    # Suits the demo task (trainer.task): with the optimizer rebuilt every round, 1e-2
    # made the federated held-out loss wander; 1e-3 falls steadily (0.16 -> 0.096 in 8
    # rounds, against 0.21 for one participant alone). Set per model.
    lr: float = 1e-3
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("local_steps", "grad_accum", "micro_batch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def samples_per_round(self) -> int:
        """The delta's weight: every micro-batch sample of the round, repeats included."""
        return self.local_steps * self.grad_accum * self.micro_batch


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state, on the CPU."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def train_round(
    model: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    train: Split,
    evals: Mapping[str, Split],
    config: LocalConfig,
    *,
    seed: int,
    participant_index: int,
    step: int,
    loss_fn: LossFn = F.mse_loss,
    should_stop: StopCheck | None = None,
) -> RoundResult:
    """Train `model` from `base` (θ_t) for one round; metrics name each split of `evals`.

    Metrics: train_loss (mean micro-batch loss of the round), one loss per `evals` entry
    at θ_local, and compute_s (seconds of training, evaluation excluded).
    """
    _check_float32(base, "base")
    generator = torch.Generator().manual_seed(derive_seed(seed, "round", participant_index, step))
    with deterministic_torch(config.threads):
        started = time.perf_counter()
        model.load_state_dict(base, strict=True)
        losses = _run_steps(model, train, config, generator, loss_fn, should_stop)
        local = state_of(model)
        compute_s = time.perf_counter() - started
        metrics = {"train_loss": math.fsum(losses) / len(losses)}
        metrics.update({name: evaluate(model, split, loss_fn) for name, split in evals.items()})
    metrics["compute_s"] = compute_s
    delta = {name: local[name] - base[name] for name in base}
    return RoundResult(delta=delta, weight=config.samples_per_round, metrics=metrics)


def _run_steps(
    model: torch.nn.Module,
    train: Split,
    config: LocalConfig,
    generator: torch.Generator,
    loss_fn: LossFn,
    should_stop: StopCheck | None,
) -> list[float]:
    optimizer = _make_optimizer(model, config)
    batches = _batch_indices(len(train), config, generator)
    losses: list[float] = []
    model.train()
    for step_batches in batches:
        if should_stop is not None and should_stop():
            raise TrainingInterrupted("stop requested during local training")
        optimizer.zero_grad(set_to_none=True)
        for idx in step_batches:
            loss = loss_fn(model(train.x[idx]), train.y[idx])
            # Dividing by G makes the accumulated gradient that of one G-times larger batch.
            (loss / config.grad_accum).backward()
            losses.append(loss.item())
        optimizer.step()
    return losses


def _make_optimizer(model: torch.nn.Module, config: LocalConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    # foreach=False: one kernel per tensor, the plainest (and reproducible) code path.
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)


def _batch_indices(n: int, config: LocalConfig, generator: torch.Generator) -> torch.Tensor:
    """(K, G, micro_batch) sample indices: epochs of shuffled data, as many as needed."""
    if n < 1:
        raise ValueError("cannot train on an empty split")
    need = config.samples_per_round
    epochs = [torch.randperm(n, generator=generator) for _ in range(-(-need // n))]
    flat = torch.cat(epochs)[:need]
    return flat.view(config.local_steps, config.grad_accum, config.micro_batch)


def evaluate(model: torch.nn.Module, split: Split, loss_fn: LossFn = F.mse_loss) -> float:
    """Mean loss of `model` over `split` (`loss_fn` must average over its batch)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for begin in range(0, len(split), _EVAL_BATCH):
            x, y = split.x[begin : begin + _EVAL_BATCH], split.y[begin : begin + _EVAL_BATCH]
            total += loss_fn(model(x), y).item() * len(x)
    return total / max(len(split), 1)


def evaluate_state(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    evals: Mapping[str, Split],
    loss_fn: LossFn = F.mse_loss,
) -> dict[str, float]:
    """The loss of `state` on each split of `evals`, by name."""
    with deterministic_torch(1):
        model.load_state_dict(state, strict=True)
        return {name: evaluate(model, split, loss_fn) for name, split in evals.items()}


# --- model arithmetic and digests --------------------------------------------------------


def apply_update(
    state: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ + U, tensor by tensor, in float32: one IEEE addition per element, nothing fused,
    so the hub's numpy `theta + update` on float32 arrays gives the same bits."""
    _check_float32(state, "model")
    _check_float32(update, "update")
    if set(state) != set(update):
        missing, extra = sorted(set(state) - set(update)), sorted(set(update) - set(state))
        raise CodecError(f"update does not match the model: missing {missing}, extra {extra}")
    out: dict[str, torch.Tensor] = {}
    for name, theta in state.items():
        if update[name].shape != theta.shape:
            raise CodecError(
                f"update {name!r}: shape {tuple(update[name].shape)} != {tuple(theta.shape)}"
            )
        out[name] = theta + update[name]
    return out


def _check_float32(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise CodecError(f"{what} {name!r}: dtype {tensor.dtype}, expected float32")


def model_digest(state: Mapping[str, torch.Tensor], scratch_dir: Path | None = None) -> bytes:
    """The model's id: blake3 of the canonical bytes `deltafile.write_delta` writes for it
    (no metadata). Goes through a scratch file so it is those bytes by construction."""
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="foldfed-digest-") as tmp:
        path = Path(tmp) / "model.safetensors"
        write_delta(path, state)
        return file_digest(path)

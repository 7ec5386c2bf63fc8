"""One OpenFold3 round and the local evaluation: pure torch, no network, no spool.

The recipe is OpenFold3's own (`OpenFold3AllAtom.configure_optimizers` and the
`settings` section of its model config):

- Adam, lr 1.8e-3, betas (0.9, 0.95), eps 1e-8;
- AlphaFoldLRScheduler: linear warm-up from 0 over 1,000 optimizer steps, plateau, then
  x0.95 every 50,000 steps after step 50,000. The step count is the federation's: local
  step k of global step t is optimizer step (t-1)·K + k, so the schedule runs on across
  rounds although each round builds a fresh optimizer (see trainer/local.py for why);
- per-sample gradient clipping at norm 10 (OpenFold3's PerSampleGradManager): each
  micro-batch's gradient is clipped, then the G of them are averaged;
- gradient accumulation over G micro-batches of one structure each, K optimizer steps per
  global step.

Determinism: every micro-batch reseeds torch, `random` and numpy from (seed, participant,
step, local step, micro-batch) inside `fork_rng`, so its diffusion noise, augmentation and
dropout do not depend on which process (DDP rank) runs it or on what ran before;
`num_recycles` is 0 (presets.py); deterministic algorithms and one thread inside the same
lock as trainer/local.py (localround.deterministic_torch).

DDP: micro-batch g of each optimizer step runs on rank g mod W; the clipped gradients are
summed over ranks with one all-reduce per optimizer step, then every rank takes the same
Adam step from the same θ, so every rank ends with the same θ. That is OpenFold3's manual
DDP path (per-sample clipping forbids DDP's automatic sync). Only rank 0 writes anything.

A loss guard: OpenFold3 silently zeroes every loss weight when it cannot align the ground
truth (permutation alignment), and a batch whose ground truth is malformed then trains on a
loss of 0. Every micro-batch and every evaluated structure must keep each loss term that its
weights switch on; a missing term raises LossGuardError naming the structure.

One concept, OpenFold3's training recipe on one site, in one module of over 400 lines: the
round and the local evaluation share its batches, seeding, loss modes and loss guard, so
they stay together; the trainer backend around it is of3/backend.py.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foldfed.errors import FoldfedError
from foldfed.localround import (
    RoundResult,
    StopCheck,
    TrainingInterrupted,
    derive_seed,
    deterministic_torch,
)
from foldfed.of3 import metrics as structure

Batch = dict[str, Any]
BatchLoader = Callable[[Path], Batch]
# Sees one held-out structure's eval-mode fold: (its feature file, the model's outputs).
FoldHook = Callable[[Path, Mapping[str, Any]], None]

# Loss terms by the group OpenFold3 computes them in (loss_module.py).
CONFIDENCE_TERMS = ("plddt", "pde", "experimentally_resolved", "pae")
DIFFUSION_TERMS = ("mse", "bond", "smooth_lddt")
DISTOGRAM_TERMS = ("distogram",)


class LossGuardError(FoldfedError):
    """A loss term that should be active is not (OpenFold3 zeroed it): refuse to train."""


@dataclass(frozen=True)
class Of3TrainConfig:
    local_steps: int = 10
    grad_accum: int = 8
    lr: float = 1.8e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 1000
    decay_after: int = 50_000
    decay_every: int = 50_000
    decay_factor: float = 0.95
    clip_norm: float = 10.0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("local_steps", "grad_accum", "threads", "decay_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.decay_after:
            raise ValueError("warmup_steps must be in [0, decay_after]")
        if not self.lr > 0 or not self.clip_norm > 0:
            raise ValueError("lr and clip_norm must be > 0")

    @property
    def samples_per_round(self) -> int:
        """The delta's weight: structures seen in the round, repeats included."""
        return self.local_steps * self.grad_accum

    def lr_at(self, optimizer_step: int) -> float:
        """AlphaFoldLRScheduler's lr for the optimizer step numbered `optimizer_step` (0-based,
        counted over the whole federation), with base_lr 0."""
        n = optimizer_step
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.lr * n / self.warmup_steps
        if n > self.decay_after:
            return self.lr * self.decay_factor ** ((n - self.decay_after) // self.decay_every + 1)
        return self.lr


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a DDP job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    # The rank's device: its model and the tensors of its collectives (cuda:LOCAL_RANK
    # when there are GPUs, for nccl; else the CPU, for gloo).
    device: str = "cpu"

    def runs(self, micro_batch: int) -> bool:
        return micro_batch % self.world_size == self.rank

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


# --- the federated state: trainable parameters only ----------------------------------------


def trainable_state(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainable parameters: what θ, Δ and updates are made of."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


def load_trainable(
    model: torch.nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor]
) -> None:
    """Copy θ (trainable tensors only, exactly `names`) into the model."""
    if set(state) != set(names):
        missing = sorted(set(names) - set(state))[:3]
        extra = sorted(set(state) - set(names))[:3]
        raise FoldfedError(
            f"model file does not match the trainable parameters: missing {missing}, "
            f"extra {extra} (same FOLDFED_MODEL, FOLDFED_OF3_FINETUNE and overrides "
            "on every site?)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if tuple(state[name].shape) != tuple(params[name].shape):
                raise FoldfedError(
                    f"{name}: shape {list(state[name].shape)} != {list(params[name].shape)}"
                )
            params[name].copy_(state[name])


# --- batches -------------------------------------------------------------------------------


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors on `device` (nested dicts and lists followed)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def fresh(batch: Any) -> Any:
    """A copy the model may edit: OpenFold3 edits nested dicts (ground truth, loss weights)
    in place, so every dict is new and every tensor cloned."""
    if isinstance(batch, dict):
        return {k: fresh(v) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, list):
        return [fresh(v) for v in batch]
    return batch


class BatchCache:
    """Loads each structure's features once per process; hands out fresh copies."""

    def __init__(self, load: BatchLoader) -> None:
        self._load = load
        self._cache: dict[Path, Batch] = {}

    def __call__(self, path: Path) -> Batch:
        if path not in self._cache:
            self._cache[path] = self._load(path)
        return fresh(self._cache[path])


def active_terms(batch: Batch, confidence_only: bool) -> set[str]:
    """The loss terms a batch's weights switch on (before the model could zero them)."""
    weights = batch.get("loss_weights")
    if not isinstance(weights, dict):
        raise LossGuardError("batch has no loss_weights: not a training batch")
    groups = (
        CONFIDENCE_TERMS
        if confidence_only
        else (CONFIDENCE_TERMS + DIFFUSION_TERMS + DISTOGRAM_TERMS)
    )
    return {
        name
        for name in groups
        if name in weights and bool(torch.as_tensor(weights[name]).ne(0).any())
    }


def check_terms(expected: set[str], breakdown: Mapping[str, Any], where: str) -> None:
    """Every term the batch switched on is in the breakdown, and every value is finite
    (OpenFold3 falls back to a naive alignment that can yield NaN instead of failing)."""
    if not expected:
        raise LossGuardError(f"{where}: no loss term is switched on")
    missing = sorted(t for t in expected if f"{t}_loss" not in breakdown)
    if missing:
        raise LossGuardError(
            f"{where}: loss terms {missing} were switched on by the batch but OpenFold3 "
            "dropped them (ground truth it could not align?)"
        )
    bad = sorted(k for k, v in breakdown.items() if not math.isfinite(_scalar(v)))
    if bad:
        raise LossGuardError(f"{where}: non-finite loss terms {bad} (malformed ground truth?)")


@contextmanager
def seeded(*parts: int | str) -> Any:
    """torch, random and numpy global RNGs seeded from `parts`, restored afterwards."""
    seed = derive_seed(*parts)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).detach().double().mean())


# --- training --------------------------------------------------------------------------------


def train_round(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    trainable: Sequence[str],
    base: Mapping[str, torch.Tensor],
    train: Sequence[Path],
    load: BatchLoader,
    config: Of3TrainConfig,
    *,
    seed: int,
    participant_index: int,
    step: int,
    confidence_only: bool = False,
    dist: DistContext | None = None,
    should_stop: StopCheck | None = None,
) -> RoundResult:
    """K optimizer steps of G micro-batches from θ_t = `base`; Δ over `trainable`."""
    dist = dist or DistContext()
    if not train:
        raise ValueError("cannot train on an empty split")
    order = _sample_order(
        len(train), config, derive_seed(seed, "of3-round", participant_index, step)
    )
    params = dict(model.named_parameters())
    chosen = [params[n] for n in trainable]
    device = chosen[0].device
    with deterministic_torch(config.threads):
        started = time.perf_counter()
        load_trainable(model, trainable, base)
        optimizer = torch.optim.Adam(
            chosen,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            foreach=False,
        )
        model.train()
        totals: dict[str, float] = {}
        for k in range(config.local_steps):
            if should_stop is not None and should_stop():
                raise TrainingInterrupted("stop requested during local training")
            acc = [torch.zeros_like(p) for p in chosen]
            # Per-term sums of this step's micro-batches (on this rank), reduced below.
            step_losses: dict[str, float] = {}
            for g in range(config.grad_accum):
                if not dist.runs(g):
                    continue
                entry = train[int(order[k, g])]
                batch = to_device(load(entry), device)
                expected = active_terms(batch, confidence_only)
                with seeded(seed, "of3-micro", participant_index, step, k, g):
                    batch, outputs = model(batch)
                    loss, breakdown = loss_fn(batch, outputs, _return_breakdown=True)
                check_terms(expected, breakdown, f"{entry.name} (step {step}, local {k})")
                for p in chosen:
                    p.grad = None
                loss.backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chosen]
                scale = clip_scale(grads, config.clip_norm)
                for a, grad in zip(acc, grads, strict=True):
                    a.add_(grad, alpha=scale)
                for name, value in breakdown.items():
                    step_losses[name] = step_losses.get(name, 0.0) + _scalar(value)
            _reduce_step(dist, acc, step_losses, totals)
            for p, a in zip(chosen, acc, strict=True):
                p.grad = a.div_(config.grad_accum)
            lr = config.lr_at((step - 1) * config.local_steps + k)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        for p in chosen:
            p.grad = None
        local = trainable_state(model, trainable)
        compute_s = time.perf_counter() - started
    n = config.samples_per_round
    metrics = {f"train_{name}": value / n for name, value in sorted(totals.items())}
    metrics["train_loss"] = totals.get("loss", 0.0) / n
    metrics["compute_s"] = compute_s
    delta = {name: local[name] - base[name] for name in trainable}
    return RoundResult(delta=delta, weight=n, metrics=metrics)


def clip_scale(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """The factor that brings the gradients' global L2 norm down to `max_norm` (1.0 when it
    is below): OpenFold3's per-sample clipping, applied to one micro-batch's gradient."""
    total = math.sqrt(math.fsum(float(g.double().pow(2).sum()) for g in grads))
    return max_norm / max(total, max_norm)


def _reduce_step(
    dist: DistContext,
    acc: list[torch.Tensor],
    step_losses: dict[str, float],
    totals: dict[str, float],
) -> None:
    """Sum gradients and loss terms over ranks (every rank sees the same names: the loss
    guard made every micro-batch carry the same terms)."""
    names = sorted(step_losses)
    if dist.world_size > 1:
        import torch.distributed as tdist

        # Ranks may see different term sets if batches differ: agree on the union first.
        gathered: list[list[str]] = [[] for _ in range(dist.world_size)]
        tdist.all_gather_object(gathered, names)
        names = sorted({n for part in gathered for n in part})
        values = torch.tensor(
            [step_losses.get(n, 0.0) for n in names], dtype=torch.float64, device=dist.device
        )
        dist.all_reduce_([*acc, values])
        step_losses = dict(zip(names, values.cpu().tolist(), strict=True))
    for name in names:
        totals[name] = totals.get(name, 0.0) + step_losses[name]


def _sample_order(n: int, config: Of3TrainConfig, seed: int) -> torch.Tensor:
    """(K, G) structure indices: shuffled epochs of the training list, as many as needed."""
    generator = torch.Generator().manual_seed(seed)
    need = config.samples_per_round
    epochs = [torch.randperm(n, generator=generator) for _ in range(-(-need // n))]
    return torch.cat(epochs)[:need].view(config.local_steps, config.grad_accum)


# --- evaluation ------------------------------------------------------------------------------


@contextmanager
def _loss_mode(model: torch.nn.Module) -> Any:
    """Training-mode forward (so OpenFold3 computes its diffusion losses) with dropout off."""
    from openfold3.core.model.primitives.dropout import Dropout

    model.train()
    for module in model.modules():
        if isinstance(module, Dropout | torch.nn.Dropout):
            module.eval()
    try:
        yield
    finally:
        model.eval()


def evaluate(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    entries: Sequence[Path],
    load: BatchLoader,
    *,
    seed: int,
    prefix: str = "eval",
    confidence_only: bool = False,
    threads: int = 1,
    on_fold: FoldHook | None = None,
    fold: bool = True,
) -> dict[str, float]:
    """Aggregate held-out metrics of the model as it is loaded (never per structure):

    - `<prefix>_loss` and `<prefix>_<term>_loss`: OpenFold3's loss and its breakdown, from a
      training-mode forward without dropout or gradients, with a fixed seed per structure
      (the same noise at every global step, so steps compare like for like);
    - `<prefix>_lddt_mean`, `<prefix>_ligand_rmsd_mean`, `<prefix>_ligand_rmsd_success`
      (fraction under 2 Å) and their counts: from an eval-mode forward (full diffusion
      rollout, first sample) against the ground truth after OpenFold3's permutation alignment;
      `fold=False` skips this rollout (the loss alone, for curves over many steps).

    `on_fold(entry, outputs)`, if given, sees each eval-mode fold (of3/release_eval.py judges
    its pose); what it keeps is its business, and it must keep aggregates only. With
    `fold=False` there is no fold, so it is not called.
    """
    terms: dict[str, list[float]] = {}
    found: dict[str, list[float]] = {"lddt": [], "ligand_rmsd": []}
    device = next(model.parameters()).device
    with deterministic_torch(threads), torch.no_grad():
        for index, entry in enumerate(entries):
            batch = to_device(load(entry), device)
            expected = active_terms(batch, confidence_only)
            with _loss_mode(model), seeded(seed, "of3-eval-loss", entry.name):
                batch, outputs = model(batch)
                _, breakdown = loss_fn(batch, outputs, _return_breakdown=True)
            check_terms(expected, breakdown, f"held-out {entry.name}")
            for name, value in breakdown.items():
                terms.setdefault(name, []).append(_scalar(value))
            if not fold:
                continue
            model.eval()
            with seeded(seed, "of3-eval-fold", entry.name):
                batch, outputs = model(to_device(load(entry), device))
            for name, value in structure_scores(batch, outputs).items():
                found[name].append(value)
            if on_fold is not None:
                on_fold(entry, outputs)
            del index
    out = {f"{prefix}_{name}": math.fsum(values) / len(values) for name, values in terms.items()}
    out.update({f"{prefix}_{k}": v for k, v in structure.summarize(found).items()})
    return out


def structure_scores(batch: Batch, outputs: Mapping[str, Any]) -> dict[str, float]:
    """LDDT and pocket-aligned ligand RMSD of the first predicted sample of structure 0."""
    from openfold3.core.utils.atomize_utils import broadcast_token_feat_to_atoms

    pred = outputs["atom_positions_predicted"]
    gt = batch["ground_truth"]
    true = gt["atom_positions"]
    resolved = gt["atom_resolved_mask"]
    # After forward: batch features carry a sample dimension of 1 ([bs, 1, ...]).
    token_mask = batch["token_mask"]
    per_token = batch["num_atoms_per_token"]
    is_protein = broadcast_token_feat_to_atoms(token_mask, per_token, batch["is_protein"])
    is_ligand = broadcast_token_feat_to_atoms(token_mask, per_token, batch["is_ligand"])
    p = pred.reshape(-1, pred.shape[-2], 3)[0].cpu()
    t = true.reshape(-1, true.shape[-2], 3)[0].cpu()
    r = resolved.reshape(-1, resolved.shape[-1])[0].bool().cpu()
    prot = is_protein.reshape(-1, is_protein.shape[-1])[0].bool().cpu()
    lig = is_ligand.reshape(-1, is_ligand.shape[-1])[0].bool().cpu()
    out: dict[str, float] = {}
    score = structure.lddt(p, t, r)
    if score is not None:
        out["lddt"] = score
    rms = structure.ligand_rmsd(p, t, r, prot, lig)
    if rms is not None:
        out["ligand_rmsd"] = rms
    return out

"""OpenFold3 rounds on the real sample (tiny model): deterministic, Δ over exactly the
trainable parameters, every loss term alive, bad ground truth refused, metrics aggregate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foldfed.deltafile import load_delta
from foldfed.of3.backend import Of3Settings, build, write_initial_model
from foldfed.of3.data.features import load_batch
from foldfed.of3.data.sample import open_sample
from foldfed.of3.finetune import CONFIDENCE_MODULES, FinetuneMode
from foldfed.of3.testing import prepared_sample
from foldfed.of3.training import (
    BatchCache,
    LossGuardError,
    Of3TrainConfig,
    evaluate,
    load_trainable,
    train_round,
    trainable_state,
)

pytestmark = pytest.mark.slow

CONFIG = Of3TrainConfig(local_steps=2, grad_accum=2, lr=1e-3, warmup_steps=0)
DIFFUSION_ON = {"mse_loss", "smooth_lddt_loss", "distogram_loss"}
CONFIDENCE_ON = {"plddt_loss", "pde_loss", "pae_loss", "experimentally_resolved_loss"}


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    return prepared_sample()


@pytest.fixture(scope="module")
def train_files(sample_dir: Path) -> list[Path]:
    return [e.features for e in open_sample(sample_dir).of("company-a", "train")]


@pytest.fixture(scope="module")
def heldout_files(sample_dir: Path) -> list[Path]:
    return [e.features for e in open_sample(sample_dir).heldout()]


def _settings(sample_dir: Path, finetune: str = "all") -> Of3Settings:
    return Of3Settings(
        model="openfold3-tiny",
        sample_dir=sample_dir,
        finetune=FinetuneMode.parse(finetune),
        lr=CONFIG.lr,
        warmup_steps=0,
    )


def _round(settings: Of3Settings, files: list[Path], step: int = 1, load=None):
    built = build(settings, seed=5)
    theta = trainable_state(built.model, built.trainable)
    result = train_round(
        built.model,
        built.loss_fn,
        built.trainable,
        theta,
        files,
        load or BatchCache(load_batch),
        CONFIG,
        seed=5,
        participant_index=0,
        step=step,
        confidence_only=built.confidence_only,
    )
    return built, theta, result


def test_a_round_is_deterministic_and_trains_every_loss_term(
    sample_dir: Path, train_files: list[Path]
) -> None:
    settings = _settings(sample_dir)
    built, _, first = _round(settings, train_files)
    _, _, again = _round(settings, train_files)
    assert list(first.delta) == built.trainable
    assert all(torch.equal(first.delta[n], again.delta[n]) for n in first.delta)
    assert first.metrics == {**again.metrics, "compute_s": first.metrics["compute_s"]}
    assert first.weight == CONFIG.local_steps * CONFIG.grad_accum
    assert first.metrics["train_loss"] > 0
    for term in DIFFUSION_ON | CONFIDENCE_ON:
        assert first.metrics[f"train_{term}"] > 0, term
    # The model moved, and a different step draws other examples and noise.
    assert any(d.abs().max() > 0 for d in first.delta.values())
    _, _, other = _round(settings, train_files, step=2)
    assert any(not torch.equal(first.delta[n], other.delta[n]) for n in first.delta)


def test_confidence_mode_trains_only_the_confidence_heads(
    sample_dir: Path, train_files: list[Path]
) -> None:
    built, _, result = _round(_settings(sample_dir, "confidence"), train_files)
    assert set(result.delta) == set(built.trainable)
    assert all(n.startswith(CONFIDENCE_MODULES) for n in result.delta)
    n_trainable = sum(p.numel() for n, p in built.model.named_parameters() if n in result.delta)
    assert n_trainable < sum(p.numel() for p in built.model.parameters()) / 2
    # train_confidence_only: the diffusion and distogram losses are not computed at all.
    assert not any(f"train_{t}" in result.metrics for t in DIFFUSION_ON)
    for term in CONFIDENCE_ON:
        assert result.metrics[f"train_{term}"] > 0, term
    assert any(d.abs().max() > 0 for d in result.delta.values())


def _nothing_resolved(batch: dict) -> None:
    gt = batch["ground_truth"]
    gt["atom_resolved_mask"] = torch.zeros_like(gt["atom_resolved_mask"])


def _no_coordinates(batch: dict) -> None:
    del batch["ground_truth"]["atom_positions"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_nothing_resolved, "non-finite"), (_no_coordinates, "dropped them")],
    ids=["nothing-resolved", "no-coordinates"],
)
def test_malformed_ground_truth_is_refused_not_trained_at_zero_loss(
    sample_dir: Path, train_files: list[Path], damage, reason: str
) -> None:
    # OpenFold3 either falls back to a naive alignment (non-finite terms) or zeroes every
    # loss weight (a loss of 0 that trains nothing): both must stop the round.
    def broken(path: Path) -> dict:
        batch = load_batch(path)
        damage(batch)
        return batch

    with pytest.raises(LossGuardError, match=reason):
        _round(_settings(sample_dir), train_files, load=broken)


def test_evaluation_reports_aggregates_only(
    sample_dir: Path, train_files: list[Path], heldout_files: list[Path]
) -> None:
    settings = _settings(sample_dir)
    built, theta, result = _round(settings, train_files)
    load = BatchCache(load_batch)
    load_trainable(built.model, built.trainable, theta)  # the round left θ_local in it
    before = evaluate(built.model, built.loss_fn, heldout_files, load, seed=5)
    again = evaluate(built.model, built.loss_fn, heldout_files, load, seed=5)
    assert before == again
    assert before["eval_loss"] > 0
    assert 0.0 <= before["eval_lddt_mean"] <= 1.0
    assert before["eval_lddt_count"] == len(heldout_files)
    assert before["eval_ligand_rmsd_mean"] > 0
    assert 0.0 <= before["eval_ligand_rmsd_success"] <= 1.0
    for term in DIFFUSION_ON | CONFIDENCE_ON:
        assert before[f"eval_{term}"] > 0, term
    # Only means, counts and rates: nothing names a structure.
    names = {e.entry_id for e in open_sample(sample_dir).entries}
    assert not any(n in key for key in before for n in names)
    moved = {n: theta[n] + result.delta[n] for n in theta}
    load_trainable(built.model, built.trainable, moved)
    after = evaluate(built.model, built.loss_fn, heldout_files, load, seed=5)
    assert after["eval_loss"] != before["eval_loss"]


def test_initial_model_holds_exactly_the_trainable_parameters(
    tmp_path: Path, sample_dir: Path
) -> None:
    settings = _settings(sample_dir, "prefixes:aux_heads.pde,aux_heads.plddt")
    path = tmp_path / "theta0.safetensors"
    digest = write_initial_model(path, settings, seed=5)
    assert digest == write_initial_model(tmp_path / "again.safetensors", settings, seed=5)
    state = load_delta(path)
    assert set(state) == set(build(settings, seed=5).trainable)
    assert all(n.startswith(("aux_heads.pde.", "aux_heads.plddt.")) for n in state)


ROUND_SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from foldfed.of3.backend import Of3Backend, Of3Settings, tensors_digest
from foldfed.deltafile import load_delta
settings = Of3Settings(model="openfold3-tiny", sample_dir=Path(sys.argv[1]), lr=1e-3,
                       warmup_steps=0)
backend = Of3Backend(settings, participant="company-c", participant_index=2, seed=5,
                     local_steps=2, grad_accum=2)
delta = backend.train(load_delta(Path(sys.argv[2])), 3, None).delta
print(tensors_digest(delta, backend.trainable))
"""


def test_a_round_retrained_in_a_new_process_gives_the_same_bytes(
    tmp_path: Path, sample_dir: Path
) -> None:
    """What makes a crashed trainer restart-safe: the same round, in two fresh processes
    (as after a SIGKILL), produces the same delta bit for bit."""
    import subprocess
    import sys

    theta0 = tmp_path / "theta0.safetensors"
    write_initial_model(theta0, _settings(sample_dir), seed=5)
    digests = {
        subprocess.run(
            [sys.executable, "-c", ROUND_SCRIPT, str(sample_dir), str(theta0)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout.split()[-1]
        for _ in range(2)
    }
    assert len(digests) == 1
    assert len(next(iter(digests))) == 64

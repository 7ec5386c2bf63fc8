"""Federated evaluation with OpenFold3 (tiny preset, real sample): PoseBusters judges the
deposited poses valid and the untrained model's not; a site's report of a due release
holds the release and θ₀ as aggregates only, θ₀ scored once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foldfed.deltafile import load_delta
from foldfed.of3.backend import Of3Backend, Of3Settings, write_initial_model
from foldfed.of3.data.features import load_batch
from foldfed.of3.data.sample import open_sample
from foldfed.of3.pose_check import PoseTally, judge_pose
from foldfed.of3.testing import prepared_sample

pytestmark = pytest.mark.slow

COMPANY = "company-b"  # one held-out structure: the cheapest site


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    return prepared_sample()


def test_deposited_poses_are_valid_and_a_scrambled_one_is_not(sample_dir: Path) -> None:
    tally = PoseTally()
    for entry in open_sample(sample_dir).heldout():
        batch = load_batch(entry.features)
        true = batch["ground_truth"]["atom_positions"][0]
        verdict = judge_pose(batch, true, entry.ligand)
        assert verdict.valid, (entry.entry_id, verdict.reason)
        tally.add(verdict)
        squeezed = true * 0.5  # every bond half its length
        bad = judge_pose(batch, squeezed, entry.ligand)
        assert bad.assessed and not bad.valid
        assert "pb_bond_lengths" in bad.reason
    summary = tally.summary()
    assert summary["pb_valid_rate"] == 1.0
    assert summary["pb_assessed_count"] == len(open_sample(sample_dir).heldout())
    cut = judge_pose(batch, true, "ATP")  # the features hold another ligand
    assert not cut.assessed and "not a whole 'ATP'" in cut.reason


def test_a_due_release_is_scored_beside_theta0_once(
    tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Of3Settings(
        model="openfold3-tiny", sample_dir=sample_dir, warmup_steps=0, eval_every=2
    )
    theta0_path = tmp_path / "theta0.safetensors"
    write_initial_model(theta0_path, settings, seed=0)
    backend = Of3Backend(
        settings,
        participant=COMPANY,
        participant_index=1,
        seed=0,
        local_steps=1,
        grad_accum=1,
        initial_model=theta0_path,
        cache_dir=tmp_path / "eval",
    )
    import foldfed.of3.training as training

    scored: list[int] = []
    real = training.evaluate

    def counting(*args, **kwargs):
        scored.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", counting)
    theta0 = load_delta(theta0_path)
    first = backend.evaluate_release(theta0, step=1, final=False)
    assert len(scored) == 1  # θ₀ scored once, release 1 (= θ₀) reuses it
    assert first["eval_loss"] == first["theta0_eval_loss"] > 0
    # Random, not uniform: LayerNorm cancels a shift shared by every weight of a layer.
    gen = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
    plain = backend.evaluate_release(moved, step=2, final=False)  # not due: as before
    assert "eval_loss" in plain and not any(k.startswith("theta0_") for k in plain)
    assert len(scored) == 2
    due = backend.evaluate_release(moved, step=3, final=False)
    assert len(scored) == 3  # the release alone: θ₀ came from memory
    assert due["eval_loss"] == plain["eval_loss"] != due["theta0_eval_loss"]
    assert due["theta0_eval_loss"] == first["theta0_eval_loss"]
    expected = ("eval_lddt_mean", "eval_ligand_rmsd_success", "eval_pb_valid_rate")
    expected += ("eval_pb_assessed_count", "theta0_eval_pb_valid_rate", "eval_mse_loss")
    for key in expected:
        assert key in due, key
    assert due["eval_pb_assessed_count"] == 1.0
    names = {e.entry_id for e in open_sample(sample_dir).entries}
    assert not any(n in key for key in due for n in names)
    assert all(isinstance(v, float) for v in due.values())

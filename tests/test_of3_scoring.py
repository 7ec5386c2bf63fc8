"""foldfed eval (foldfed.of3.scoring): a model file scored on a folder of complexes."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest

from foldfed.of3.scoring import LIGAND_FILE_REASON, structure_kind, summarize


def test_structure_kind_reads_the_format_from_the_name() -> None:
    assert structure_kind(Path("a/1abc.cif")) == ("cif", False)
    assert structure_kind(Path("1ABC.CIF.GZ")) == ("cif", True)
    assert structure_kind(Path("x.pdb")) == ("pdb", False)
    assert structure_kind(Path("pdb1abc.ent.gz")) == ("pdb", True)
    assert structure_kind(Path("lig.sdf")) is None
    assert structure_kind(Path("README")) is None


def test_summarize_means_and_the_ligand_success_rate() -> None:
    scored = {
        "a": {"loss": 2.0, "mse_loss": 4.0, "lddt": 0.5, "ligand_rmsd": 1.0},
        "b": {"loss": 4.0, "mse_loss": 6.0, "lddt": 0.3, "ligand_rmsd": 2.0},
        "c": {"loss": 6.0, "mse_loss": 8.0, "lddt": 0.1, "ligand_rmsd": 5.0},
    }
    out = summarize(scored, [{"file": "x.sdf", "reason": "r"}])
    assert out["loss"] == pytest.approx(4.0)
    assert out["mse_loss"] == pytest.approx(6.0)
    assert out["lddt_mean"] == pytest.approx(0.3)
    assert out["ligand_rmsd_mean"] == pytest.approx(8 / 3)
    assert out["ligand_rmsd_le_2a_rate"] == pytest.approx(2 / 3)  # 2.0 Å counts as found
    assert (out["scored"], out["skipped"], out["ligand_rmsd_count"]) == (3, 1, 3)
    assert math.isnan(summarize({}, [])["ligand_rmsd_le_2a_rate"])


def test_foldfed_eval_scores_theta_files_on_a_folder(tmp_path: Path) -> None:
    """Two complexes of the test sample (one gzipped), a ligand file it cannot read, θ_0
    written as the federation writes models, the tiny preset."""
    from foldfed.cli import main
    from foldfed.of3.backend import Of3Settings, write_initial_model
    from foldfed.of3.testing import prepared_sample

    cif = prepared_sample() / "cif"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(cif / "1ppc.cif", data / "1ppc.cif")
    (data / "7bqu.cif.gz").write_bytes(gzip.compress((cif / "7bqu.cif").read_bytes()))
    (data / "lig.sdf").write_text("not read\n")
    model = tmp_path / "theta0.safetensors"
    write_initial_model(model, Of3Settings(model="openfold3-tiny", sample_dir=None), seed=0)
    report_path = tmp_path / "report.json"
    argv = ["eval", "--model", str(model), "--data", str(data), "--preset", "openfold3-tiny"]
    assert main([*argv, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["loaded_as"] == "trainable"
    assert sorted(report["per_structure"]) == ["1ppc.cif", "7bqu.cif.gz"]
    assert report["skipped"] == [{"file": "lig.sdf", "reason": LIGAND_FILE_REASON}]
    summary = report["summary"]
    assert (summary["scored"], summary["skipped"]) == (2, 1)
    for row in report["per_structure"].values():
        assert math.isfinite(row["loss"]) and 0.0 <= row["lddt"] <= 1.0
        assert row["ligand_rmsd"] >= 0.0
    # θ_0 from its file scores exactly as the seeded preset it was written from.
    init_path = tmp_path / "init.json"
    assert main([*argv[:2], "init", *argv[3:], "--json", str(init_path)]) == 0
    init = json.loads(init_path.read_text())
    assert init["per_structure"] == report["per_structure"]


def test_evaluate_without_the_fold_gives_the_same_loss_alone() -> None:
    """The payoff curves' loss-only evaluation (fold=False) is the full one's loss."""
    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.data.sample import open_sample
    from foldfed.of3.testing import prepared_sample
    from foldfed.of3.training import BatchCache, evaluate

    sample = open_sample(prepared_sample())
    files = [sample.heldout()[0].features]
    built = build(Of3Settings(model="openfold3-tiny", sample_dir=None), seed=0)
    load = BatchCache(load_batch)
    full = evaluate(built.model, built.loss_fn, files, load, seed=0)
    loss_only = evaluate(built.model, built.loss_fn, files, load, seed=0, fold=False)
    assert loss_only["eval_loss"] == full["eval_loss"]
    assert "eval_lddt_mean" in full and not any("lddt_mean" in k for k in loss_only)

"""Federated evaluation at a site, without OpenFold3: which releases are due, baselines
scored once (and not again after a restart), a release equal to θ₀ not scored, only
aggregates out, and the trainer asking a backend that has the hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import file_digest
from foldfed.errors import FoldfedError
from foldfed.of3.release_eval import (
    LOCAL_PREFIX,
    THETA0_PREFIX,
    Baseline,
    BaselineCache,
    ReleaseEvaluator,
    check_aggregates,
    is_due,
)
from foldfed.trainer.backend import report_metrics

STRUCTURES = ("1qz5", "3g32")


def test_every_kth_release_from_the_first_and_the_final_one_are_due() -> None:
    assert [s for s in range(1, 9) if is_due(s, 3, final=False)] == [1, 4, 7]
    assert is_due(8, 3, final=True)
    assert [s for s in range(1, 4) if is_due(s, 1, final=False)] == [1, 2, 3]
    assert not any(is_due(s, 0, final=True) for s in range(1, 5))


class Scorer:
    """Stands in for OpenFold3: the 'loss' of θ is its first value; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, theta) -> dict[str, float]:
        value = float(theta["w"][0])
        self.calls.append(value)
        return {"eval_loss": value, "eval_lddt_mean": 0.5, "eval_lddt_count": 2.0}


def _model(path: Path, value: float) -> Path:
    write_delta(path, {"w": torch.full((4,), value)})
    return path


def _evaluator(tmp_path: Path, score: Scorer, baselines, identity: str = "heldout-v1"):
    return ReleaseEvaluator(
        score,
        baselines,
        BaselineCache(tmp_path / "spool" / "eval" / "release-eval.json"),
        identity=identity,
        load_model=load_delta,
        model_key=lambda p: file_digest(p).hex(),
        state_key=lambda s: str(s["w"].tolist()),
        private_names=STRUCTURES,
    )


def test_theta0_is_scored_once_and_a_release_equal_to_it_not_at_all(tmp_path: Path) -> None:
    theta0 = _model(tmp_path / "theta0.safetensors", 10.0)
    score = Scorer()
    evaluator = _evaluator(tmp_path, score, [Baseline(THETA0_PREFIX, theta0)])
    first = evaluator.evaluate(load_delta(theta0))  # release 1 is θ₀
    assert score.calls == [10.0]
    assert first["eval_loss"] == first["theta0_eval_loss"] == 10.0
    for value in (9.0, 8.0):
        out = evaluator.evaluate({"w": torch.full((4,), value)})
        assert out["eval_loss"] == value and out["theta0_eval_loss"] == 10.0
    assert score.calls == [10.0, 9.0, 8.0]  # θ₀ once, each release once


def test_a_restarted_site_reads_its_baselines_from_the_spool(tmp_path: Path) -> None:
    theta0 = _model(tmp_path / "theta0.safetensors", 10.0)
    local = _model(tmp_path / "local.safetensors", 7.0)
    baselines = [Baseline(THETA0_PREFIX, theta0), Baseline(LOCAL_PREFIX, local)]
    _evaluator(tmp_path, Scorer(), baselines).evaluate({"w": torch.full((4,), 9.0)})
    score = Scorer()
    out = _evaluator(tmp_path, score, baselines).evaluate({"w": torch.full((4,), 8.0)})
    assert score.calls == [8.0]
    assert out["local_eval_loss"] == 7.0 and out["theta0_eval_loss"] == 10.0
    # Another held-out set (or seed, or model settings) is another evaluation.
    score = Scorer()
    _evaluator(tmp_path, score, baselines, identity="heldout-v2").evaluate(
        {"w": torch.full((4,), 8.0)}
    )
    assert sorted(score.calls) == [7.0, 8.0, 10.0]


def test_only_aggregates_leave_the_site(tmp_path: Path) -> None:
    theta0 = _model(tmp_path / "theta0.safetensors", 10.0)
    out = _evaluator(tmp_path, Scorer(), [Baseline(THETA0_PREFIX, theta0)]).evaluate(
        {"w": torch.full((4,), 9.0)}
    )
    assert all(isinstance(v, float) for v in out.values())
    assert not any(name in key for key in out for name in STRUCTURES)
    assert set(out) == {
        f"{prefix}_{m}"
        for prefix in ("eval", "theta0_eval")
        for m in ("loss", "lddt_mean", "lddt_count")
    }
    with pytest.raises(FoldfedError, match="names the structure 3g32"):
        check_aggregates({"eval_loss_3g32": 1.0}, STRUCTURES)
    with pytest.raises(FoldfedError, match="not one number"):
        check_aggregates({"eval_loss": [1.0, 2.0]}, STRUCTURES)  # type: ignore[dict-item]


class PlainBackend:
    def evaluate(self, theta) -> dict[str, float]:
        return {"eval_loss": 1.0}


class ReleaseBackend(PlainBackend):
    def evaluate_release(self, theta, step: int, final: bool) -> dict[str, float]:
        return {"eval_loss": 1.0, "step": float(step), "final": float(final)}


def test_the_trainer_asks_a_backend_with_the_hook_which_release_it_scores() -> None:
    theta = {"w": torch.zeros(1)}
    assert report_metrics(PlainBackend(), theta, 3, False) == {"eval_loss": 1.0}  # type: ignore[arg-type]
    assert report_metrics(ReleaseBackend(), theta, 3, True) == {  # type: ignore[arg-type]
        "eval_loss": 1.0,
        "step": 3.0,
        "final": 1.0,
    }

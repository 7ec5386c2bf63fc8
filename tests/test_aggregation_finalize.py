"""Finalizing a step: the global update and the next model from the integer sum.

The references here are computed independently, in torch, on whole tensors in memory; the
aggregator streams slices through files. They must agree bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from foldfed.aggregation import (
    SCALE,
    Accumulator,
    AggregationError,
    FinalizeError,
    FinalizeResult,
    ModelLayout,
    ServerOptimizer,
    dequantize_mean,
    finalize_step,
    quantize_chunk,
    weight_total,
)
from foldfed.aggregation.dtypes import from_float64
from foldfed.aggregation.state import generations
from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import digest_of
from foldfed.errors import StoreError
from foldfed.format import MIN_CHUNK_SIZE, chunk_count
from foldfed.payloadfile import read_chunk, read_layout

SHAPES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "trunk.weight": (torch.float32, (300, 500)),
    "trunk.bias": (torch.float32, (1000,)),
    "head.weight": (torch.bfloat16, (64, 33)),
    "norm.scale": (torch.float16, (77,)),
    "proj": (torch.float64, (5, 7)),
    "unused": (torch.float32, (0, 3)),
}
WEIGHTS = (3.0, 0.25, 1200.0, 7.5, 41.0)


def tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        for name, (dtype, shape) in SHAPES.items()
    }


class Round:
    """One step's deltas on disk, summed into an accumulator the way the aggregator does."""

    def __init__(self, tmp: Path, step: int, deltas: list[dict[str, torch.Tensor]]) -> None:
        self.deltas = deltas
        self.paths = []
        for i, delta in enumerate(deltas):
            self.paths.append(tmp / f"step{step}-delta{i}.safetensors")
            write_delta(self.paths[-1], delta)
        self.layout = ModelLayout.from_spans(read_layout(self.paths[0]))
        self.acc = Accumulator(tmp / f"step{step}.acc", self.layout.elements)
        for path, weight in zip(self.paths, WEIGHTS, strict=True):
            self._add(path, weight)
        self.weight_sum = weight_total(WEIGHTS)

    def _add(self, path: Path, weight: float) -> None:
        spans, size = read_layout(path), path.stat().st_size
        self.layout.check_compatible(spans)
        for i in range(chunk_count(size, MIN_CHUNK_SIZE)):
            body = read_chunk(path, MIN_CHUNK_SIZE, i)
            self.acc.add_all(
                quantize_chunk(self.layout, spans, i, MIN_CHUNK_SIZE, size, body, weight)
            )


def reference_mean(deltas: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The grid mean, recomputed in torch: round-half-even of w*x*2^24, summed in int64."""
    total = torch.stack(
        [
            torch.round(d[name].to(torch.float64) * (w * SCALE)).to(torch.int64)
            for d, w in zip(deltas, WEIGHTS, strict=True)
        ]
    ).sum(dim=0)
    return total.to(torch.float64) / (math.fsum(WEIGHTS) * SCALE)


def finalize(
    tmp: Path, rnd: Round, base: Path, step: int, optimizer: ServerOptimizer, **kw: int
) -> FinalizeResult:
    return finalize_step(
        rnd.layout,
        rnd.acc,
        rnd.weight_sum,
        base,
        tmp / f"update-{step}.safetensors",
        tmp / f"model-{step + 1}.safetensors",
        optimizer,
        tmp / "state",
        step=step,
        **kw,
    )


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def theta0(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = tensors(seed=1, scale=0.5)
    path = tmp_path / "model-0.safetensors"
    write_delta(path, model)
    return path, model


@pytest.fixture
def round0(tmp_path: Path) -> Round:
    return Round(tmp_path, 0, [tensors(seed=10 + i, scale=1e-3) for i in range(5)])


def test_the_fedavg_update_is_the_weighted_mean(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], round0: Round
) -> None:
    result = finalize(tmp_path, round0, theta0[0], 0, ServerOptimizer("fedavg"))
    update = load_delta(result.update_path)
    assert update.keys() == set(SHAPES)
    for name, (dtype, shape) in SHAPES.items():
        assert update[name].dtype == dtype and tuple(update[name].shape) == shape
        mean = reference_mean(round0.deltas, name)
        assert bits(update[name]) == bits(mean.to(dtype)), name
        pairs = zip(round0.deltas, WEIGHTS, strict=True)
        weighted = [w * d[name].to(torch.float64) for d, w in pairs]
        direct = torch.stack(weighted).sum(dim=0) / math.fsum(WEIGHTS)
        grid = len(WEIGHTS) * 2.0**-25 / math.fsum(WEIGHTS)
        assert torch.allclose(mean, direct, rtol=1e-12, atol=grid), name


def test_the_next_model_is_torch_theta_plus_update_and_write_delta_bytes(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], round0: Round
) -> None:
    base, theta = theta0
    result = finalize(tmp_path, round0, base, 0, ServerOptimizer("fedavg"))
    update = load_delta(result.update_path)
    expected = {name: theta[name] + update[name] for name in SHAPES}  # torch, on CPU
    model = load_delta(result.model_path)
    for name in SHAPES:
        assert bits(model[name]) == bits(expected[name]), name
    write_delta(tmp_path / "by-write-delta", expected)
    assert result.model_path.read_bytes() == (tmp_path / "by-write-delta").read_bytes()
    write_delta(tmp_path / "update-by-write-delta", update)
    assert result.update_path.read_bytes() == (tmp_path / "update-by-write-delta").read_bytes()
    assert result.model_digest == digest_of(result.model_path.read_bytes())
    assert result.update_digest == digest_of(result.update_path.read_bytes())


def test_finalizing_again_or_in_other_slices_writes_the_same_bytes(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], round0: Round
) -> None:
    opt = ServerOptimizer("fedadam")
    first = finalize(tmp_path, round0, theta0[0], 0, opt)
    model, update = first.model_path.read_bytes(), first.update_path.read_bytes()
    again = finalize(tmp_path, round0, theta0[0], 0, opt)
    assert again == first and again.model_path.read_bytes() == model
    sliced = finalize(tmp_path, round0, theta0[0], 0, opt, slice_elements=4099)
    assert sliced == first and sliced.update_path.read_bytes() == update
    assert generations(tmp_path / "state") == [0, 1]
    leftovers = [p for d in (tmp_path, tmp_path / "state") for p in d.glob(".*")]
    assert leftovers == []


def test_a_base_model_from_elsewhere_still_gives_canonical_files(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], round0: Round
) -> None:
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(theta0[1], str(foreign), metadata={"origin": "hf", "v": "3"})
    ours = finalize(tmp_path, round0, theta0[0], 0, ServerOptimizer("fedavg"))
    model = ours.model_path.read_bytes()
    theirs = finalize(tmp_path, round0, foreign, 0, ServerOptimizer("fedavg"))
    assert theirs.model_path.read_bytes() == model


def _reference_step(
    opt: ServerOptimizer,
    theta: dict[str, torch.Tensor],
    state: dict[str, dict[str, torch.Tensor]],
    deltas: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """θ_{t+1} per Reddi et al. / FedAvgM, whole tensors, torch float64."""
    out = {}
    for name, (dtype, _) in SHAPES.items():
        mean = reference_mean(deltas, name)
        s = state.setdefault(
            name, {"m": torch.zeros_like(mean), "v": torch.full_like(mean, opt.tau * opt.tau)}
        )
        if opt.kind == "fedavgm":
            s["m"] = opt.beta1 * s["m"] + mean
            update = opt.lr * s["m"]
        else:
            s["m"] = opt.beta1 * s["m"] + (1.0 - opt.beta1) * mean
            s["v"] = opt.beta2 * s["v"] + (1.0 - opt.beta2) * (mean * mean)
            update = (opt.lr * s["m"]) / (torch.sqrt(s["v"]) + opt.tau)
        out[name] = theta[name] + update.to(dtype)
    return out


@pytest.mark.parametrize(
    "opt",
    [
        ServerOptimizer("fedavgm"),
        ServerOptimizer("fedavgm", lr=0.5, beta1=0.7),
        ServerOptimizer("fedadam"),
        ServerOptimizer("fedadam", lr=1e-2, beta1=0.8, beta2=0.95, tau=1e-4),
    ],
)
def test_server_optimizers_match_a_torch_reference_over_three_steps(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], opt: ServerOptimizer
) -> None:
    base, theta = theta0
    state: dict[str, dict[str, torch.Tensor]] = {}
    for step in range(3):
        deltas = [tensors(seed=100 * step + i, scale=1e-3 * (step + 1)) for i in range(5)]
        rnd = Round(tmp_path, step, deltas)
        result = finalize(tmp_path, rnd, base, step, opt)
        rnd.acc.close()
        theta = _reference_step(opt, theta, state, deltas)
        model = load_delta(result.model_path)
        for name in SHAPES:
            assert bits(model[name]) == bits(theta[name]), (step, name)
        base = result.model_path
        # Only the state that goes with θ_step (for a repeat) and θ_step+1 are kept.
        assert generations(tmp_path / "state") == [step, step + 1]


def test_fedadam_defaults_are_documented_ones() -> None:
    assert ServerOptimizer("fedadam") == ServerOptimizer("fedadam", 1e-3, 0.9, 0.99, 1e-3)
    assert ServerOptimizer("fedavgm").lr == 1.0 and ServerOptimizer("fedavgm").beta1 == 0.9
    assert ServerOptimizer().kind == "fedavg" and ServerOptimizer().lr == 1.0
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta1"):
        ServerOptimizer("fedadam", beta1=1.0)


def test_optimizer_state_that_is_missing_or_does_not_match_is_refused(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]], round0: Round
) -> None:
    first = finalize(tmp_path, round0, theta0[0], 0, ServerOptimizer("fedavgm"))
    with pytest.raises(StoreError, match="no optimizer state for step 5"):
        finalize(tmp_path, round0, first.model_path, 5, ServerOptimizer("fedavgm"))
    with pytest.raises(StoreError, match="this step needs"):
        finalize(tmp_path, round0, first.model_path, 1, ServerOptimizer("fedadam"))
    # Generation 1 goes with model-1, not with model-0.
    with pytest.raises(StoreError, match="is not the model the optimizer state goes with"):
        finalize(tmp_path, round0, theta0[0], 1, ServerOptimizer("fedavgm"))
    assert generations(tmp_path / "state") == [0, 1]
    ok = finalize(tmp_path, round0, first.model_path, 1, ServerOptimizer("fedavgm"))
    assert ok.model_path.exists() and generations(tmp_path / "state") == [1, 2]


def test_a_base_model_that_does_not_match_the_layout_is_rejected(
    tmp_path: Path, round0: Round
) -> None:
    other = tensors(seed=1, scale=0.5)
    other["norm.scale"] = other["norm.scale"].to(torch.float32)
    write_delta(tmp_path / "other", other)
    with pytest.raises(AggregationError, match=r"dtype mismatch for tensor 'norm\.scale'"):
        finalize(tmp_path, round0, tmp_path / "other", 0, ServerOptimizer())
    assert not (tmp_path / "model-1.safetensors").exists()


def test_an_update_that_overflows_its_dtype_is_refused_and_nothing_is_written(
    tmp_path: Path, theta0: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    deltas = [tensors(seed=i, scale=1e-3) for i in range(5)]
    deltas[2]["norm.scale"][3] = 65000.0  # within the grid, beyond float16 once added
    rnd = Round(tmp_path, 0, deltas)
    with pytest.raises(FinalizeError, match=r"tensor 'norm\.scale' has 1 non-finite values"):
        finalize(tmp_path, rnd, theta0[0], 0, ServerOptimizer("fedavgm", lr=80.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model-0.safetensors", "step0.acc", "state", *(p.name for p in rnd.paths)]
    )
    assert generations(tmp_path / "state") == []


def test_the_mean_is_rounded_to_the_dtype_as_torch_casts_it() -> None:
    mean = dequantize_mean(np.array([1, -3, 1 << 40], dtype=np.int64), 3.0)
    for name, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        ours = from_float64(mean, name).view(np.int16)
        assert ours.tolist() == torch.from_numpy(mean).to(dtype).view(torch.int16).tolist()

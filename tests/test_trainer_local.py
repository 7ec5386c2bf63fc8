"""The demo task and one round of local training: reproducible data, deterministic deltas,
exact model arithmetic and digests."""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pytest
import torch

from foldfed.deltafile import load_delta, write_delta
from foldfed.errors import CodecError
from foldfed.localround import RoundResult, TrainingInterrupted
from foldfed.trainer import task
from foldfed.trainer.local import (
    LocalConfig,
    Split,
    apply_update,
    model_digest,
    state_of,
    train_round,
)

SEED = 7
N = 3


@pytest.fixture(scope="module")
def data() -> tuple[Split, Split, Split]:
    train, heldout = task.participant_dataset(0, N, SEED, 1024)
    return train, heldout, task.global_testset(N, SEED)


def one_round(
    data: tuple[Split, Split, Split],
    base: dict[str, torch.Tensor],
    step: int = 1,
    config: LocalConfig | None = None,
) -> RoundResult:
    train, heldout, test = data
    return train_round(
        task.make_model(SEED),
        base,
        train,
        {"eval_loss": heldout, "global_eval_loss": test},
        config or LocalConfig(),
        seed=SEED,
        participant_index=0,
        step=step,
    )


def theta0() -> dict[str, torch.Tensor]:
    return state_of(task.make_model(SEED))


def file_bytes(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> bytes:
    write_delta(tmp_path / name, tensors)
    return (tmp_path / name).read_bytes()


# --- the task ------------------------------------------------------------------------------


def test_participants_see_different_inputs_of_one_target() -> None:
    splits = [task.participant_dataset(i, N, SEED, 512)[0] for i in range(N)]
    means = torch.stack([s.x.mean(dim=0) for s in splits])
    # Centres are 4 * sqrt(3) apart; sample means sit within a few tenths of them.
    assert torch.cdist(means, means).add(torch.eye(N) * 100).min() > 5.0
    for i, split in enumerate(splits):
        assert torch.allclose(split.x.mean(dim=0), task.centre(i, N), atol=0.2)
        # One target for all (allclose: a matmul's rounding depends on the batch it is in).
        assert torch.allclose(split.y, task.teacher(SEED, N, split.x), atol=1e-6)


def test_data_is_reproducible_for_a_seed() -> None:
    a_train, a_held = task.participant_dataset(1, N, SEED, 500)
    b_train, b_held = task.participant_dataset(1, N, SEED, 500)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_held.y, b_held.y)
    assert (len(a_train), len(a_held)) == (400, 100)
    other, _ = task.participant_dataset(1, N, SEED + 1, 500)
    assert not torch.equal(a_train.x, other.x)
    assert torch.equal(task.global_testset(N, SEED).x, task.global_testset(N, SEED).x)


def test_global_testset_covers_every_region() -> None:
    test = task.global_testset(N, SEED, per_region=100)
    assert len(test) == N * 100
    for i in range(N):
        region = test.x[i * 100 : (i + 1) * 100]
        assert torch.allclose(region.mean(dim=0), task.centre(i, N), atol=0.3)


def test_initial_model_is_the_same_file_everywhere(tmp_path: Path) -> None:
    digest = task.initial_model(tmp_path / "a.safetensors", SEED)
    again = task.initial_model(tmp_path / "b.safetensors", SEED)
    assert digest == again == blake3.blake3((tmp_path / "a.safetensors").read_bytes()).digest()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert digest != task.initial_model(tmp_path / "c.safetensors", SEED + 1)
    state = load_delta(tmp_path / "a.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values())
    assert 1_000 < sum(t.numel() for t in state.values()) < 100_000


def test_make_model_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    task.make_model(SEED)
    assert torch.equal(before, torch.random.get_rng_state())


# --- one round -----------------------------------------------------------------------------


def test_same_inputs_give_the_same_delta_bytes(
    data: tuple[Split, Split, Split], tmp_path: Path
) -> None:
    first = one_round(data, theta0())
    second = one_round(data, theta0())
    assert file_bytes(tmp_path, "1", first.delta) == file_bytes(tmp_path, "2", second.delta)
    assert first.metrics["train_loss"] == second.metrics["train_loss"]
    other_step = one_round(data, theta0(), step=2)
    assert file_bytes(tmp_path, "3", other_step.delta) != file_bytes(tmp_path, "1", first.delta)


def test_delta_is_local_minus_base(data: tuple[Split, Split, Split]) -> None:
    base = theta0()
    result = one_round(data, base)
    assert set(result.delta) == set(base)
    assert all(d.dtype == torch.float32 for d in result.delta.values())
    assert any(d.abs().max() > 0 for d in result.delta.values())
    assert set(result.metrics) == {"train_loss", "eval_loss", "global_eval_loss", "compute_s"}


def test_weight_is_every_sample_of_the_round(data: tuple[Split, Split, Split]) -> None:
    config = LocalConfig(local_steps=3, grad_accum=2, micro_batch=5, optimizer="sgd", lr=0.01)
    calls: list[int] = []

    def counting_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(pred))
        return torch.nn.functional.mse_loss(pred, target)

    train, _, _ = data
    result = train_round(
        task.make_model(SEED),
        theta0(),
        train,
        {},
        config,
        seed=SEED,
        participant_index=0,
        step=1,
        loss_fn=counting_mse,
    )
    assert result.weight == 3 * 2 * 5 == config.samples_per_round
    assert calls == [5] * 6  # K optimizer steps of G micro-batches each


def test_losses_fall_over_rounds(data: tuple[Split, Split, Split]) -> None:
    theta = theta0()
    history = []
    for step in range(1, 6):
        result = one_round(data, theta, step)
        theta = apply_update(theta, result.delta)
        history.append(result.metrics)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["eval_loss"] < 0.5 * history[0]["eval_loss"]


def test_round_restores_torch_settings(data: tuple[Split, Split, Split]) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state()
    one_round(data, theta0())
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(rng, torch.random.get_rng_state())


def test_a_stop_request_interrupts_the_round(data: tuple[Split, Split, Split]) -> None:
    train, _, _ = data
    with pytest.raises(TrainingInterrupted):
        train_round(
            task.make_model(SEED),
            theta0(),
            train,
            {},
            LocalConfig(),
            seed=SEED,
            participant_index=0,
            step=1,
            should_stop=lambda: True,
        )


# --- model arithmetic and digests ------------------------------------------------------------


def test_apply_update_is_float32_addition_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(50, 7, generator=g), "b": torch.randn(3, generator=g) * 1e6}
    update = {"a": torch.randn(50, 7, generator=g) * 1e-4, "b": torch.randn(3, generator=g)}
    out = apply_update(theta, update)
    for name in theta:
        assert torch.equal(out[name], torch.add(theta[name], update[name]))
        # What the hub computes with numpy on the same float32 arrays: the same bits.
        hub = theta[name].numpy() + update[name].numpy()
        assert hub.dtype == np.float32
        assert out[name].numpy().tobytes() == hub.tobytes()


def test_apply_update_refuses_a_mismatched_update() -> None:
    theta = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(CodecError, match="missing"):
        apply_update(theta, {"a": torch.zeros(2)})
    with pytest.raises(CodecError, match="shape"):
        apply_update(theta, {"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(CodecError, match="float32"):
        apply_update(theta, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})


def test_model_digest_is_blake3_of_the_canonical_file(tmp_path: Path) -> None:
    state = theta0()
    write_delta(tmp_path / "theta.safetensors", state)
    expected = blake3.blake3((tmp_path / "theta.safetensors").read_bytes()).digest()
    assert model_digest(state) == expected
    assert model_digest(state, scratch_dir=tmp_path) == expected
    nudged = dict(state)
    nudged["0.bias"] = state["0.bias"].clone()
    nudged["0.bias"][0] = torch.nextafter(nudged["0.bias"][0], torch.tensor(1.0))
    assert model_digest(nudged) != expected

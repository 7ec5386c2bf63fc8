"""The delivery/release race at the aggregator (issue 14): a delta that reaches the hub
before the aggregator has seen its step's release must never be counted in the weights
and then wiped from the running sum. Real broker, real aggregator process, real SIGKILL.

Each run ends with a FinalizeRequest, and the global update the aggregator wrote must be
exactly the weighted mean (on the documented 2^-24 grid) of the deltas it counted.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import file_digest
from foldfed.messages import FinalizeRequest, StepReleased

from conftest import (
    FOLDFED,
    PARTICIPANTS,
    BrokerHandle,
    Service,
    hub_env,
    participant_env,
    release,
    reset_topology,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

A, B = PARTICIPANTS[0], PARTICIPANTS[1]
MEMBERS = (A, B)
FRACTION_BITS = 24  # the documented grid (foldfed.aggregation.fixedpoint)
SHAPES = {"encoder.weight": (300_000,), "head.bias": (1000,), "head.weight": (200, 50)}


def _tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in SHAPES.items()}


def _upload(
    env: dict[str, str], delta: Path, weight: float, base: bytes
) -> subprocess.CompletedProcess[str]:
    args = ["upload", "--delta", str(delta), "--step", "1", "--weight", str(weight)]
    args += ["--base-model-digest", base.hex()]
    return subprocess.run([*FOLDFED, *args], env=env, capture_output=True, text=True, timeout=120)


async def _as_hub(admin_url: str, message: FinalizeRequest | StepReleased) -> None:
    bus = await Bus.connect(BusSettings(admin_url, 10.0, 8), name="test-hub")
    try:
        await bus.publish(topology.CONTROL_EXCHANGE, "", message)
    finally:
        await bus.close()


def _finalize(admin_url: str) -> None:
    asyncio.run(_as_hub(admin_url, FinalizeRequest(1, MEMBERS, 0)))


def _weighted_mean(deltas: list[tuple[Path, float]]) -> dict[str, np.ndarray]:
    """The update the hub must make: each value on the 2^-24 grid times its weight, summed
    as integers, divided once by the weight sum (foldfed.aggregation.fixedpoint)."""
    scale = float(1 << FRACTION_BITS)
    total: dict[str, np.ndarray] = {}
    for path, weight in deltas:
        for name, value in load_delta(path).items():
            q = np.rint(value.double().numpy() * weight * scale).astype(np.int64)
            total[name] = total.get(name, 0) + q
    weight_sum = sum(w for _, w in deltas)
    return {
        n: (q.astype(np.float64) / (weight_sum * scale)).astype(np.float32)
        for n, q in total.items()
    }


def _wait_for(path: Path, service: Service, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert service.proc.poll() is None, service.log()
        assert time.monotonic() < deadline, f"{path.name} not written:\n{service.log()}"
        time.sleep(0.1)


@pytest.mark.parametrize("restart", ["none", "before-release", "after-first-delivery"])
def test_a_delta_sent_before_the_release_never_leaves_the_sum_short(
    broker: BrokerHandle, tmp_path: Path, restart: str
) -> None:
    asyncio.run(reset_topology(broker.admin_url))
    theta0 = tmp_path / "theta0.safetensors"
    write_delta(theta0, _tensors(0, 1.0))
    base = file_digest(theta0)
    delta_a, delta_b = tmp_path / "delta-a.safetensors", tmp_path / "delta-b.safetensors"
    write_delta(delta_a, _tensors(1, 0.01))
    write_delta(delta_b, _tensors(2, 0.01))
    weight_a, weight_b = 3.0, 5.0

    state = tmp_path / "hub"
    env = hub_env(broker, state, FOLDFED_INITIAL_MODEL=str(theta0))
    logs = iter(tmp_path / f"aggregator-{i}.log" for i in range(3))
    aggregator = Service(["aggregator"], env, next(logs))
    aggregator.wait_for_log("ingest ready")
    env_a = participant_env(broker, A, tmp_path / "spool-a")
    env_b = participant_env(broker, B, tmp_path / "spool-b")
    try:
        # A's delta reaches the aggregator before the release of step 1 does.
        early = _upload(env_a, delta_a, weight_a, base)
        if restart == "before-release":
            aggregator.kill()
            aggregator = Service(["aggregator"], env, next(logs))
            aggregator.wait_for_log("ingest ready")
        release(env, 1, base.hex(), ",".join(MEMBERS))
        aggregator.wait_for_log("step open")
        # The honest run: every member delivers once the step is open (A again: if its
        # early delta counted, this is a repeat and sends nothing).
        late = _upload(env_a, delta_a, weight_a, base)
        assert late.returncode == 0, late.stderr
        if restart == "after-first-delivery":
            aggregator.kill()
            aggregator = Service(["aggregator"], env, next(logs))
            aggregator.wait_for_log("ingest ready")
        assert _upload(env_b, delta_b, weight_b, base).returncode == 0
        _finalize(broker.admin_url)
        update_path = state / "updates" / "update-000000000001.safetensors"
        _wait_for(update_path, aggregator)
        aggregator.wait_for_log("step finalized")
    finally:
        aggregator.stop()

    expected = _weighted_mean([(delta_a, weight_a), (delta_b, weight_b)])
    update = load_delta(update_path)
    assert set(update) == set(expected)
    for name, value in expected.items():
        assert np.array_equal(update[name].numpy(), value), name
    # The early delta was not counted and then lost: it was refused, with its reason, and
    # A's delivery after the release is the one that counts.
    assert early.returncode != 0, early.stdout
    assert "not released yet" in early.stderr, early.stderr


def test_a_forged_weight_is_rejected_and_the_honest_members_complete_the_step(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Issue 14 item 1: weights are agreed per cycle. The release announces 1.0 for each
    member; a manifest claiming 1e9 is rejected with its
    reason, and the update is the plain mean of the honest members' deltas."""
    asyncio.run(reset_topology(broker.admin_url))
    theta0 = tmp_path / "theta0.safetensors"
    write_delta(theta0, _tensors(0, 1.0))
    base = file_digest(theta0)
    delta_a, delta_b = tmp_path / "delta-a.safetensors", tmp_path / "delta-b.safetensors"
    write_delta(delta_a, _tensors(1, 0.01))
    write_delta(delta_b, _tensors(2, 0.01))

    state = tmp_path / "hub"
    env = hub_env(broker, state, FOLDFED_INITIAL_MODEL=str(theta0))
    aggregator = Service(["aggregator"], env, tmp_path / "aggregator.log")
    aggregator.wait_for_log("ingest ready")
    env_a = participant_env(broker, A, tmp_path / "spool-a")
    env_b = participant_env(broker, B, tmp_path / "spool-b")
    try:
        release_1 = StepReleased(1, base, MEMBERS, weights=(1.0, 1.0))
        asyncio.run(_as_hub(broker.admin_url, release_1))
        aggregator.wait_for_log("step open")
        forged = _upload(env_a, delta_a, 1e9, base)
        assert forged.returncode != 0, forged.stdout
        assert "differs from the weight the cycle agreed" in forged.stderr, forged.stderr
        aggregator.wait_for_log("differs from the weight the cycle agreed for 'org-a': 1.0")
        assert _upload(env_a, delta_a, 1.0, base).returncode == 0
        assert _upload(env_b, delta_b, 1.0, base).returncode == 0
        _finalize(broker.admin_url)
        update_path = state / "updates" / "update-000000000001.safetensors"
        _wait_for(update_path, aggregator)
        aggregator.wait_for_log("step finalized")
    finally:
        aggregator.stop()

    expected = _weighted_mean([(delta_a, 1.0), (delta_b, 1.0)])
    update = load_delta(update_path)
    for name, value in expected.items():
        assert np.array_equal(update[name].numpy(), value), name

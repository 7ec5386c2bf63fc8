"""Update bounds at the hub over the real broker (issue 14 item 3): a member's delta whose L2
norm exceeds the cycle's bound is rejected with its reason, even when the breach shows only in
its last chunk, after earlier chunks were counted; nothing of it stays in the sum, and the
member's bounded delta then completes the step. The update is checked against the weighted
mean of the accepted deltas, computed here."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from test_aggregator_race import (
    MEMBERS,
    SHAPES,
    A,
    B,
    _as_hub,
    _finalize,
    _tensors,
    _upload,
    _wait_for,
    _weighted_mean,
)

from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import file_digest
from foldfed.messages import StepReleased

from conftest import BrokerHandle, Service, hub_env, participant_env, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BOUND = 10.0
CHUNK = 1 << 20  # the smallest: two chunks per delta, the breach in the second


def test_a_delta_over_the_bound_is_rejected_and_leaves_nothing_in_the_sum(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    asyncio.run(reset_topology(broker.admin_url))
    theta0 = tmp_path / "theta0.safetensors"
    write_delta(theta0, _tensors(0, 1.0))
    base = file_digest(theta0)
    honest_a, delta_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_delta(honest_a, _tensors(1, 0.01))  # norm about 5.6
    write_delta(delta_b, _tensors(2, 0.01))
    # The same, but the last tensor in payload order is large: norm about 100.
    oversized = tmp_path / "a-oversized.safetensors"
    big = _tensors(1, 0.01)
    big["head.weight"] = torch.ones(SHAPES["head.weight"])
    write_delta(oversized, big)
    assert sum(float(v.double().square().sum()) for v in big.values()) ** 0.5 > BOUND

    state = tmp_path / "hub"
    env = hub_env(broker, state, FOLDFED_INITIAL_MODEL=str(theta0))
    aggregator = Service(["aggregator"], env, tmp_path / "aggregator.log")
    aggregator.wait_for_log("ingest ready")
    chunked = {"FOLDFED_CHUNK_SIZE": str(CHUNK)}
    env_a = {**participant_env(broker, A, tmp_path / "spool-a"), **chunked}
    env_b = {**participant_env(broker, B, tmp_path / "spool-b"), **chunked}
    try:
        release_1 = StepReleased(1, base, MEMBERS, weights=(1.0, 1.0), update_norm_bound=BOUND)
        asyncio.run(_as_hub(broker.admin_url, release_1))
        aggregator.wait_for_log("step open")
        refused = _upload(env_a, oversized, 1.0, base)
        assert refused.returncode != 0, refused.stdout
        assert "update norm over the bound" in refused.stderr, refused.stderr
        aggregator.wait_for_log("update norm over the bound")
        assert _upload(env_a, honest_a, 1.0, base).returncode == 0
        assert _upload(env_b, delta_b, 1.0, base).returncode == 0
        _finalize(broker.admin_url)
        update_path = state / "updates" / "update-000000000001.safetensors"
        _wait_for(update_path, aggregator)
        aggregator.wait_for_log("step finalized")
    finally:
        aggregator.stop()

    expected = _weighted_mean([(honest_a, 1.0), (delta_b, 1.0)])
    update = load_delta(update_path)
    for name, value in expected.items():
        assert np.array_equal(update[name].numpy(), value), name

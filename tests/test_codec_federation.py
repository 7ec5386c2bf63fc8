"""Whole federated runs with lossy codecs in both directions, every service a real process
over the real broker: every party holds the same θ digest at every step, the hub's model
is the one an independent computation gets from the trainers' deltas and the error-feedback
rule, and a real SIGKILL of an uploader (before or after its residual is committed) loses
nothing and applies nothing twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_federation import STEPS, final_digests, run_federation

from foldfed.aggregation import dequantize_mean, quantize, weight_total
from foldfed.codecs import (
    CodecContext,
    Residual,
    block_stats,
    codec_from_spec,
    compensate,
    plan_chunks,
)
from foldfed.codedvector import ranges_for
from foldfed.deltafile import load_delta, write_delta
from foldfed.demo.cluster import LocalFederation
from foldfed.digests import file_digest
from foldfed.spool import Spool

from conftest import PARTICIPANTS, BrokerHandle

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# docs/format.md's recommended pair: 2-bit rotated codes with shared ranges up, the hub's
# own ranges down, zstd on both.
UPLINK = (
    "rotated:v1;bits=2;block=4096;floor=0.01;init=0.001;mult=2.0;rounding=stochastic;"
    "scale=shared+zstd:v1;level=3"
)
DOWNLINK = "rotated:v1;bits=2;block=4096;mult=2.0;rounding=stochastic;scale=block+zstd:v1;level=3"
CODED = {"FOLDFED_CODEC": UPLINK, "FOLDFED_DOWNLINK_CODEC": DOWNLINK, "FOLDFED_CODEC_SEED": "11"}
CHUNK = 4 << 20


@pytest.fixture(scope="module")
def coded(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run_federation(broker, tmp_path_factory.mktemp("coded"), env=CODED)


def independent_model(federation: LocalFederation) -> bytes:
    """θ_{R+1} recomputed here from the deltas the trainers wrote: each member's error
    feedback, the shared ranges from the previous step's statistics, the sum on the 2^-24
    grid, the hub's own error feedback on the mean. Returns its canonical digest."""
    theta = {k: v.numpy().copy() for k, v in load_delta(federation.initial_model).items()}
    up, down = codec_from_spec(UPLINK), codec_from_spec(DOWNLINK)
    names = None
    residuals: dict[str, Residual | None] = dict.fromkeys(PARTICIPANTS)
    hub: Residual | None = None
    previous: list = []
    for step in range(1, STEPS + 1):
        deltas, weights = {}, []
        for p in PARTICIPANTS:
            record = _sent(Spool(federation.spool_of(p)), step)
            tensors = load_delta(record.path)
            names = names or list(tensors)  # file order: the canonical (vector) order
            deltas[p] = np.concatenate([tensors[n].numpy().reshape(-1) for n in names])
            weights.append(record.weight)
        n = next(iter(deltas.values())).size
        ranges = ranges_for(up, n, previous)
        total = np.zeros(n, dtype=np.int64)
        for p, weight in zip(PARTICIPANTS, weights, strict=True):
            ctx = CodecContext(1, step, p, "up", 11, ranges)
            out = compensate(deltas[p], residuals[p], up, ctx, plan_chunks(up, n, CHUNK))
            residuals[p] = out.residual
            total += quantize(out.decoded.astype(np.float64), weight)
        previous = [block_stats(deltas[p], up.block) for p in PARTICIPANTS]
        exact = dequantize_mean(total, weight_total(weights)).astype(np.float32)
        ctx = CodecContext(1, step, "hub", "down", 11, None)
        out = compensate(exact, hub, down, ctx, plan_chunks(down, n, CHUNK))
        hub = out.residual
        at = 0
        for name in names:
            size = theta[name].size
            piece = out.decoded[at : at + size].reshape(theta[name].shape)
            theta[name] = theta[name] + piece
            at += size
    path = federation.workdir / "independent.safetensors"
    write_delta(path, {k: torch.from_numpy(v) for k, v in theta.items()})
    return file_digest(path)


def _sent(spool: Spool, step: int):
    for record in spool.sent_deltas():
        if record.step == step:
            return record
    raise AssertionError(f"no delta for step {step} in {spool.root}")


def test_lossy_both_ways_every_party_agrees_at_every_step(coded) -> None:
    federation, record = coded
    assert not record.mismatches
    for step in range(2, STEPS + 2):
        reported = {p: r.model_digest for (s, p), r in record.reports.items() if s == step}
        assert set(reported) == set(PARTICIPANTS), step
        assert set(reported.values()) == {record.expected_models[step]}, step
    # The deltas travelled coded: the hub's store holds no safetensors payload of theirs.
    coded_files = list((federation.spool_of(PARTICIPANTS[0]) / "coding").glob("*.coded"))
    assert len(coded_files) == STEPS


def test_hub_model_is_the_independent_error_feedback_computation(coded) -> None:
    federation, record = coded
    (digest,) = set(final_digests(record).values())
    assert digest == independent_model(federation)


@pytest.mark.parametrize(
    "point",
    ["uploader:before-residual@2", "uploader:after-first-chunk@2"],
    ids=["residual-not-committed", "residual-committed"],
)
def test_uploader_sigkill_loses_no_residual_and_applies_none_twice(
    broker: BrokerHandle, tmp_path: Path, coded, point: str
) -> None:
    _, baseline = coded
    name = f"{PARTICIPANTS[1]}-uploader"
    federation, record = run_federation(broker, tmp_path, crash=(name, point), env=CODED)
    assert federation.restarted == {name}, "the crash point was never reached"
    assert final_digests(record) == final_digests(baseline)
    assert not record.mismatches

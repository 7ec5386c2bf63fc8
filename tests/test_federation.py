"""Whole federated runs over the real broker, every service a real process: the global
model is exactly FedAvg of the deltas, and crashes (real SIGKILL) change nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed.deltafile import load_delta, write_delta
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _watch
from foldfed.demo.observer import RunRecord
from foldfed.digests import file_digest
from foldfed.spool import Spool

from conftest import PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STEPS = 3
FRACTION_BITS = 24  # the documented grid (foldfed.aggregation.fixedpoint)


def run_federation(
    broker: BrokerHandle,
    workdir: Path,
    *,
    crash: tuple[str, str] | None = None,
    env: dict[str, str] | None = None,
    participant_env: dict[str, dict[str, str]] | None = None,
) -> tuple[LocalFederation, RunRecord]:
    """A whole run; `crash=(process, FOLDFED_CRASH_AT value)` arms a crash point in one
    process, which is restarted (without it) once it has died."""
    asyncio.run(reset_topology(broker.admin_url))
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        # Retention off: direct_fedavg reads every step's sent delta (docs/retention.md).
        common_env={"FOLDFED_SEED": "7", "FOLDFED_RETAIN_STEPS": "0", **(env or {})},
        participant_env=participant_env or {},
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    from foldfed.trainer.task import initial_model

    initial_model(federation.initial_model, 7)
    record = RunRecord(spec.participants, spec.steps)
    if crash is not None:
        name, point = crash
        federation.crash_env = {name: {"FOLDFED_CRASH_AT": point}}
    try:
        asyncio.run(_watch_with_restarts(federation, record))
    finally:
        federation.stop()
    return federation, record


async def _watch_with_restarts(federation: LocalFederation, record: RunRecord) -> None:
    task = asyncio.create_task(_watch(federation, record, timeout_s=300))
    while not task.done():
        await asyncio.sleep(0.1)
        for process in federation.dead():
            if process.name in federation.restarted:
                continue
            # Died at its crash point (SIGKILL = -9): start it again, unarmed.
            assert process.proc.returncode == -9, process.log()
            federation.restarted.add(process.name)
            federation.restart(process.name)
    await task


def direct_fedavg(federation: LocalFederation) -> bytes:
    """θ_{R+1} computed here from the participants' own delta files: the weighted mean
    on the 2^-24 grid, θ + update in float32, written canonically. Returns its digest."""
    theta = load_delta(federation.initial_model)
    scale = float(1 << FRACTION_BITS)
    for step in range(1, STEPS + 1):
        total: dict[str, np.ndarray] = {}
        weight_sum = 0.0
        for participant in PARTICIPANTS:
            record = _delta_record(Spool(federation.spool_of(participant)), step)
            weight_sum += record.weight
            for name, value in load_delta(record.path).items():
                q = np.rint(value.double().numpy() * record.weight * scale).astype(np.int64)
                total[name] = total.get(name, 0) + q
        for name, q in total.items():
            mean = (q.astype(np.float64) / (weight_sum * scale)).astype(np.float32)
            theta[name] = theta[name] + torch.from_numpy(mean)
    out = federation.workdir / "direct-fedavg.safetensors"
    write_delta(out, theta)
    return file_digest(out)


def _delta_record(spool: Spool, step: int):
    for record in spool.sent_deltas():
        if record.step == step:
            return record
    raise AssertionError(f"no delta for step {step} in {spool.root}")


def final_digests(record: RunRecord) -> dict[str, bytes]:
    return {p: r.model_digest for (s, p), r in record.reports.items() if s == STEPS + 1}


@pytest.fixture(scope="module")
def undisturbed(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run_federation(broker, tmp_path_factory.mktemp("undisturbed"))


def test_global_model_is_exact_fedavg_and_all_agree(undisturbed) -> None:
    federation, record = undisturbed
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert len(set(digests.values())) == 1, digests
    (digest,) = set(digests.values())
    assert digest == record.expected_models[STEPS + 1]
    assert digest == direct_fedavg(federation)
    assert not record.mismatches
    # Federation moved the model: the held-out loss after the last release is lower.
    first = np.mean(
        [r.metrics["global_eval_loss"] for (s, _), r in record.reports.items() if s == 1]
    )
    last = np.mean(
        [r.metrics["global_eval_loss"] for (s, _), r in record.reports.items() if s == STEPS + 1]
    )
    assert last < first


@pytest.mark.parametrize(
    "crash",
    [
        ("aggregator", "aggregator:after-delivery@2"),
        ("barrier", "barrier:before-release@3"),
        (f"{PARTICIPANTS[1]}-uploader", "uploader:after-first-chunk@2"),
        # Ingest's group commit: bodies written, not fsynced; durable, not acked.
        ("aggregator", "aggregator:batch-written@2"),
        ("aggregator", "aggregator:batch-durable@2"),
    ],
    ids=[
        "aggregator-mid-step",
        "barrier-before-release",
        "uploader-mid-upload",
        "aggregator-batch-written",
        "aggregator-batch-durable",
    ],
)
def test_sigkill_and_restart_changes_nothing(
    broker: BrokerHandle, tmp_path: Path, undisturbed, crash: tuple[str, str]
) -> None:
    _, baseline = undisturbed
    federation, record = run_federation(broker, tmp_path, crash=crash)
    assert federation.restarted == {crash[0]}, "the crash point was never reached"
    assert final_digests(record) == final_digests(baseline)
    assert not record.mismatches


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam"])
def test_server_optimizers_keep_every_participant_on_the_hubs_model(
    broker: BrokerHandle, tmp_path: Path, undisturbed, optimizer: str
) -> None:
    _, fedavg = undisturbed
    _, record = run_federation(broker, tmp_path, env={"FOLDFED_SERVER_OPTIMIZER": optimizer})
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert set(digests.values()) == {record.expected_models[STEPS + 1]}
    assert not record.mismatches
    # The server optimizer did change the result: not plain FedAvg's model.
    assert digests != final_digests(fedavg)

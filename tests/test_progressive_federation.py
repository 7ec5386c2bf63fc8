"""Progressive finalize in whole federated runs (real broker, every service a real process),
with the recommended coded uplink and coded downlink.

- With FOLDFED_PROGRESSIVE_FINALIZE on (the default) the hub broadcasts update chunks
  before FinalizeRequest (its log says so), every party agrees at every step, and the
  final model is bit for bit the one of a run with it off.
- A SIGKILL of the aggregator right after it broadcast chunks early (crash point
  `aggregator:mid-progress`), then a restart: the same final digest, every party agrees.
- With an update norm bound the step finalizes the old way (no progressive finalize).
- With a multi-chunk model (the `sim` family, 6 MiB deltas in 1 MiB chunks) and one member
  uploading at 1 MiB/s, the hub broadcasts update chunks before that member's last chunk
  is delivered, at every step, and the run still ends on the exact weighted mean.

Unit tests of the bytes themselves: tests/test_aggregation_progressive.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_codec_federation import CODED
from test_federation import STEPS, direct_fedavg, final_digests, run_federation
from test_shutdown_bounded import MIB, _final_digests, _until_final

from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.settings import env_for, load
from foldfed.trainer.backends.sim import SimSettings
from foldfed.trainer.families import load_family

from conftest import PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EARLY = "update chunks broadcast early"
STARTED = "progressive finalize started"


def hub_log(federation: LocalFederation) -> str:
    return (federation.logs / "aggregator.log").read_text(errors="replace")


def agreed(record) -> bytes:
    assert not record.mismatches
    for step in range(2, STEPS + 2):
        reported = {p: r.model_digest for (s, p), r in record.reports.items() if s == step}
        assert set(reported) == set(PARTICIPANTS), step
        assert set(reported.values()) == {record.expected_models[step]}, step
    (digest,) = set(final_digests(record).values())
    return digest


@pytest.fixture(scope="module")
def classic(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    env = {**CODED, "FOLDFED_PROGRESSIVE_FINALIZE": "0"}
    return run_federation(broker, tmp_path_factory.mktemp("classic"), env=env)


@pytest.fixture(scope="module")
def progressive(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run_federation(broker, tmp_path_factory.mktemp("progressive"), env=CODED)


def test_progressive_broadcasts_early_and_ends_on_the_classic_model(classic, progressive) -> None:
    off_federation, off_record = classic
    on_federation, on_record = progressive
    assert agreed(on_record) == agreed(off_record)
    assert EARLY in hub_log(on_federation)
    assert STARTED not in hub_log(off_federation)


def test_aggregator_sigkill_mid_progress_then_restart_ends_on_the_same_model(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory, classic
) -> None:
    federation, record = run_federation(
        broker,
        tmp_path_factory.mktemp("crash"),
        crash=("aggregator", "aggregator:mid-progress@2"),
        env=CODED,
    )
    assert "aggregator" in federation.restarted, "the crash point was never reached"
    assert agreed(record) == agreed(classic[1])


def test_a_step_with_an_update_bound_finalizes_the_old_way(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {**CODED, "FOLDFED_UPDATE_NORM_BOUND": "1000000"}
    federation, record = run_federation(broker, tmp_path_factory.mktemp("bound"), env=env)
    agreed(record)
    assert STARTED not in hub_log(federation)


def early_before_last_delivery(log: str, slow: str) -> list[int]:
    """The steps whose hub log (JSON lines, in order: one process) shows update chunks
    broadcast early after the step opened and before `slow`'s delivery."""
    steps, early = [], False
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "step open":
            early = False
        elif record.get("event") == EARLY:
            early = True
        elif record.get("event") == "delivered" and record.get("participant") == slow and early:
            steps.append(record["step"])
    return steps


def sim_federation(broker: BrokerHandle, workdir: Path, slow: str) -> LocalFederation:
    """The `sim` family: deltas of 6 MiB in 1 MiB chunks (the update: 7 chunks, its
    header first), no compute, `slow`'s uploader at 1 MiB/s; θ_0 written, nothing started."""
    asyncio.run(reset_topology(broker.admin_url))
    no_compute = {step: 0.0 for step in range(1, STEPS + 2)}
    sim = SimSettings(weight=100.0, elements=6 * MIB // 4, compute_s=no_compute)
    env = env_for(seed=7, tracing=False, reply_timeout_s=10.0, retain_steps=0, chunk_size=MIB)
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        common_env={**env, **sim.env()},  # retention off: direct_fedavg reads every delta
        participant_env={slow: env_for(rate_limit_bps=MIB)},
        monitor_port=0,
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    load_family("sim").write_initial_model(federation.initial_model, load(sim.env()), 7)
    return federation


def test_update_chunks_go_out_before_the_slowest_members_last_chunk(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    slow = PARTICIPANTS[1]
    federation = sim_federation(broker, tmp_path, slow)
    try:
        federation.start_all()
        _until_final(federation, 240)
    finally:
        federation.stop()
    log = hub_log(federation)
    assert early_before_last_delivery(log, slow) == list(range(1, STEPS + 1)), log[-4000:]
    assert _final_digests(federation) == {direct_fedavg(federation).hex()}

"""Progressive finalize in whole federated runs (real broker, every service a real process),
with the recommended coded uplink and coded downlink.

- With FOLDFED_PROGRESSIVE_FINALIZE on (the default) the hub broadcasts update chunks
  before FinalizeRequest (its log says so), every party agrees at every step, and the
  final model is bit for bit the one of a run with it off.
- A SIGKILL of the aggregator right after it broadcast chunks early (crash point
  `aggregator:mid-progress`), then a restart: the same final digest, every party agrees.
- With an update norm bound the step finalizes the old way (no progressive finalize).

Unit tests of the bytes themselves: tests/test_aggregation_progressive.py.
"""

from __future__ import annotations

import pytest
from test_codec_federation import CODED
from test_federation import STEPS, final_digests, run_federation

from foldfed.demo.cluster import LocalFederation

from conftest import PARTICIPANTS, BrokerHandle

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

"""The gate's pure parts: each readiness check's pass, fail and fix, the verdict, and the
signed readiness record (verifies; tampered, foreign or inconsistent ones do not)."""

from __future__ import annotations

import base64
import json

import pytest

from foldfed.gate import checks
from foldfed.gate.checks import (
    BrokerProbe,
    ClockSample,
    ComputeProbe,
    DataProbe,
    Result,
    Terms,
    is_ready,
    summary_table,
)
from foldfed.gate.record import RecordRefused, readiness_statement, sign_record, verify_record
from foldfed.signing import SigningKey

THETA0 = "ab" * 32
TERMS = Terms(cycle=2, theta0_digest=THETA0, schema_version="foldfed.data/1")
GIB = 1024**3


def broker(**changes: object) -> BrokerProbe:
    base = dict(
        user="org-a",
        scheme="amqp",
        tls_verified=False,
        connected=True,
        queue_found=True,
        connect_ms=12.0,
        server="RabbitMQ 3.10.8",
    )
    return BrokerProbe(**{**base, **changes})  # type: ignore[arg-type]


# ---------------------------------------------------------------- broker


def test_broker_passes_with_its_own_queue_and_names_the_user() -> None:
    r = checks.judge_broker(broker(), TERMS)
    assert r.result is Result.PASS and "org-a@RabbitMQ 3.10.8" in r.value and r.fix == ""


def test_broker_unreachable_fails_with_the_url_and_firewall_fix() -> None:
    r = checks.judge_broker(broker(connected=False, error="ConnectionRefusedError"), TERMS)
    assert r.result is Result.FAIL
    assert "ConnectionRefusedError" in r.value and "FOLDFED_AMQP_URL" in r.fix


def test_broker_without_its_queue_fails_and_sends_to_the_hub_operator() -> None:
    r = checks.judge_broker(broker(queue_found=False, error="NOT_FOUND"), TERMS)
    assert r.result is Result.FAIL and "hub operator" in r.fix


def test_amqps_without_certificate_check_fails() -> None:
    r = checks.judge_broker(broker(scheme="amqps", tls_verified=False), TERMS)
    assert r.result is Result.FAIL and "no_verify_ssl" in r.fix
    ok = checks.judge_broker(broker(scheme="amqps", tls_verified=True), TERMS)
    assert ok.result is Result.PASS and "TLS verified" in ok.value


def test_plain_amqp_fails_only_when_tls_is_required() -> None:
    strict = Terms(cycle=2, theta0_digest=THETA0, schema_version="x", require_tls=True)
    assert checks.judge_broker(broker(), strict).result is Result.FAIL
    assert checks.judge_broker(broker(), TERMS).result is Result.PASS


# ---------------------------------------------------------------- clock


def test_round_trip_offset_is_ntp_style() -> None:
    offset, uncertainty = checks.offset_from_round_trip(100.0, 100.2, 97.0, 1.0)
    assert offset == pytest.approx(3.1) and uncertainty == pytest.approx(1.1)


@pytest.mark.parametrize(
    ("offset", "uncertainty", "expected"),
    [(0.3, 1.0, Result.PASS), (5.9, 1.0, Result.PASS), (-7.0, 1.0, Result.FAIL)],
)
def test_clock_fails_only_when_provably_beyond_the_limit(
    offset: float, uncertainty: float, expected: Result
) -> None:
    r = checks.judge_clock(ClockSample("hub", offset, uncertainty), TERMS)
    assert r.result is expected
    assert ("NTP" in r.fix) == (expected is Result.FAIL)


def test_no_clock_measurement_fails_with_the_ntp_fix() -> None:
    sample = ClockSample("kernel", 0, 0, usable=False, error="not NTP-synchronised")
    r = checks.judge_clock(sample, TERMS)
    assert r.result is Result.FAIL and "not NTP-synchronised" in r.value and "--hub-clock" in r.fix


# ---------------------------------------------------------------- disk


def test_disk_need_is_retain_plus_four_models() -> None:
    assert checks.disk_needed(GIB, 1) == 5 * GIB
    assert checks.disk_needed(GIB, 3) == 7 * GIB


def test_disk_fails_short_by_the_missing_amount() -> None:
    r = checks.judge_disk(4 * GIB, GIB, TERMS)
    assert r.result is Result.FAIL and "1.00 GiB more" in r.fix
    assert checks.judge_disk(5 * GIB, GIB, TERMS).result is Result.PASS


def test_disk_fails_when_retention_is_off() -> None:
    off = Terms(cycle=2, theta0_digest=THETA0, schema_version="x", retain_steps=0)
    r = checks.judge_disk(10**15, GIB, off)
    assert r.result is Result.FAIL and "FOLDFED_RETAIN_STEPS" in r.fix


# ---------------------------------------------------------------- compute


def test_compute_passes_with_the_timed_step_and_fails_when_it_did_not_run() -> None:
    ok = checks.judge_compute(ComputeProbe("mlp", "cpu (2 cores)", 0.05), TERMS)
    assert ok.result is Result.PASS and "0.050 s" in ok.value
    bad = checks.judge_compute(ComputeProbe("mlp", "cpu", None, "boom"), TERMS)
    assert bad.result is Result.FAIL and "boom" in bad.value and "FOLDFED_MODEL" in bad.fix


def test_compute_fails_a_step_slower_than_agreed() -> None:
    slow = Terms(cycle=2, theta0_digest=THETA0, schema_version="x", max_step_s=1.0)
    r = checks.judge_compute(ComputeProbe("openfold3-full", "cpu", 43.0), slow)
    assert r.result is Result.FAIL and "limit 1 s" in r.value


# ---------------------------------------------------------------- data


def card(**changes: object) -> DataProbe:
    base = dict(
        card_given=True,
        needs_data=True,
        schema_version="foldfed.data/1",
        structures=10,
        valid=9,
        manifest_matches=True,
    )
    return DataProbe(**{**base, **changes})  # type: ignore[arg-type]


def test_data_passes_a_signed_card_of_the_schema_that_matches_the_folder() -> None:
    r = checks.judge_data(card(), TERMS)
    assert r.result is Result.PASS and "9 of 10" in r.value and "matches" in r.value


@pytest.mark.parametrize(
    ("changes", "in_value"),
    [
        ({"schema_version": "foldfed.data/0"}, "foldfed.data/0"),
        ({"signature_error": "the data card is unsigned"}, "unsigned"),
        ({"manifest_matches": False}, "other files"),
        ({"valid": 0}, "0 of 10"),
        ({"error": "JSONDecodeError"}, "JSONDecodeError"),
    ],
)
def test_data_fails_with_the_reason_and_validate_again(
    changes: dict[str, object], in_value: str
) -> None:
    r = checks.judge_data(card(**changes), TERMS)
    assert r.result is Result.FAIL and in_value in r.value
    assert "foldfed data validate" in r.fix


def test_no_card_fails_for_openfold3_and_is_skipped_for_the_mlp_task() -> None:
    assert checks.judge_data(DataProbe(False, True), TERMS).result is Result.FAIL
    assert checks.judge_data(DataProbe(False, False), TERMS).result is Result.SKIP


# ---------------------------------------------------------------- θ0


def test_theta0_digest_must_equal_the_cycles() -> None:
    assert checks.judge_theta0(THETA0, TERMS).result is Result.PASS
    wrong = checks.judge_theta0("cd" * 32, TERMS)
    assert wrong.result is Result.FAIL and "FOLDFED_INITIAL_MODEL" in wrong.fix
    missing = checks.judge_theta0(None, TERMS, "FOLDFED_INITIAL_MODEL is not set")
    assert missing.result is Result.FAIL and "not set" in missing.value


# ---------------------------------------------------------------- verdict and table


def results(theta0: str = THETA0) -> list[checks.CheckResult]:
    return [
        checks.judge_broker(broker(), TERMS),
        checks.judge_clock(ClockSample("hub", 0.1, 0.5), TERMS),
        checks.judge_disk(100 * GIB, GIB, TERMS),
        checks.judge_compute(ComputeProbe("mlp", "cpu", 0.05), TERMS),
        checks.judge_data(DataProbe(False, False), TERMS),
        checks.judge_split(checks.SplitProbe(False), TERMS),
        checks.judge_theta0(theta0, TERMS),
    ]


def test_ready_when_nothing_failed_a_skip_does_not_block() -> None:
    assert [r.name for r in results()] == list(checks.CHECK_NAMES)
    assert is_ready(results())
    table = summary_table(results())
    assert table.endswith("READY") and "SKIP" in table


def test_the_table_names_the_failed_check_and_its_fix() -> None:
    table = summary_table(results("cd" * 32))
    assert "theta0   FAIL" in table and "FIX theta0: fetch the cycle's θ0" in table
    assert table.endswith("NOT READY: 1 check(s) failed")


# ---------------------------------------------------------------- the signed record


KEY = SigningKey(name="org-a", seed=bytes(range(32)))


def signed(theta0: str = THETA0) -> dict:
    statement = readiness_statement("org-a", TERMS, results(theta0), theta0, "2026-01-01T00:00Z")
    return sign_record(statement, KEY).to_json()


def test_a_signed_record_verifies_with_its_content() -> None:
    record = verify_record(signed(), [KEY.verify_key()])
    assert (record.participant, record.cycle, record.ready) == ("org-a", 2, True)
    assert [c["name"] for c in record.checks] == list(checks.CHECK_NAMES)
    failing = verify_record(signed("cd" * 32), [KEY.verify_key()])
    assert not failing.ready and failing.failed_checks() == ["theta0"]


def test_a_tampered_record_does_not_verify() -> None:
    document = signed("cd" * 32)
    statement = json.loads(base64.b64decode(document["payload"]))
    statement["predicate"]["ready"] = True
    for check in statement["predicate"]["checks"]:
        check["result"] = "pass"
    document["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(RecordRefused, match="does not verify"):
        verify_record(document, [KEY.verify_key()])


def test_a_record_by_another_key_or_name_is_refused() -> None:
    other = SigningKey(name="org-b", seed=bytes(32))
    with pytest.raises(RecordRefused, match="does not verify"):
        verify_record(signed(), [other.verify_key()])
    impostor = SigningKey(name="org-b", seed=bytes(range(32)))  # the same key, another name
    with pytest.raises(RecordRefused, match="claims participant 'org-a'"):
        verify_record(signed(), [impostor.verify_key()])


def test_a_record_whose_ready_field_lies_is_refused() -> None:
    statement = readiness_statement("org-a", TERMS, results("cd" * 32), THETA0, "now")
    statement["predicate"]["ready"] = True
    document = sign_record(statement, KEY).to_json()
    with pytest.raises(RecordRefused, match="disagrees"):
        verify_record(document, [KEY.verify_key()])


# ---------------------------------------------------------------- at the hub's monitor


def test_the_monitor_believes_a_readiness_event_only_from_its_participant_and_adds_no_step() -> (
    None
):
    from foldfed.domain import Event
    from foldfed.messages import decode, encode
    from foldfed.monitor.attribution import StragglerRule
    from foldfed.monitor.model import MonitorModel
    from foldfed.monitor.senders import check_sender
    from foldfed.monitor.state import MonitorConfig

    event = Event("readiness", "gate", "org-a", 0, json.dumps(signed()), {"ready": 1.0}, 1)
    assert decode(*encode(event)) == event
    assert check_sender(event, "org-a", "hub") is None
    assert "forged sender" in str(check_sender(event, "org-b", "hub"))
    model = MonitorModel(MonitorConfig(("org-a", "org-b"), 3, rule=StragglerRule(5, 3)), 0)
    assert model.apply(event, 2) == []
    assert 0 not in model.steps

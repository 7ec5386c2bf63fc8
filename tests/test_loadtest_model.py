"""Load tests, pure parts: scenario parsing and validation, seeded compute times, the
analytic prediction, idle attribution and the measured timeline. No broker, no I/O."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from foldfed.loadtest.distributions import compute_seconds, mean_seconds
from foldfed.loadtest.predict import attribute_idle, plan_run, relative_error, totals
from foldfed.loadtest.scenario import (
    MIB,
    Compute,
    ScenarioError,
    load_scenario,
    parse_compute,
    parse_scenario,
)
from foldfed.loadtest.timeline import (
    ParticipantObs,
    StepObs,
    goodput,
    idle_totals,
    measure,
    path_skew,
    straggler_real_idle,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "loadtest").glob("*.yaml"))


def minimal(**extra: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "t",
        "steps": 10,
        "time_scale": 100,
        "delta_mib": 10,
        "participants": [
            {"name": "site-a", "compute": 120},
            {"name": "site-b", "compute": 144},
        ],
    }
    raw.update(extra)
    return raw


# ------------------------------------------------------------------ scenarios


def test_every_shipped_scenario_parses_and_the_required_ones_exist() -> None:
    names = {load_scenario(p.read_text()).name for p in SHIPPED}
    required = {
        "seed-straggler",
        "seed-straggler-500",
        "slow-link",
        "flaky-link",
        "late-joiner",
        "broker-restart",
    }
    assert required <= names


def test_seed_straggler_is_the_reference_run() -> None:
    for name, steps in (("seed-straggler", 100), ("seed-straggler-500", 500)):
        s = load_scenario((ROOT / "loadtest" / f"{name}.yaml").read_text())
        assert len(s.participants) == 5 and s.steps == steps
        plans = plan_run(s)
        # The straggler's excess over the next-slowest site: 24 s per step, every step.
        assert totals(plans).idle_s["site-e"] == pytest.approx(24.0 * steps)
        slowest_fast = max(s.participant(n).compute.seconds for n in s.names if n != "site-e")
        assert slowest_fast == 120 and s.participant("site-e").compute.seconds == 144


def test_slow_link_has_a_tenth_of_the_others_bandwidth() -> None:
    s = load_scenario((ROOT / "loadtest" / "slow-link.yaml").read_text())
    slow = s.participant(s.expect.goodput_participant)
    others = {p.bandwidth_mbps for p in s.participants if p is not slow}
    assert others == {slow.bandwidth_mbps * 10}


def test_defaults_apply_and_a_number_is_a_fixed_time() -> None:
    s = parse_scenario(minimal(defaults={"bandwidth_mbps": 100, "latency_ms": 20}))
    assert s.participant("site-a").compute == Compute("fixed", 120.0)
    assert s.participant("site-b").bandwidth_bps == 100e6 / 8
    assert s.participant("site-b").latency_ms == 20


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps: must be >= 1"),
        ({"time_scale": 0.5}, "time_scale: must be >= 1"),
        ({"delta_mib": 0}, "delta_mib: must be > 0"),
        ({"bogus": 1}, "unknown key(s) ['bogus']"),
        ({"name": "Bad Name"}, "name: 'Bad Name'"),
        ({"participants": []}, "participants: expected a non-empty list"),
        (
            {"participants": [{"name": "a", "compute": 1}, {"name": "a", "compute": 2}]},
            "duplicate name(s) ['a']",
        ),
        ({"participants": [{"name": "HUB!", "compute": 1}]}, "not a valid participant id"),
        ({"participants": [{"name": "a"}]}, "participants[0].compute: required"),
        (
            {"faults": [{"kind": "meteor", "step": 1}]},
            "faults[0].kind: 'meteor' is not one of",
        ),
        (
            {"faults": [{"kind": "disconnect", "step": 1, "participant": "nobody"}]},
            "faults[0].participant: 'nobody' is not a participant",
        ),
        ({"faults": [{"kind": "broker_restart", "step": 11}]}, "beyond the cycle's 10 steps"),
        (
            {"faults": [{"kind": "late_join", "step": 2, "participant": "site-b"}]},
            "next_cycle_steps: required",
        ),
        ({"expect": {"straggler": "site-z"}}, "expect.straggler: 'site-z' is not a participant"),
        ({"expect": {"tolerance": 0}}, "expect.tolerance: must be > 0"),
        ({"chunk_mib": 32}, "chunk_mib: must be <= 16"),
    ],
)
def test_bad_scenarios_are_refused_with_the_key_and_reason(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(minimal(**change))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dist": "uniform", "seconds": 1}, "'uniform' is not one of"),
        ({"dist": "normal", "seconds": 1}, "sd: required"),
        ({"dist": "lognormal", "seconds": 1}, "sigma: must be > 0"),
        ({"dist": "pareto", "seconds": 1, "alpha": 1}, "alpha: must be > 1"),
        ({"seconds": 1, "pause_probability": 0.5}, "pause_seconds: must be > 0"),
        ({"seconds": 1, "pause_probability": 2, "pause_seconds": 1}, "must be >= 0 and <= 1"),
        ({"seconds": float("nan")}, "must be finite"),
        ({"seconds": "fast"}, "expected a number"),
        ({"seconds": True}, "expected a number"),
    ],
)
def test_bad_distributions_are_refused(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_compute(raw, "c")
    assert message in str(err.value)


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_scenario("- just\n- a list\n")


def test_smoke_keeps_participants_faults_and_checks_with_few_steps() -> None:
    s = parse_scenario(
        minimal(
            steps=50,
            smoke_steps=2,
            faults=[{"kind": "disconnect", "step": 3, "participant": "site-b", "down_s": 5}],
            expect={"same_digest_as_undisturbed": True},
        )
    )
    smoke = s.smoke()
    assert smoke.steps == 4  # the fault's step, plus one after it
    assert smoke.faults == s.faults and smoke.expect == s.expect
    assert smoke.names == s.names and smoke.name == "t-smoke"
    assert smoke.smoke_run and not s.smoke_run
    assert s.undisturbed().faults == ()


def test_scaling_shrinks_the_delta_not_the_bandwidth() -> None:
    s = parse_scenario(minimal(delta_mib=1536, time_scale=200))
    assert s.delta_bytes_run == pytest.approx(1536 * MIB / 200, abs=4)
    assert s.delta_bytes_run % 4 == 0
    tiny = parse_scenario(minimal(delta_mib=0.001, time_scale=1000))
    assert tiny.delta_bytes_run == 4096  # never below a real payload


def test_late_joiner_is_left_out_of_the_first_cycle() -> None:
    s = parse_scenario(
        minimal(
            next_cycle_steps=3,
            faults=[{"kind": "late_join", "step": 2, "participant": "site-b"}],
        )
    )
    assert s.first_cycle() == ("site-a",)
    assert s.total_steps == 13
    plans = plan_run(s)
    assert [p.step for p in plans] == [*range(1, 11), 12, 13, 14]
    assert set(plans[0].compute_s) == {"site-a"} and set(plans[-1].compute_s) == set(s.names)


# ------------------------------------------------------------------ distributions


def test_draws_are_reproducible_and_differ_by_participant_and_step() -> None:
    c = Compute("lognormal", 60.0, sigma=0.3)
    a = [compute_seconds(c, 7, "site-a", t) for t in range(1, 50)]
    assert a == [compute_seconds(c, 7, "site-a", t) for t in range(1, 50)]
    assert a != [compute_seconds(c, 7, "site-b", t) for t in range(1, 50)]
    assert a != [compute_seconds(c, 8, "site-a", t) for t in range(1, 50)]
    assert len(set(a)) == len(a)


@pytest.mark.parametrize(
    "compute",
    [
        Compute("fixed", 120.0),
        Compute("normal", 120.0, sd=10.0),
        Compute("lognormal", 100.0, sigma=0.4),
        Compute("pareto", 50.0, alpha=3.0),
        Compute("fixed", 60.0, pause_probability=0.1, pause_seconds=300.0),
    ],
)
def test_sample_means_match_the_distribution(compute: Compute) -> None:
    draws = [compute_seconds(compute, 1, "site-a", t) for t in range(20000)]
    assert min(draws) >= 0
    assert statistics.fmean(draws) == pytest.approx(mean_seconds(compute), rel=0.03)


def test_heavy_tails_and_pauses_show_up() -> None:
    pareto = [compute_seconds(Compute("pareto", 50.0, alpha=1.5), 1, "x", t) for t in range(5000)]
    assert max(pareto) > 20 * 50  # a heavy tail: rare, very long steps
    paused = Compute("fixed", 60.0, pause_probability=0.2, pause_seconds=30.0)
    values = {compute_seconds(paused, 1, "x", t) for t in range(1000)}
    assert values == {60.0, 90.0}


# ------------------------------------------------------------------ prediction


def test_idle_is_charged_to_the_last_one_by_its_lead() -> None:
    assert attribute_idle({"a": 120.0, "b": 120.0, "c": 144.0}) == {"a": 0, "b": 0, "c": 24.0}
    assert attribute_idle({"a": 5.0}) == {"a": 0.0}
    tie = attribute_idle({"a": 1.0, "b": 1.0})
    assert sorted(tie.values()) == [0.0, 0.0]


def test_reference_straggler_costs_24_s_per_step() -> None:
    s = parse_scenario(minimal(steps=100))
    t = totals(plan_run(s))
    assert t.idle_s == {"site-a": 0.0, "site-b": pytest.approx(2400.0)}
    assert t.idle_s["site-b"] >= 40 * 60  # 40 min per 100 steps
    assert t.wall_s == pytest.approx(144.0 * 100)


def test_upload_time_follows_the_link_and_the_token_bucket() -> None:
    s = parse_scenario(
        minimal(
            delta_mib=1536,
            time_scale=200,
            participants=[
                {"name": "fast", "compute": 120, "bandwidth_mbps": 100},
                {"name": "slow", "compute": 120, "bandwidth_mbps": 10, "latency_ms": 50},
            ],
        )
    )
    plan = plan_run(s)[0]
    burst = 1 * MIB
    expected_slow = (s.delta_bytes_run - burst) / (10e6 / 8) * 200 + 0.1
    assert plan.upload_s["slow"] == pytest.approx(expected_slow)
    assert plan.upload_s["slow"] > 9 * plan.upload_s["fast"]
    assert plan.idle_s["slow"] == pytest.approx(plan.done_s["slow"] - plan.done_s["fast"])


def test_relative_error() -> None:
    assert relative_error(105, 100) == pytest.approx(0.05)
    assert relative_error(0, 0) == 0
    assert math.isinf(relative_error(1, 0))


# ------------------------------------------------------------------ measured timeline


def test_measure_uses_the_barrier_clock_and_skips_open_steps() -> None:
    steps = [
        StepObs(2, 1, 10_000, {"a": 11_200, "b": 11_440}, 11_440, 11_500),
        StepObs(1, 1, 8_000, {"a": 9_100, "b": 9_900}, 9_900, 10_000),
        StepObs(3, 1, 11_500, {"a": 12_700}, None, None),  # still open
    ]
    metrics = {(1, "a"): ParticipantObs(compute_s=1.0, upload_s=0.1, bytes_sent=100)}
    m = measure(steps, metrics)
    assert [s.step for s in m] == [1, 2]
    assert m[0].wall_s == pytest.approx(2.0) and m[0].hub_s == pytest.approx(0.1)
    assert m[1].idle_s == {"a": 0.0, "b": pytest.approx(0.24)}
    assert m[1].last == "b"
    assert m[0].participants["a"].compute_s == 1.0
    assert m[0].participants["b"] == ParticipantObs()
    assert idle_totals(m) == {"a": 0.0, "b": pytest.approx(1.04)}


def test_path_skew_compares_delivery_paths_and_counts_queued_uploads() -> None:
    steps = [
        # e's upload began at 1.10 s, after d's delivery (1.00 s): not queued.
        StepObs(1, 1, 0, {"d": 1_000, "e": 1_150}, 1_150, 1_200),
        # e's upload began at 2.04 s, before d's delivery (2.06 s): queued behind it.
        StepObs(2, 1, 2_000, {"d": 2_060, "e": 2_120}, 2_120, 2_200),
        StepObs(3, 1, 3_000, {"d": 3_050}, 3_050, 3_100),  # e missing: skipped
    ]
    metrics = {
        (1, "d"): ParticipantObs(upload_s=0.04),
        (1, "e"): ParticipantObs(upload_s=0.05),
        (2, "d"): ParticipantObs(upload_s=0.04),
        (2, "e"): ParticipantObs(upload_s=0.08),
        (3, "d"): ParticipantObs(upload_s=0.04),
    }
    skew = path_skew(measure(steps, metrics), "e", "d")
    assert skew.steps == 2 and skew.queued == 1
    assert skew.mean_s == pytest.approx((0.01 + 0.04) / 2)
    assert path_skew([], "e", "d").mean_s == 0.0


def test_straggler_idle_converts_its_delivery_path_excess_at_1x() -> None:
    steps = [
        # e last by 0.12 s; its path 0.01 s longer than d's (queued behind it).
        StepObs(1, 1, 0, {"c": 500, "d": 1_000, "e": 1_120}, 1_120, 1_200),
        # e last by 0.10 s behind c (d was early); e's path 0.02 s shorter than c's.
        StepObs(2, 1, 2_000, {"c": 2_900, "d": 2_400, "e": 3_000}, 3_000, 3_100),
        # d last: nothing charged to e.
        StepObs(3, 1, 4_000, {"c": 4_100, "d": 4_900, "e": 4_800}, 4_900, 5_000),
    ]
    metrics = {
        (1, "d"): ParticipantObs(upload_s=0.05),
        (1, "e"): ParticipantObs(upload_s=0.06),
        (2, "c"): ParticipantObs(upload_s=0.07),
        (2, "e"): ParticipantObs(upload_s=0.05),
    }
    m = measure(steps, metrics)
    got = straggler_real_idle(m, "e", 100.0, {})
    assert got == [
        pytest.approx(100 * 0.12 - 99 * 0.01),
        pytest.approx(100 * 0.10 + 99 * 0.02),
        0.0,
    ]
    # Transfer time the token bucket imposes is compressed: it is not taken out.
    slow_e = straggler_real_idle(m, "e", 100.0, {"e": 0.01})
    assert slow_e[0] == pytest.approx(100 * 0.12)
    # At S = 1 nothing changes; without metrics a step keeps S x lead.
    assert straggler_real_idle(m, "e", 1.0, {}) == [pytest.approx(0.12), pytest.approx(0.10), 0]
    assert straggler_real_idle(measure(steps, {}), "e", 100.0, {})[0] == pytest.approx(12.0)


def test_goodput_against_what_the_token_bucket_allowed() -> None:
    uploads = [ParticipantObs(upload_s=4.0, bytes_sent=6 * MIB)] * 3 + [ParticipantObs()]
    g = goodput(uploads, rate_bps=1.25 * MIB, burst_bytes=MIB)
    assert g.bytes_sent == 18 * MIB and g.seconds == 12.0
    assert g.bytes_per_s == pytest.approx(1.5 * MIB)
    # Allowed: 1.25 MiB/s x 12 s + one burst per upload = 18 MiB: the link never idled.
    assert g.link_share == pytest.approx(1.0)


def test_goodput_counts_the_chunk_pipeline_where_the_uploader_reports_it() -> None:
    # The receipt waited 3 s behind the update's chunks on the participant's queue: not
    # the uplink's time. Without the pipeline's figure (an older uploader): the whole upload.
    uploads = [ParticipantObs(upload_s=7.0, upload_send_s=4.0, bytes_sent=6 * MIB)] * 2
    g = goodput([*uploads, ParticipantObs(upload_s=4.0, bytes_sent=6 * MIB)], 1.25 * MIB, MIB)
    assert g.seconds == 12.0 and g.link_share == pytest.approx(1.0)


def test_replace_keeps_validation_meaningful() -> None:
    s = parse_scenario(minimal())
    assert replace(s, steps=3).with_steps(7).steps == 7


def test_a_smoke_run_reports_full_run_checks_without_judging_them() -> None:
    from foldfed.loadtest.verdicts import Check

    timing = Check("extra wall time matches", ok=False, detail="", needs_full_run=True)
    invariant = Check("every step completed", ok=False, detail="")
    assert timing.verdict(smoke=False) == "FAIL" and timing.fails(smoke=False)
    assert timing.verdict(smoke=True) == "not judged (needs the full run)"
    assert not timing.fails(smoke=True)
    # An invariant is judged in every run, however short.
    assert invariant.fails(smoke=True) and invariant.fails(smoke=False)
    passed = Check("x", ok=True, detail="", needs_full_run=True)
    assert passed.verdict(smoke=True) == passed.verdict(smoke=False) == "ok"

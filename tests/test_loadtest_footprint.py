"""What a load-test run held and whether its sums are right, without a broker: the hub's
peak RSS and the bytes on disk per step from samples (loadtest/footprint.py), the disk's
growth after warm-up and its bound, the independent check of the hub's update against the
participants' deltas (loadtest/sums.py), the step's phases, the scenario keys and the
report's RESULT line."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from foldfed.aggregation.fixedpoint import RESOLUTION
from foldfed.loadtest.footprint import (
    Sample,
    StepDisk,
    disk_per_step,
    growth_after_warmup,
    is_kept_record,
    rss_peak,
)
from foldfed.loadtest.footprint_report import result_line
from foldfed.loadtest.sampler import disk_bytes, disk_usage, process_trees, rss_bytes
from foldfed.loadtest.scenario import ScenarioError, parse_scenario
from foldfed.loadtest.sums import block_errors, check_run, check_step
from foldfed.loadtest.timeline import (
    MeasuredStep,
    ParticipantObs,
    SpoolTimes,
    StepObs,
    step_phases,
)
from foldfed.loadtest.verdicts import RunResult, disk_bound_bytes
from foldfed.loadtest.verdicts import check_run as verdicts_of

BASE = {
    "name": "t",
    "steps": 30,
    "delta_mib": 1,
    "defaults": {"compute": 0},
    "participants": [{"name": "site-a"}, {"name": "site-b"}],
}


def _obs(step: int, opened: int, released: int | None) -> StepObs:
    return StepObs(step, 1, opened, {"site-a": opened + 1}, released, released)


def test_the_hub_peak_is_the_largest_sum_at_one_instant() -> None:
    samples = [
        Sample(0, {"rabbitmq": 100, "aggregator": 50}),
        Sample(1, {"rabbitmq": 90, "aggregator": 80}),
        Sample(2, {"rabbitmq": 120, "aggregator": 10}),
    ]
    peak = rss_peak(samples)
    assert peak.total == 170 and peak.at_peak == {"rabbitmq": 90, "aggregator": 80}
    # Each process's own peak need not be at the same instant: their sum overstates.
    assert peak.own_peaks == {"rabbitmq": 120, "aggregator": 80}
    assert rss_peak([]).total == 0


def test_disk_per_step_takes_each_step_s_peak_between_its_release_and_the_next() -> None:
    steps = [_obs(1, 0, 100), _obs(2, 100, 200), _obs(3, 200, None)]
    samples = [
        Sample(10, hub_disk=5, participants_disk=1),
        Sample(50, hub_disk=9, participants_disk=2),
        Sample(100, hub_disk=3, participants_disk=7, broker_disk=4),
        Sample(250, hub_disk=99),  # step 3 never released: left out
    ]
    series = disk_per_step(samples, steps)
    assert [(d.step, d.hub, d.participants, d.broker, d.samples) for d in series] == [
        (1, 9, 2, 0, 2),
        (2, 3, 7, 4, 1),
    ]
    assert series[1].total == 10


def _series(levels: list[int], records_per_step: int = 0) -> list[StepDisk]:
    """Hub bytes `levels`, participants 100, plus records growing by `records_per_step`."""
    out = []
    for i, level in enumerate(levels):
        records = records_per_step * (i + 1)
        out.append(StepDisk(i + 1, level + records, 100, 0, 1, records, level + 100))
    return out


def test_flat_disk_has_no_growth_whatever_the_warm_up_did() -> None:
    levels = [10 * i for i in range(20)] + [500, 520, 480] * 20  # ramp, then flat with noise
    g = growth_after_warmup(_series(levels), warmup=20)
    assert g.total == 0 and g.window == 10 and g.judged_steps == 60
    assert abs(g.slope_per_step) < 1.0


def test_a_level_that_climbs_every_step_is_growth() -> None:
    g = growth_after_warmup(_series([1000 + 50 * i for i in range(40)]), warmup=10)
    assert g.bulk == g.total == 50 * 20 and g.hub == 50 * 20 and g.participants == 0
    assert g.slope_per_step == pytest.approx(50.0) and g.records_per_step == 0


def test_the_records_kept_for_ever_grow_apart_from_what_retention_bounds() -> None:
    g = growth_after_warmup(_series([500] * 60, records_per_step=20), warmup=20)
    assert g.bulk == 0 and g.slope_per_step == 0
    assert g.records_per_step == pytest.approx(20.0) and g.total == 20 * 30


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("store/manifests/000000000003/site-a.manifest", True),
        ("records/step-000000000003.dsse.json", True),
        ("barrier.sqlite3", True),
        ("ingest.sqlite3-wal", True),
        ("uploads/step-000000000003/manifest.pb", True),
        ("coding/delta-000000000003.manifest", True),
        ("coding/step-000000000003.json", True),
        ("outbox/delta-000000000003.sent", True),
        ("inbox/release-000000000004.json", True),
        ("store/chunks/ab/abcdef", False),
        ("models/model-000000000003.safetensors", False),
        ("updates/update-000000000003.safetensors", False),
        ("outbox/delta-000000000003.safetensors", False),
        ("uploads/step-000000000003/confirmed", False),
        ("inbox/update-000000000004.safetensors", False),
    ],
)
def test_which_files_are_the_records_kept_for_ever(path: str, kept: bool) -> None:
    assert is_kept_record(path) is kept
    # Too few steps after warm-up: nothing judged.
    assert growth_after_warmup(_series([1, 2, 3]), warmup=2).judged_steps == 1


def test_the_disk_bound_allows_a_model_per_kept_checkpoint() -> None:
    s = parse_scenario({**BASE, "steps": 200, "expect": {"disk_flat_after": 20}})
    g = growth_after_warmup(_series([7] * 200), warmup=20)
    # Between the first window (steps 21-30) and the last step, the default policy keeps
    # four checkpoints: θ_50, θ_100, θ_150, θ_200.
    assert disk_bound_bytes(s, g) == s.delta_bytes_run * (1 + 4)
    off = parse_scenario({**BASE, "steps": 200, "retain_checkpoint_every": 0})
    assert disk_bound_bytes(off, g) == off.delta_bytes_run


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    header, data, offset = {}, b"", 0
    for name, array in tensors.items():
        raw = array.astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_the_exact_weighted_mean_passes_and_one_grid_step_more_fails() -> None:
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 1e-3, 4096).astype(np.float32) for _ in range(3)]
    weights = [1000.0, 2000.0, 500.0]
    exact = sum(d.astype(np.float64) * w for d, w in zip(deltas, weights, strict=True)) / sum(
        weights
    )
    assert block_errors(deltas, weights, exact.astype(np.float32))[0] == 0
    off = exact.copy()
    off[17] += 10 * RESOLUTION  # far beyond the grid and float32's rounding at 1e-3
    bad, worst = block_errors(deltas, weights, off.astype(np.float32))
    assert bad == 1 and worst > 1
    nan = exact.astype(np.float32)
    nan[3] = np.nan
    assert block_errors(deltas, weights, nan)[0] == 1


def test_the_check_reads_the_files_the_run_left(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    spools = {n: tmp_path / n for n in ("site-a", "site-b")}
    made = {}
    for n, spool in spools.items():
        (spool / "outbox").mkdir(parents=True)
        made[n] = {"w": rng.normal(0, 1e-3, 3000), "b": rng.normal(0, 1e-3, 7)}
        _safetensors(spool / "outbox" / "delta-000000000001.safetensors", made[n])
    mean = {
        k: (made["site-a"][k].astype(np.float32) + made["site-b"][k].astype(np.float32)) / 2
        for k in ("w", "b")
    }
    (tmp_path / "hub" / "updates").mkdir(parents=True)
    _safetensors(tmp_path / "hub" / "updates" / "update-000000000001.safetensors", mean)
    weights = {"site-a": 1000.0, "site-b": 1000.0}
    [one, two] = check_run(
        tmp_path / "hub", spools, weights, {1: ["site-a", "site-b"], 2: ["site-a"]}
    )
    assert (one.step, one.elements, one.wrong, one.missing) == (1, 3007, False, "")
    assert two.wrong and "not on disk" in two.missing  # step 2's files are not there
    wrong = dict(mean, b=mean["b"] + 1e-4)
    upd = _safetensors(tmp_path / "u2.safetensors", wrong)
    deltas = {n: s / "outbox" / "delta-000000000001.safetensors" for n, s in spools.items()}
    assert check_step(1, deltas, weights, upd).wrong_elements == 7


def test_a_step_s_phases_add_up_to_its_wall_time() -> None:
    obs = ParticipantObs(compute_s=0.5, upload_s=3.0, upload_send_s=2.0)
    step = MeasuredStep(
        step=4,
        cycle=1,
        wall_s=6.0,
        arrive_s={"site-a": 1.0, "site-b": 5.0},
        idle_s={},
        hub_s=1.0,
        participants={"site-b": obs, "site-a": ParticipantObs()},
    )
    p = step_phases(step)
    assert p.site == "site-b"
    assert (p.before_upload_s, p.compute_s, p.upload_send_s, p.upload_rest_s, p.hub_s) == (
        1.5,
        0.5,
        2.0,
        1.0,
        1.0,
    )
    assert p.wall_s == pytest.approx(step.wall_s)


def test_scenario_keys_for_the_footprint_checks() -> None:
    s = parse_scenario(
        {**BASE, "retain_steps": 0, "expect": {"exact_sums": True, "disk_flat_after": 20}}
    )
    assert s.retain_steps == 0 and s.retain_checkpoint_every is None
    assert s.expect.exact_sums and s.expect.disk_flat_after == 20
    # A smoke run judges after half of its few steps.
    assert replace(s, smoke_steps=10).smoke().expect.disk_flat_after == 5
    with pytest.raises(ScenarioError, match="exact_sums: needs retain_steps: 0"):
        parse_scenario({**BASE, "expect": {"exact_sums": True}})
    with pytest.raises(ScenarioError, match="exact_sums: needs fp32"):
        parse_scenario(
            {**BASE, "retain_steps": 0, "codecs": ["int8:v1"], "expect": {"exact_sums": True}}
        )
    with pytest.raises(ScenarioError, match="disk_flat_after: 30 warm-up steps"):
        parse_scenario({**BASE, "expect": {"disk_flat_after": 30}})
    with pytest.raises(ScenarioError, match="exact_sums: expected true/false"):
        parse_scenario({**BASE, "expect": {"exact_sums": "yes"}})
    with pytest.raises(ScenarioError, match="retain_steps: must be >= 0"):
        parse_scenario({**BASE, "retain_steps": -1})


def test_the_report_ends_with_its_result_line(tmp_path: Path) -> None:
    s = parse_scenario({**BASE, "retain_steps": 0, "expect": {"exact_sums": True}})
    step = MeasuredStep(1, 1, 2.0, {"site-a": 1.0}, {}, 0.5)
    r = RunResult(s, tmp_path, 4.0, [step, step], [], 0.0, "d", {"site-a": "d"}, {})
    r.rss = rss_peak([Sample(0, {"rabbitmq": 7, "aggregator": 5})])
    r.sums = []
    assert result_line(r) == "RESULT mean_step_s=2.000 hub_peak_bytes=12 wrong_sums=0"
    # No step checked is a failure, never a pass by default.
    assert not next(c for c in verdicts_of(r) if "weighted mean" in c.name).ok


def test_the_sampler_reads_proc_and_the_disk(tmp_path: Path) -> None:
    import os

    assert rss_bytes(os.getpid()) > 1 << 20
    assert rss_bytes(1 << 30) == 0  # no such process
    trees = process_trees({"me": os.getpid(), "gone": None})
    assert list(trees) == ["me"] and os.getpid() in trees["me"]
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x" * 10000)
    assert disk_bytes(tmp_path) >= 10000
    assert disk_bytes(tmp_path / "missing") == 0
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "delta-000000000001.sent").write_text("{}")
    usage = disk_usage(tmp_path)
    assert 0 < usage.records < usage.total


def test_with_the_spool_s_file_times_the_hand_off_is_measured_not_inferred() -> None:
    # The receipt reached the site 2 s after the hub recorded the delivery (it queued
    # behind the update's chunks): upload_s ends there, the hand-off does not.
    obs = ParticipantObs(compute_s=0.5, upload_s=6.0, upload_send_s=2.0)
    step = MeasuredStep(1, 1, 6.0, {"site-a": 5.0}, {}, 1.0, {"site-a": obs})
    p = step_phases(step, opened_ms=10_000, spool=SpoolTimes(12_000, 17_000))
    assert (p.before_upload_s, p.compute_s, p.upload_send_s, p.upload_rest_s) == (
        1.5,
        0.5,
        2.0,
        1.0,
    )
    assert p.receipt_after_s == 2.0 and p.wall_s == pytest.approx(6.0)

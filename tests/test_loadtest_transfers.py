"""The step model with downloads (loadtest/predict.py): the fold over the update's chunks,
today's sequential hub and a progressive finalize's overlap, the plan's downloads, and
the codec comparison's MEASURED communication time per step (verdicts.codec_figures)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from foldfed.loadtest.comm import codec_figures
from foldfed.loadtest.predict import (
    Link,
    arrivals,
    chunk_sizes,
    download_end,
    overlapped_ready,
    plan_run,
    sequential_ready,
    transfer_step,
)
from foldfed.loadtest.scenario import MIB, ScenarioError, parse_scenario
from foldfed.loadtest.timeline import MeasuredStep, ParticipantObs, links_added_s
from foldfed.loadtest.verdicts import RunResult, comm_check

RATE = 10e6 / 8  # 10 Mb/s
FULL = 1_473_175_152  # OpenFold3-full fp32 delta, bytes


def test_the_fold_waits_for_the_link_and_for_each_chunk() -> None:
    assert download_end([0, 0, 0], [10, 10, 10], 10.0) == pytest.approx(3.0)
    # Chunk 1 is ready late: the link idles until then.
    assert download_end([0, 5, 5], [10, 10, 10], 10.0) == pytest.approx(7.0)
    assert download_end([0, 0], [10, 10], 10.0, free_at=4.0) == pytest.approx(6.0)
    assert download_end([1, 3], [10, 10], 0.0) == 3.0  # unlimited: when the last is ready
    assert download_end([], [], 10.0, free_at=2.0) == 2.0
    with pytest.raises(ValueError, match="2 ready times for 1 chunks"):
        download_end([0, 0], [1], 1.0)


def test_chunks_and_arrivals() -> None:
    assert chunk_sizes(10, 4) == [4, 4, 2] and chunk_sizes(0, 4) == []
    assert arrivals(2.0, [10, 10], 10.0) == pytest.approx([3.0, 4.0])


def test_today_s_hub_publishes_the_update_after_the_last_delivery() -> None:
    up = {"a": [1.0, 2.0], "b": [3.0, 6.0]}
    assert sequential_ready(up, 3) == [6.0, 6.0, 6.0]
    assert overlapped_ready(up) == [3.0, 6.0]
    with pytest.raises(ValueError, match="chunk counts differ"):
        overlapped_ready({"a": [1.0], "b": [1.0, 2.0]})


def test_the_seed_consortium_in_fp32_sequential_and_overlapped() -> None:
    """Issue 12's numbers: ~20 min each way at 10 Mb/s; overlapping the download with the
    uploads saves nearly one of them."""
    compute = {f"site-{c}": 120.0 for c in "abcd"} | {"site-e": 144.0}
    links = {n: Link(RATE, RATE) for n in compute}
    sizes = chunk_sizes(FULL, MIB)
    one_way = FULL / RATE  # 1178.5 s
    seq = transfer_step(compute, links, sizes, sizes, overlapped=False)
    over = transfer_step(compute, links, sizes, sizes, overlapped=True)
    assert seq.uploaded_s["site-e"] == pytest.approx(144 + one_way)
    assert seq.comm_s == pytest.approx(2 * one_way)
    # Each downlink trails site-e's uplink by one chunk: chunk j crosses it while chunk
    # j + 1 crosses the uplink (the short last chunk waits for its full-size predecessor).
    assert over.comm_s == pytest.approx(one_way + MIB / RATE)
    assert over.wall_s == max(over.holds_s.values())


@pytest.mark.parametrize("seed", range(5))
def test_overlap_never_costs_more_and_never_beats_one_way(seed: int) -> None:
    rng = random.Random(seed)
    compute = {f"s{i}": rng.uniform(50, 150) for i in range(4)}
    links = {n: Link(rng.uniform(1e5, 1e7), rng.uniform(1e5, 1e7)) for n in compute}
    n = rng.randint(1, 40)
    up = [rng.uniform(1e4, 1e6) for _ in range(n)]
    down = [rng.uniform(1e4, 1e6) for _ in range(n)]
    seq = transfer_step(compute, links, up, down, overlapped=False)
    over = transfer_step(compute, links, up, down, overlapped=True)
    assert over.wall_s <= seq.wall_s + 1e-9
    # No one holds the update before the slowest delivery is in and its link carried it.
    slowest_upload = max(seq.uploaded_s.values())
    assert all(t >= slowest_upload for t in over.holds_s.values())
    for name, link in links.items():
        assert seq.holds_s[name] == pytest.approx(slowest_upload + sum(down) / link.down_bps)


def _scenario(**extra: object):
    raw: dict[str, object] = {
        "name": "t",
        "steps": 3,
        "time_scale": 10,
        "delta_mib": 10,
        "defaults": {"compute": 100, "bandwidth_mbps": 10},
        "participants": [{"name": "site-a"}, {"name": "site-b", "compute": 120}],
        **extra,
    }
    return parse_scenario(raw)


def test_every_step_but_a_cycle_s_first_downloads_the_update() -> None:
    s = _scenario()
    plans = plan_run(s)
    assert plans[0].download_s == {}
    down = s.delta_bytes_run / RATE * 10
    for plan in plans[1:]:
        assert plan.download_s == {"site-a": pytest.approx(down), "site-b": pytest.approx(down)}
        assert plan.done_s["site-b"] == pytest.approx(down + 120 + plan.upload_s["site-b"])
        assert plan.wall_s == pytest.approx(max(plan.done_s.values()))
    # Unlimited links: nothing to download in time.
    free = _scenario(defaults={"compute": 100, "bandwidth_mbps": 0})
    assert all(p.download_s == {"site-a": 0.0, "site-b": 0.0} for p in plan_run(free)[1:])


def test_comparing_comm_needs_a_step_with_a_download() -> None:
    codecs = {"codecs": ["fp32:v1"], "expect": {"comm_within_compute": True}}
    with pytest.raises(ScenarioError, match="needs steps and smoke_steps >= 2"):
        _scenario(steps=1, **codecs)
    with pytest.raises(ScenarioError, match="needs steps and smoke_steps >= 2"):
        _scenario(smoke_steps=1, **codecs)
    assert _scenario(smoke_steps=2, **codecs).expect.comm_within_compute


def _run(wall_run_s: list[float], arrive: dict[str, list[float]]) -> RunResult:
    """A measured run of `_scenario` (S = 10), steps as given (run seconds)."""
    s = _scenario(codecs=["fp32:v1"], steps=len(wall_run_s))
    plans = plan_run(s)
    steps = [
        MeasuredStep(
            step=t,
            cycle=1,
            wall_s=wall,
            arrive_s={n: a[t - 1] for n, a in arrive.items()},
            idle_s={},
            hub_s=0.0,
            participants={
                n: ParticipantObs(compute_s=plans[t - 1].compute_s[n] / 10) for n in arrive
            },
        )
        for t, wall in enumerate(wall_run_s, start=1)
    ]
    return RunResult(s, Path("."), sum(wall_run_s), steps, plans, 0.0, "", {}, {})


def test_measured_comm_is_wall_minus_the_slowest_compute_over_downloading_steps() -> None:
    # Step 1 (no download) is left out; steps 2 and 3 at 30 and 34 run s (x S = 10).
    r = _run([20.0, 30.0, 34.0], {"site-a": [15, 25, 27], "site-b": [19, 29, 33]})
    f = codec_figures(r)
    burst = MIB / RATE * 10  # the uploader's first chunk, a real link carries it too
    assert f.measured_steps == 2
    assert f.measured_wall_s == pytest.approx(320 + burst)
    assert f.wall_minus_compute_s == pytest.approx(320 + burst - 120)
    # Without a links-off twin nothing says what the links added.
    assert math.isnan(f.links_s) and math.isnan(f.services_run_s)
    # ... nor, without the uploaders' busy times, how long the links were busy.
    assert math.isnan(f.measured_comm_s)
    assert f.site_comm_s["site-a"] == pytest.approx(260 + burst - 100)
    assert f.site_comm_s["site-b"] == pytest.approx(310 + burst - 120)
    assert f.projected_wall_s == f.measured_wall_s
    # Predicted beside it: sequential up + down, and the overlapped model's saving.
    assert f.overlapped_comm_s < f.sequential_comm_s
    assert f.comm_s("site-a") == f.uplink_s["site-a"] + f.downlink_s["site-a"]


def _paired(on_walls: list[float], off_walls: list[float]) -> RunResult:
    """A linked run and its twin on unlimited links (same seeds), walls in run seconds."""
    on = _run(on_walls, {"site-a": [w - 5 for w in on_walls], "site-b": on_walls})
    on.links_off = _run(off_walls, {"site-a": [w - 1 for w in off_walls], "site-b": off_walls})
    return on


def test_the_links_share_is_wall_with_links_minus_wall_without_step_by_step() -> None:
    # Steps 2 and 3 (step 1 downloads nothing): the links add 18 and 20 run s (x S = 10).
    r = _paired([20.0, 30.0, 34.0], [13.0, 12.0, 14.0])
    f = codec_figures(r)
    burst = MIB / RATE * 10
    assert f.links_s == pytest.approx((18 + 20) / 2 * 10 + burst)
    assert f.links_ci_s == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2) * 10)
    assert f.links_off_wall_s == pytest.approx(130)
    # The services' own time: wall without links minus the slowest compute (12 run s),
    # in run seconds; x S beside it.
    assert f.services_run_s == pytest.approx(1.0)
    assert f.services_s == pytest.approx(10.0)
    # Wall minus compute holds the services' time too: it is the larger figure.
    assert f.wall_minus_compute_s == pytest.approx(f.links_s + f.services_s)


def test_links_added_pairs_the_same_steps_only() -> None:
    on = _run([20.0, 30.0, 34.0], {"site-a": [1, 1, 1]}).steps
    off = _run([10.0, 12.0], {"site-a": [1, 1]}).steps
    assert links_added_s(on, off, [2, 3]) == {2: pytest.approx(18.0)}
    assert links_added_s(on, off, []) == {}


def _busy(r: RunResult, up: float, down: float) -> RunResult:
    """`r` with every site's links busy `up` and `down` run seconds in every step."""
    for m in r.steps:
        for name, obs in m.participants.items():
            m.participants[name] = replace(obs, upload_link_s=up, download_s=down, bytes_sent=1.0)
    return r


def test_the_judged_bound_is_the_slowest_upload_plus_the_slowest_download() -> None:
    r = _run([20.0, 30.0], {"site-a": [15, 25], "site-b": [19, 29]})
    a, b = (r.steps[0].participants[n] for n in ("site-a", "site-b"))
    r.steps[0].participants.update(
        {"site-a": replace(a, upload_link_s=4.0, download_s=1.0, bytes_sent=1.0),
         "site-b": replace(b, upload_link_s=2.0, download_s=3.0, bytes_sent=1.0)}
    )  # fmt: skip
    burst = MIB / RATE * 10
    # Step 2 reports nothing and is left out; step 1: (4 + 3) x S, plus the burst.
    assert codec_figures(r).measured_comm_s == pytest.approx(70 + burst)
    # An upload within the token bucket's burst waits nothing: it still counts (the burst
    # added back is its time on a real link); a download that was not reported does not.
    r.steps[0].participants["site-a"] = replace(
        r.steps[0].participants["site-a"], upload_link_s=0.0
    )
    assert codec_figures(r).measured_comm_s == pytest.approx(50 + burst)
    r.steps[0].participants["site-b"] = replace(r.steps[0].participants["site-b"], download_s=0.0)
    assert math.isnan(codec_figures(r).measured_comm_s)


def test_the_check_judges_the_measured_figure() -> None:
    fits = _busy(_paired([20.0, 20.0], [13.0, 13.0]), 3.0, 2.0)  # 50 s + burst <= 120 s
    slow = _busy(_paired([20.0, 40.0], [13.0, 13.0]), 9.0, 4.0)  # 130 s + burst
    for runs, ok in (([slow, fits], True), ([slow], False)):
        combined = RunResult(fits.scenario, Path("."), 0.0, [], [], 0.0, "", {}, {})
        combined.codec_runs = runs
        check = comm_check(combined)
        assert check.ok is ok, check.detail
        assert check.needs_full_run
        assert "links busy" in check.detail and "links add" in check.detail
    nothing = _run([20.0], {"site-a": [15], "site-b": [19]})
    assert math.isnan(codec_figures(nothing).measured_comm_s)
    # Nothing measured: the check cannot pass.
    combined = RunResult(fits.scenario, Path("."), 0.0, [], [], 0.0, "", {}, {})
    combined.codec_runs = [_paired([20.0, 20.0], [13.0, 13.0])]
    assert not comm_check(combined).ok


def test_the_check_judges_the_named_codec_only() -> None:
    fits = _busy(_paired([20.0, 20.0], [13.0, 13.0]), 3.0, 2.0)
    slow = _busy(_paired([20.0, 40.0], [13.0, 13.0]), 9.0, 4.0)
    combined = RunResult(fits.scenario, Path("."), 0.0, [], [], 0.0, "", {}, {})
    combined.codec_runs = [fits, slow]
    named = replace(fits.scenario.expect, comm_within_compute=True, comm_codec="fp32:v1")
    combined.scenario = replace(fits.scenario, expect=named)
    assert comm_check(combined).ok  # both are labelled fp32:v1: the fitting one counts
    combined.codec_runs = [slow]
    assert not comm_check(combined).ok


def test_a_scenario_without_links_keeps_everything_but_the_bandwidth() -> None:
    s = _scenario(codecs=["fp32:v1"])
    free = s.without_links()
    assert all(p.bandwidth_mbps == 0 for p in free.participants)
    assert [p.compute for p in free.participants] == [p.compute for p in s.participants]
    assert (free.seed, free.codecs, free.steps) == (s.seed, s.codecs, s.steps)


def test_comm_codec_must_name_a_compared_codec() -> None:
    with pytest.raises(ScenarioError, match="comm_codec"):
        _scenario(codecs=["fp32:v1"], expect={"comm_within_compute": True, "comm_codec": "x"})


def test_links_busy_time_comes_from_the_uploaders_token_buckets() -> None:
    r = _run([20.0, 30.0, 34.0], {"site-a": [15, 25, 27], "site-b": [19, 29, 33]})
    for m, (up, down) in zip(r.steps, [(3.0, 2.0), (5.0, 2.0), (0.0, 0.0)], strict=True):
        m.participants["site-a"] = replace(
            m.participants["site-a"], upload_link_s=up, download_s=down, bytes_sent=1.0
        )
    f = codec_figures(r)
    burst = MIB / RATE * 10
    # Steps that report nothing are left out; x S, the burst added to the uplink.
    assert f.link_up_s["site-a"] == pytest.approx(40 + burst)
    assert f.link_down_s["site-a"] == pytest.approx(20)
    assert f.link_up_s["site-b"] == 0.0


def test_the_observer_keeps_each_step_s_link_times() -> None:
    from foldfed.demo.observer import RunRecord
    from foldfed.domain import Event

    record = RunRecord(("site-a",), 2)
    up = {"upload_s": 3.0, "upload_link_s": 2.5, "bytes_sent": 10.0}
    record.record(Event("upload_finished", "uploader", "site-a", 1, "", up, 0), 0.0)
    # Release 2 reports the download of update 1: step 1's, like the wait.
    down = {"wait_s": 1.0, "download_s": 1.5}
    record.record(Event("release_received", "uploader", "site-a", 2, "", down, 0), 0.0)
    entry = record.by_step[1].participants["site-a"]
    assert (entry.upload_link_s, entry.download_s, entry.wait_s) == (2.5, 1.5, 1.0)

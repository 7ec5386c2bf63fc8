"""The monitor's arithmetic, without a broker: barrier idle attribution, projection,
straggler detection (robust to spikes, persistent), ETA and silence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foldfed.monitor.attribution import (
    StragglerRule,
    barrier_wait,
    eta,
    held_times,
    holder,
    projected_idle,
    robust_rate,
    silent,
    stragglers,
)

NAMES = ("org-a", "org-b", "org-c")


def test_the_last_to_deliver_holds_the_barrier_for_its_gap_to_the_runner_up() -> None:
    held = held_times({"org-a": 10.0, "org-b": 11.5, "org-c": 17.0})
    assert held == {"org-a": 0.0, "org-b": 0.0, "org-c": 5.5}
    assert holder({"org-a": 10.0, "org-b": 11.5, "org-c": 17.0}) == "org-c"
    # The barrier waited from the first delivery to the last, longer than anyone held it.
    assert barrier_wait({"org-a": 10.0, "org-b": 11.5, "org-c": 17.0}) == 7.0


def test_a_tie_holds_for_nothing_and_one_participant_holds_nothing() -> None:
    assert held_times({"org-a": 3.0, "org-b": 3.0}) == {"org-a": 0.0, "org-b": 0.0}
    assert held_times({"org-a": 3.0}) == {"org-a": 0.0}
    assert holder({"org-a": 3.0}) is None


@given(st.dictionaries(st.sampled_from(NAMES), st.floats(0, 1e6), min_size=2))
def test_held_time_is_what_the_step_would_have_gained_without_the_holder(
    deliveries: dict[str, float],
) -> None:
    held = held_times(deliveries)
    last = holder(deliveries)
    assert last is not None
    without = {p: t for p, t in deliveries.items() if p != last}
    # Had the holder delivered with the runner-up, the step would close at max(without).
    assert held[last] == pytest.approx(max(deliveries.values()) - max(without.values()))
    assert sum(held.values()) == held[last] >= 0


def test_projection_is_a_median_rate_times_remaining_steps_so_one_spike_does_not_move_it() -> None:
    assert projected_idle([4.0, 4.2, 3.9], remaining_steps=3, window=5) == pytest.approx(12.0)
    assert projected_idle([4.0, 40.0, 3.9, 4.1, 4.0], remaining_steps=2, window=5) == 8.0
    # Held now and then (2 steps in 5): its typical step costs nothing.
    assert projected_idle([0.0, 6.0, 0.0, 0.0, 6.0], remaining_steps=10, window=5) == 0.0
    assert projected_idle([5.0], remaining_steps=0, window=5) == 0.0
    assert robust_rate([], 5) == 0.0
    # Only the window counts: an old slow spell is forgotten.
    assert robust_rate([9.0, 9.0, 9.0, 1.0, 1.0, 1.0], 3) == 1.0


def _lags(slow: float, others: float = 2.0) -> dict[str, float]:
    return {"org-a": others, "org-b": others + 0.1, "org-c": slow}


def test_a_persistently_slow_participant_is_a_straggler_after_m_of_w_steps() -> None:
    rule = StragglerRule(margin=0.2, min_excess_s=1.0, window=5, needed=3)
    two = stragglers([_lags(6.0), _lags(6.0)], NAMES, rule)
    assert not two["org-c"].straggler and two["org-c"].slow_in == 2
    three = stragglers([_lags(6.0), _lags(6.0), _lags(6.0)], NAMES, rule)
    assert three["org-c"].straggler
    assert three["org-c"].excess_s == pytest.approx(6.0 - 2.05)
    assert not three["org-a"].straggler and not three["org-b"].straggler


def test_one_spike_is_not_a_straggler() -> None:
    rule = StragglerRule(window=5, needed=3)
    history = [_lags(2.0), _lags(2.0), _lags(30.0), _lags(2.0), _lags(2.1)]
    verdict = stragglers(history, NAMES, rule)["org-c"]
    assert verdict.slow_in == 1
    assert not verdict.straggler


def test_small_absolute_differences_do_not_count_however_large_relatively() -> None:
    rule = StragglerRule(margin=0.2, min_excess_s=1.0)
    # 0.5 s vs 0.1 s: five times slower, but half a second is jitter.
    history = [{"org-a": 0.1, "org-b": 0.1, "org-c": 0.5}] * 5
    assert not stragglers(history, NAMES, rule)["org-c"].straggler
    # A relative margin keeps equally slow sites apart from real stragglers at large scale.
    history = [{"org-a": 120.0, "org-b": 120.0, "org-c": 135.0}] * 5
    assert not stragglers(history, NAMES, rule)["org-c"].straggler
    history = [{"org-a": 120.0, "org-b": 120.0, "org-c": 145.0}] * 5
    assert stragglers(history, NAMES, rule)["org-c"].straggler


def test_a_recovered_participant_stops_being_a_straggler_once_it_is_fast_in_the_window() -> None:
    rule = StragglerRule(window=5, needed=3)
    history = [_lags(6.0)] * 4 + [_lags(2.0)] * 3
    assert not stragglers(history, NAMES, rule)["org-c"].straggler
    assert stragglers(history[:-1], NAMES, rule)["org-c"].straggler


def test_steps_with_unknown_lags_are_skipped() -> None:
    history = [{"org-a": 1.0, "org-b": 1.0}, _lags(6.0), _lags(6.0), _lags(6.0)]
    verdict = stragglers(history, NAMES, StragglerRule())["org-c"]
    assert verdict.considered == 3 and verdict.straggler


def test_rule_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="needed"):
        StragglerRule(window=3, needed=4)
    with pytest.raises(ValueError, match="margin"):
        StragglerRule(margin=-0.1)


def test_eta_counts_the_open_steps_rest_and_the_further_steps() -> None:
    walls = [10.0, 10.0, 11.0, 10.0, 60.0]  # one slow step does not move the median
    assert eta(walls, remaining_steps=3, elapsed_in_open=4.0, window=5) == pytest.approx(26.0)
    # Overdue open step: its rest is 0, not negative.
    assert eta(walls, remaining_steps=3, elapsed_in_open=15.0, window=5) == pytest.approx(20.0)
    assert eta(walls, remaining_steps=0, elapsed_in_open=1.0, window=5) == 0.0
    assert eta([], remaining_steps=3, elapsed_in_open=1.0, window=5) is None


def test_silence_counts_from_the_last_heartbeat_or_from_the_monitors_start() -> None:
    seen = {"org-a": 109.0, "org-b": 80.0, "org-c": None}
    quiet = silent(seen, now=110.0, timeout=15.0, since=100.0)
    assert quiet == {"org-b": pytest.approx(30.0)}
    quiet = silent(seen, now=120.0, timeout=15.0, since=100.0)
    assert set(quiet) == {"org-b", "org-c"}
    assert quiet["org-c"] == pytest.approx(20.0)

"""The token bucket, driven by a fake clock: no test here sleeps."""

from __future__ import annotations

import math
import random

import pytest

from foldfed.uploader.ratelimit import TokenBucket

KiB, MiB = 1 << 10, 1 << 20


def _send(bucket: TokenBucket, sizes: list[int], now: float = 0.0) -> float:
    """Send pieces back to back, waiting each returned delay on the fake clock; the time
    at which the last piece goes out."""
    for size in sizes:
        delay = bucket.delay_for(size, now)
        assert delay >= 0
        now += delay
    return now


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("rate", "burst"), [(MiB, 256 * KiB), (100 * KiB, 4 * MiB), (1e9, 1)])
def test_sending_n_bytes_takes_n_over_rate_within_one_burst(
    seed: int, rate: float, burst: float
) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 2 * int(max(burst, 4 * KiB))) for _ in range(400)]
    total = sum(sizes)
    elapsed = _send(TokenBucket(rate, burst, now=0.0), sizes)
    assert total > 10 * burst  # long enough for the average rate to show
    low, high = (total - burst) / rate, (total + burst) / rate
    assert low * (1 - 1e-9) <= elapsed <= high * (1 + 1e-9)


def test_the_first_burst_goes_out_at_once() -> None:
    bucket = TokenBucket(MiB, 64 * KiB, now=10.0)
    assert [bucket.delay_for(16 * KiB, 10.0) for _ in range(4)] == [0.0] * 4
    assert bucket.delay_for(16 * KiB, 10.0) == pytest.approx(16 * KiB / MiB)


def test_tokens_saved_while_idle_are_capped_at_one_burst() -> None:
    rate, burst = MiB, 128 * KiB
    bucket = TokenBucket(rate, burst, now=0.0)
    _send(bucket, [burst] * 3)
    # An hour idle earns no more than one burst: the next 10 bursts take 9 bursts' time.
    start = 3600.0
    elapsed = _send(bucket, [burst] * 10, now=start) - start
    assert elapsed == pytest.approx(9 * burst / rate)


def test_a_request_bigger_than_the_burst_waits_its_size_over_the_rate() -> None:
    rate, burst = MiB, 256 * KiB
    bucket = TokenBucket(rate, burst, now=0.0)
    assert bucket.delay_for(burst, 0.0) == 0.0  # drains the bucket
    assert bucket.delay_for(4 * MiB, 0.0) == pytest.approx(4.0)
    # ... and the next one waits behind it, as on a real link.
    assert bucket.delay_for(MiB, 4.0) == pytest.approx(1.0)


def test_a_request_bigger_than_a_full_burst_waits_for_the_remainder() -> None:
    bucket = TokenBucket(MiB, 256 * KiB, now=0.0)
    assert bucket.delay_for(4 * MiB, 0.0) == pytest.approx((4 * MiB - 256 * KiB) / MiB)


def test_callers_that_do_not_wait_queue_up_behind_each_other() -> None:
    rate, burst, piece = MiB, 64 * KiB, 64 * KiB
    bucket = TokenBucket(rate, burst, now=0.0)
    delays = [bucket.delay_for(piece, 0.0) for _ in range(5)]
    assert delays == pytest.approx([0.0, *(k * piece / rate for k in range(1, 5))])


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, -1), (0, 0), (-math.inf, 1)]
)
def test_a_rate_or_burst_that_is_not_positive_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(rate, burst, now=0.0)


@pytest.mark.parametrize(("rate", "burst"), [(math.nan, MiB), (MiB, math.nan)])
def test_a_nan_rate_or_burst_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)

"""A token bucket in bytes per second, to emulate (or respect) a slow link, in either
direction. Pure: the caller passes the clock, so tests need no sleeping (uploader/link.py
does the waiting)."""

from __future__ import annotations


class TokenBucket:
    """Allows `rate` bytes per second on average and bursts of up to `burst` bytes.

    A request larger than the burst waits for as many tokens as it has bytes, so a 4 MiB
    chunk on a 1 MiB/s link waits ~4 s, as on a real link.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst > 0):  # also refuses NaN
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay_for(self, nbytes: int, now: float) -> float:
        """Seconds to wait before sending `nbytes`; the bytes are charged at once."""
        self._refill(now)
        if self._tokens >= nbytes:
            self._tokens -= nbytes
            return 0.0
        # Tokens keep accruing while we wait (uncapped: the wait *is* the sending).
        wait = (nbytes - self._tokens) / self.rate
        self._tokens = 0.0
        self._stamp = now + wait
        return wait


# A downlink banks nothing while idle (one byte, as the bucket needs a positive burst):
# a chunk is received when its last byte is, n / rate after the link was free for it.
DOWNLINK_BURST = 1.0


def downlink_bucket(rate: float, now: float) -> TokenBucket:
    """The bucket of a receiving link: each chunk waits its own size over the rate, from
    when it is asked for or when the previous one was through, whichever is later."""
    return TokenBucket(rate, DOWNLINK_BURST, now)

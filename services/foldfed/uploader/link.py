"""An emulated link on the event loop: the token bucket of uploader/ratelimit.py, whose
waits are asyncio sleeps, so a throttled transfer never blocks the loop (heartbeats and
the other messages go on meanwhile).

The uplink keeps one chunk of burst: the link idles while the site computes, so an upload
starts with a full bucket. The downlink keeps none (ratelimit.downlink_bucket): a received
chunk is usable only once its last byte arrived, so a chunk of n bytes is complete n / rate
after the later of (the link is free, the chunk is available): the fold that
loadtest/predict.py's `download_end` models.
"""

from __future__ import annotations

import asyncio
import time

from foldfed.uploader.ratelimit import TokenBucket, downlink_bucket


class Link:
    """One direction of a site's link; `None` bucket: unlimited (waits nothing)."""

    def __init__(self, bucket: TokenBucket | None) -> None:
        self._bucket = bucket

    @classmethod
    def uplink(cls, rate_bps: float, chunk_size: int) -> Link:
        """0 = unlimited. Burst of one chunk: enough to keep the pipe busy, small enough
        to be honest."""
        return cls(TokenBucket(rate_bps, chunk_size, time.monotonic()) if rate_bps else None)

    @classmethod
    def downlink(cls, rate_bps: float) -> Link:
        """0 = unlimited."""
        return cls(downlink_bucket(rate_bps, time.monotonic()) if rate_bps else None)

    @property
    def limited(self) -> bool:
        return self._bucket is not None

    async def carry(self, nbytes: int) -> float:
        """Wait until `nbytes` have crossed the link; the seconds waited."""
        if self._bucket is None:
            return 0.0
        delay = self._bucket.delay_for(nbytes, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

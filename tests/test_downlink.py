"""The emulated downlink of a participant: the token bucket's arithmetic for received
chunks (fake clock, no sleeping) and, against a real broker, a throttled uploader that
takes at least bytes / rate to receive the global update's chunks."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from foldfed import topology
from foldfed.bus import Bus
from foldfed.chunkstore import ChunkStore
from foldfed.config import BusSettings
from foldfed.digests import digest_of
from foldfed.domain import Chunk
from foldfed.loadtest.predict import download_end
from foldfed.uploader.ratelimit import downlink_bucket

from conftest import PARTICIPANTS, BrokerHandle, Service, participant_env, reset_topology

KiB = 1 << 10
RATE = 512 * KiB  # bytes per second


def _receive(ready: list[float], sizes: list[int], rate: float) -> float:
    """Chunks handled one at a time, as the inbox does: chunk j is asked for once it is
    available and the previous one is kept; the time the last one is kept."""
    bucket = downlink_bucket(rate, now=0.0)
    now = 0.0
    for when, size in zip(ready, sizes, strict=True):
        now = max(now, when)
        now += bucket.delay_for(size, now)
    return now


def test_back_to_back_chunks_take_their_bytes_over_the_rate() -> None:
    sizes = [256 * KiB] * 8
    # Nothing banked: not even the first chunk comes for free (one byte of burst).
    assert _receive([0.0] * 8, sizes, RATE) == pytest.approx(sum(sizes) / RATE, abs=1e-5)


def test_an_idle_downlink_banks_nothing() -> None:
    bucket = downlink_bucket(RATE, now=0.0)
    assert bucket.delay_for(RATE, now=100.0) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_bucket_is_the_prediction_s_fold(seed: int) -> None:
    """Chunks becoming available at any times: the bucket keeps each one when the model
    of loadtest/predict.py says, t = max(t, ready_j) + size_j / rate."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 4 * KiB * KiB) for _ in range(50)]
    ready = sorted(rng.uniform(0, 200) for _ in sizes)
    expected = download_end(ready, sizes, RATE)
    assert _receive(ready, sizes, RATE) == pytest.approx(expected, rel=1e-9, abs=1e-5)


@pytest.mark.timeout(120)
def test_a_throttled_participant_takes_bytes_over_rate_to_receive_an_update(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    asyncio.run(reset_topology(broker.admin_url))
    name = PARTICIPANTS[0]
    spool = tmp_path / "spool"
    bodies = [random.Random(i).randbytes(256 * KiB) for i in range(6)]
    total = sum(len(b) for b in bodies)

    async def declare_and_publish() -> float:
        bus = await Bus.connect(BusSettings(broker.admin_url, 10.0, 8), name="test-hub")
        try:
            await bus.declare_hub_topology(PARTICIPANTS)
            env = participant_env(broker, name, spool, FOLDFED_DOWNLOAD_RATE_LIMIT_BPS=str(RATE))
            uploader = Service(["uploader"], env, tmp_path / "uploader.log")
            try:
                await asyncio.to_thread(uploader.wait_for_log, "uploader ready")
                started = time.monotonic()
                for index, body in enumerate(bodies):
                    chunk = Chunk(1, topology.HUB_ID, index, digest_of(body), body)
                    await bus.publish(topology.BROADCAST_EXCHANGE, "", chunk)
                store = ChunkStore(spool / "downloads")
                while not all(store.has(digest_of(b)) for b in bodies):
                    assert time.monotonic() - started < 60, uploader.log()
                    await asyncio.sleep(0.01)
                return time.monotonic() - started
            finally:
                uploader.stop()
        finally:
            await bus.close()

    elapsed = asyncio.run(declare_and_publish())
    low = total / RATE  # 3 s: every byte at the link's rate
    assert low * (1 - 1e-6) <= elapsed < low + 3.0, elapsed

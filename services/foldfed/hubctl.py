"""Hub control by an operator or the barrier: opening a step; clearing the broker's
foldfed queues before a fresh run."""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.messages import StepReleased, now_ms


async def release_step(
    settings: BusSettings, step: int, model_digest: bytes, participants: str = ""
) -> None:
    names = tuple(sorted(p for p in participants.split(",") if p))
    bus = await Bus.connect(settings, name="hubctl")
    try:
        msg = StepReleased(step, model_digest, names, now_ms())
        await bus.publish(topology.CONTROL_EXCHANGE, "", msg)
    finally:
        await bus.close()


async def delete_queues(admin_url: str, participants: Iterable[str]) -> None:
    """Delete every foldfed queue (hub, monitor, dead letters, each participant's), so a
    fresh run or test starts from an empty broker. Destroys undelivered messages: for
    tests, load tests and a hub being rebuilt from scratch, never a live federation."""
    connection = await aio_pika.connect(admin_url)
    try:
        for name in (
            topology.INGEST_QUEUE,
            topology.BARRIER_QUEUE,
            topology.DEAD_QUEUE,
            topology.MONITOR_QUEUE,
            *(topology.participant_queue(p) for p in participants),
        ):
            # One channel per delete: a failed delete closes its channel.
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.close()
    finally:
        await connection.close()

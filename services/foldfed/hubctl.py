"""Hub control messages sent by an operator or the barrier: opening a step."""

from __future__ import annotations

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

"""Heartbeats: "I am alive, at step t, doing X", every FOLDFED_HEARTBEAT_S seconds.

A service runs `run_heartbeats` beside its work; the monitor flags a participant whose
heartbeats stop (before the barrier would wait on it forever). Heartbeats go to the events
exchange under "<service>.heartbeat", not persistent (a stale one is worth nothing), with
mandatory off (nobody may be listening). A failed publish is logged and retried at the next
beat: a heartbeat never takes its service down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping

import structlog

from foldfed import topology
from foldfed.bus import Bus
from foldfed.domain import Heartbeat
from foldfed.errors import FoldfedError
from foldfed.messages import now_ms
from foldfed.settings import load

log = structlog.get_logger(__name__)


def heartbeat_interval(env: Mapping[str, str] = os.environ) -> float:
    """FOLDFED_HEARTBEAT_S: seconds between heartbeats (default 5)."""
    return load(env).heartbeat_s


async def run_heartbeats(
    bus: Bus,
    service: str,
    participant: str,
    status: Callable[[], tuple[int, str]],
    stop: asyncio.Event,
    interval_s: float | None = None,
) -> None:
    """Publish a Heartbeat now and every `interval_s` until `stop` is set; `status()`
    gives the (step, state word) to report."""
    interval = heartbeat_interval() if interval_s is None else interval_s
    key = topology.heartbeat_key(service)
    while not stop.is_set():
        step, state = status()
        beat = Heartbeat(service, participant, step, state, now_ms())
        try:
            await bus.publish(
                topology.EVENTS_EXCHANGE, key, beat, persistent=False, mandatory=False
            )
        except (FoldfedError, OSError) as exc:
            log.warning("heartbeat not sent", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)

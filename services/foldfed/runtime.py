"""How every service process runs: logging and tracing set up, the health server beside it,
and SIGTERM/SIGINT turned into a graceful stop.

A service is an async `body(stop)` that runs until the `stop` event is set and then shuts
down in its own order (stop consuming, drain, flush). `run_service` gives every service the
same process around it, whichever command or entry point starts it (`foldfed <service>`,
the DDP trainer under torchrun): the health settings are read first, so a bad value fails
before anything starts; /healthz and /readyz are served while the body runs when
`FOLDFED_HEALTH_PORT` is set (health.py).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from foldfed.health import HealthSettings

T = TypeVar("T")
ServiceBody = Callable[[asyncio.Event], Awaitable[T]]


def run_service(
    service: str, body: ServiceBody[T], *, participant: str = "", tracing: bool = True
) -> T:
    """Run `body(stop)` as service `service` (of `participant`, for a participant's
    services) until it returns; SIGTERM and SIGINT set `stop`.

    `tracing=False`: no spans from this process (the monitor, which only watches)."""
    # Imported here, not at module level: `foldfed --help` stays fast.
    from foldfed.health import HealthSettings
    from foldfed.logs import configure_logging
    from foldfed.tracing import setup_tracing

    health_settings = HealthSettings.from_env()  # a bad value fails before anything starts
    configure_logging(service, participant)
    if tracing:
        setup_tracing(service, participant)
    return asyncio.run(_serve(body, health_settings))


async def _serve(body: ServiceBody[T], health_settings: HealthSettings | None) -> T:
    from foldfed.health import serve_health

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = await serve_health(health_settings)
    try:
        return await body(stop)
    finally:
        if health is not None:
            await health.close()

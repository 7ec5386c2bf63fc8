"""How every service process runs: logging and tracing set up, the health server beside it,
and SIGTERM/SIGINT turned into a stop that ends within `SHUTDOWN_BOUND_S`, whatever the
service is doing.

A service is an async `body(stop)` that runs until the `stop` event is set and then shuts
down in its own order (stop consuming, drain, flush). `run_service` gives every service the
same process around it, whichever command or entry point starts it (`foldfed <service>`,
the DDP trainer under torchrun): the health settings are read first, so a bad value fails
before anything starts; /healthz and /readyz are served while the body runs when
`FOLDFED_HEALTH_PORT` is set (health.py).

The stop is bounded in three stages (docs/shutdown.md), because a body's orderly stop can
hang on things outside it (a broker that is gone or blocked, a finalize of a large model,
an upload that waits for a receipt):
  1. drain: the body gets `DRAIN_S` to return by itself;
  2. cancel: then it is cancelled, and its finally-blocks (each close bounded) get
     `CANCEL_S`;
  3. hard exit: whatever still holds the process (a worker thread in a long hash or fsync,
     which nothing can cancel, the executor's join at exit, an exporter's flush) ends at
     `HARD_EXIT_S` after the signal: faulthandler writes every thread's stack to stderr (the
     log says where it hung) and exits with status 1.
Stage 3 is a crash as far as the service's state is concerned, which the durable state
already survives: every service is tested under SIGKILL at its worst moments.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import structlog

if TYPE_CHECKING:
    from foldfed.health import HealthSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")
ServiceBody = Callable[[asyncio.Event], Awaitable[T]]

# The promise: a service is gone this long after SIGTERM (Kubernetes waits 30 s by default
# before SIGKILL; compose 10 s). The stages below fit inside it with a margin for the
# interpreter's own exit.
SHUTDOWN_BOUND_S = 10.0
DRAIN_S = 5.0
CANCEL_S = 2.0
HARD_EXIT_S = 8.5
# Closing the health server (a client may hold a connection open); the broker's
# connections have their own bound (bus.CLOSE_S).
CLOSE_S = 2.0


def run_service(
    service: str, body: ServiceBody[T], *, participant: str = "", tracing: bool = True
) -> T | None:
    """Run `body(stop)` as service `service` (of `participant`, for a participant's
    services) until it returns; SIGTERM and SIGINT set `stop`, and the process ends within
    SHUTDOWN_BOUND_S of it. None when the body had to be cancelled.

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


async def _serve(body: ServiceBody[T], health_settings: HealthSettings | None) -> T | None:
    from foldfed.health import serve_health

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    health = await serve_health(health_settings)
    try:
        return await stop_within(asyncio.create_task(body(stop)), stop, DRAIN_S, CANCEL_S)
    finally:
        if health is not None:
            try:
                await asyncio.wait_for(health.close(), CLOSE_S)
            except TimeoutError:
                log.warning("the health server did not close in time", timeout_s=CLOSE_S)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("stopping", signal=sig.name, bound_s=SHUTDOWN_BOUND_S)
        # A C thread of its own: it fires even while every Python thread is stuck.
        faulthandler.dump_traceback_later(HARD_EXIT_S, exit=True, file=sys.stderr)
    stop.set()


async def stop_within(
    task: asyncio.Task[T], stop: asyncio.Event, drain_s: float, cancel_s: float
) -> T | None:
    """`task`'s result; once `stop` is set, at most `drain_s` more for it to end by itself,
    then cancel it and wait at most `cancel_s` (None then). An error the body ends with
    when it was not cancelled is raised, as before."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        await asyncio.wait({task}, timeout=drain_s)
    if task.done():
        return task.result()
    log.warning("the service did not stop by itself; cancelling it", drain_s=drain_s)
    task.cancel()
    await asyncio.wait({task}, timeout=cancel_s)
    if not task.done():
        log.error("the service ignores cancellation; the hard exit will end it")
    elif not task.cancelled() and task.exception() is not None:
        # Whatever the cancellation broke on its way out is expected, not a crash.
        log.warning("the service ended with an error while cancelled", error=repr(task.exception()))
    return None

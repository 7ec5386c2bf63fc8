"""Crash points for crash tests: a real SIGKILL at an exact place in the code.

`FOLDFED_CRASH_AT=<service>:<point>[@<step>]` makes the named process kill itself with
SIGKILL when it reaches that point (for that step, if given). Unset in production; the
check is one dictionary lookup. Tests use it to crash a service *between* two effects
(e.g. the barrier after recording "all delivered" but before releasing), which a kill
from outside can only hit by luck.
"""

from __future__ import annotations

import os
import signal

import structlog

from foldfed.settings import load, variable

log = structlog.get_logger(__name__)
CRASH_AT = variable("crash_at")


def crash_point(service: str, point: str, step: int | None = None) -> None:
    if not os.environ.get(CRASH_AT):  # the cheap check, in production every time
        return
    wanted = load().crash_at
    here = f"{service}:{point}"
    if wanted == here or (step is not None and wanted == f"{here}@{step}"):
        log.warning("crash point reached: SIGKILL", point=wanted)
        os.kill(os.getpid(), signal.SIGKILL)

"""structlog set-up: JSON lines for machines, colours for a person at a terminal.

Every line carries the service name; step, participant and trace ids are bound as
context variables by the code that knows them (structlog.contextvars.bind_contextvars).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(service: str, participant: str = "", level: int = logging.INFO) -> None:
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    if participant:
        structlog.contextvars.bind_contextvars(participant=participant)
    # aio-pika/aiormq log through the standard library; keep their warnings visible.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

"""structlog set-up: JSON lines for machines, colours for a person at a terminal.

Every line carries the service name (and the participant, for a participant's services);
the step is bound as a context variable by the code that knows it
(structlog.contextvars.bind_contextvars); trace_id and span_id are those of the current
span (foldfed.tracing), so a log line leads to its place in the step's trace.
"""

from __future__ import annotations

import logging
import sys

import structlog

from foldfed.tracing import trace_ids


def add_trace_ids(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor: the current span's trace_id and span_id, when there is one."""
    ids = trace_ids()
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


def configure_logging(service: str, participant: str = "", level: int = logging.INFO) -> None:
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
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

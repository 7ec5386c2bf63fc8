"""Traces: one trace per global step, with spans from every service (docs/tracing.md).

The services use a handful of helpers from here and never touch OpenTelemetry themselves:

- `setup_tracing(service, participant)`: once per process, at start (runtime.py's
  `run_service`, which every service's entry point calls). Installs a
  TracerProvider exporting to a JSON-lines file per service under FOLDFED_TRACE_DIR and,
  when OTEL_EXPORTER_OTLP_ENDPOINT is set, to an OTLP/HTTP collector. FOLDFED_TRACING=off
  records nothing: every helper below is then a cheap no-op.
- `span(name, parent=..., step=..., **attributes)`: a context manager for one span.
- `inject(headers)` / `consuming(headers)`: W3C trace context in AMQP headers; the bus calls
  them on every publish and around every handler, so a handler's spans join the sender's.
- `carrier()` / a `Carrier` dict: the same context as plain strings, for spool JSON files
  (the trainer never touches the network).
- `StepTrace`: the barrier's deterministic trace and root span ids of a global step, so a
  restarted barrier keeps every process's spans in one trace per step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from foldfed.digests import digest_of
from foldfed.settings import load

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# StepReleased(t) also carries the context of step t-1's trace: applying U_{t-1} belongs to
# the step that produced it.
UPDATE_TRACEPARENT = "x-foldfed-update-traceparent"
# The trace context of one span as strings: {"traceparent": ..., "tracestate": ...}.
Carrier = dict[str, str]

# Span attribute names (docs/tracing.md).
STEP = "foldfed.step"
PARTICIPANT = "foldfed.participant"
SERVICE = "foldfed.service"
BYTES = "bytes"

_PROPAGATOR = TraceContextTextMapPropagator()
CURRENT: Any = object()  # parent=CURRENT: the span current in this context


class _Installed:
    """What setup_tracing installed in this process (nothing: a no-op tracer)."""

    tracer: trace.Tracer = trace.NoOpTracer()
    provider: Any = None


_installed = _Installed()
# Ids the next span must take (trace id, span id): deterministic spans of the barrier.
_forced_ids: ContextVar[tuple[int, int] | None] = ContextVar("foldfed_forced_ids", default=None)
# The headers of the message being handled (see `consuming`).
_incoming: ContextVar[Mapping[str, Any] | None] = ContextVar("foldfed_incoming", default=None)


# ------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool
    trace_dir: Path
    # OTLP/HTTP export; the exporter reads the standard OTEL_EXPORTER_OTLP_* variables.
    otlp: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TracingSettings:
        s = load(env)
        return cls(
            enabled=s.tracing,
            trace_dir=s.trace_dir,
            otlp=bool(s.otlp_endpoint or s.otlp_traces_endpoint),
        )


def trace_file(trace_dir: Path, service: str, participant: str = "") -> Path:
    """One append-only JSON-lines file per service (and participant)."""
    return trace_dir / (f"{service}-{participant}.jsonl" if participant else f"{service}.jsonl")


def setup_tracing(service: str, participant: str = "", env: Mapping[str, str] = os.environ) -> Any:
    """Install this process's tracer; returns the TracerProvider (None when off).

    Spans are batched (BatchSpanProcessor, OTEL_BSP_* honoured) and flushed at exit: the
    provider shuts down from an atexit hook, which runs after a SIGTERM's graceful stop.
    """
    settings = TracingSettings.from_env(env)
    if not settings.enabled:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from foldfed.tracing.files import JsonLinesExporter

    resource = Resource.create(
        {
            "service.name": service,
            "service.namespace": "foldfed",
            "service.instance.id": participant or "hub",
            PARTICIPANT: participant,
        }
    )
    provider = TracerProvider(resource=resource, id_generator=_ids())
    provider.add_span_processor(_stamp(service, participant))
    exporter = JsonLinesExporter(trace_file(settings.trace_dir, service, participant))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if settings.otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(timeout=_otlp_timeout(env)))
        )
    install(provider)
    return provider


# The OTLP exporter retries a failed export with backoff until its timeout (OpenTelemetry's
# default: 10 s). The last flush runs at exit, after a SIGTERM's graceful stop, so with a
# collector that is gone it would hold the stop past the service's bound (docs/shutdown.md;
# measured: 6.9 s for one pending span with nothing listening). Spans are a diagnostic, not
# state: a stop drops them after this long, and the JSON-lines file keeps its own copy.
OTLP_TIMEOUT_S = 2.0
_OTLP_TIMEOUT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")


def _otlp_timeout(env: Mapping[str, str]) -> float | None:
    """OTLP_TIMEOUT_S, unless the operator set OpenTelemetry's own timeout (None: the
    exporter reads it)."""
    return None if any(env.get(name) for name in _OTLP_TIMEOUT_VARS) else OTLP_TIMEOUT_S


def install(provider: Any) -> None:
    """Use `provider` for every span of this process (tests install an in-memory one)."""
    _installed.provider = provider
    _installed.tracer = provider.get_tracer("foldfed")


def uninstall() -> None:
    """Back to the no-op tracer (tests). Does not shut the provider down."""
    _installed.provider = None
    _installed.tracer = trace.NoOpTracer()


def flush() -> None:
    """Export every finished span now (before a planned exit, in tests)."""
    if _installed.provider is not None:
        _installed.provider.force_flush()


def _ids() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _Ids(RandomIdGenerator):
        """Random ids, except where the barrier asks for its deterministic ones."""

        def generate_span_id(self) -> int:
            forced = _forced_ids.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()
            return forced[0] if forced else super().generate_trace_id()

    return _Ids()


def _stamp(service: str, participant: str) -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    class _Stamp(SpanProcessor):
        """Every span says which service (and participant) made it, unless it names the
        participant it is about (the hub's spans for a participant's delta)."""

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            attributes = span.attributes or {}
            if SERVICE not in attributes:
                span.set_attribute(SERVICE, service)
            if participant and PARTICIPANT not in attributes:
                span.set_attribute(PARTICIPANT, participant)

    return _Stamp()


# ------------------------------------------------------------------------------- spans


def _parent_context(parent: Any) -> otel_context.Context | None:
    if parent is CURRENT:
        return None
    if isinstance(parent, SpanContext):
        return trace.set_span_in_context(NonRecordingSpan(parent))
    if parent is None:
        return otel_context.Context()  # no known parent: a trace of its own
    return _PROPAGATOR.extract(_strings(parent), context=otel_context.Context())


def _attributes(step: int | None, participant: str | None, extra: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    if step is not None:
        out[STEP] = int(step)
    if participant:
        out[PARTICIPANT] = participant
    for key, value in extra.items():
        if value is not None:
            out[key] = value
    return out


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: Any = CURRENT,
    step: int | None = None,
    participant: str | None = None,
    **attributes: Any,
) -> Iterator[Span]:
    """One span around the block, current inside it (asyncio.to_thread carries it into the
    worker thread). `parent`: the current span (default), a Carrier from a message or a
    spool file, a SpanContext, or None for a new trace. An exception marks it failed."""
    started = _installed.tracer.start_span(
        name,
        context=_parent_context(parent),
        attributes=_attributes(step, participant, attributes),
    )
    with trace.use_span(started, end_on_exit=True):
        yield started


def child_span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span only under a current, valid span (no stray traces from, e.g., a replay at
    start-up, which runs outside any message)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return contextlib.nullcontext()
    return span(name, **attributes)


def emit_span(
    name: str,
    *,
    parent: Any,
    start_ns: int,
    end_ns: int,
    step: int | None = None,
    participant: str | None = None,
    ids: tuple[int, int] | None = None,
    **attributes: Any,
) -> None:
    """A span recorded after the fact (the barrier's step and wait spans), with given
    times and, if `ids` is set, given (trace id, span id)."""
    token = _forced_ids.set(ids) if ids is not None else None
    try:
        made = _installed.tracer.start_span(
            name,
            context=_parent_context(parent),
            attributes=_attributes(step, participant, attributes),
            start_time=start_ns,
        )
    finally:
        if token is not None:
            _forced_ids.reset(token)
    made.end(end_time=max(end_ns, start_ns))


def annotate(step: int | None = None, participant: str | None = None, **attributes: Any) -> None:
    """Add attributes to the current span (no-op without one)."""
    current = trace.get_current_span()
    if current.is_recording():
        for key, value in _attributes(step, participant, attributes).items():
            current.set_attribute(key, value)


def current_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, or None: for log lines."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


# ------------------------------------------------------------------------------- propagation


def _strings(headers: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in (TRACEPARENT, TRACESTATE):
        value = headers.get(key)
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("ascii", "replace")
        if isinstance(value, str):
            out[key] = value
    return out


def carrier(ctx: SpanContext | None = None) -> Carrier:
    """The W3C headers of the current span (or of `ctx`); empty without one."""
    out: Carrier = {}
    context = None if ctx is None else trace.set_span_in_context(NonRecordingSpan(ctx))
    _PROPAGATOR.inject(out, context=context)
    return out


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """Add the current span's traceparent (and tracestate) to AMQP headers, unless the
    caller already set one; returns `headers`."""
    if TRACEPARENT not in headers:
        _PROPAGATOR.inject(headers)
    return headers


@contextlib.contextmanager
def consuming(headers: Mapping[str, Any]) -> Iterator[None]:
    """Handle a message as a child of its sender's span (from `traceparent`)."""
    extracted = _PROPAGATOR.extract(_strings(headers), context=otel_context.Context())
    token = otel_context.attach(extracted)
    incoming = _incoming.set(headers)
    try:
        yield
    finally:
        _incoming.reset(incoming)
        otel_context.detach(token)


def incoming_carrier(header: str) -> Carrier:
    """The context a header of the message being handled names (e.g.
    UPDATE_TRACEPARENT), as a Carrier; empty if it has none."""
    headers = _incoming.get() or {}
    return _strings({TRACEPARENT: headers.get(header)})


# ------------------------------------------------------------------------------- step traces


@dataclass(frozen=True)
class StepTrace:
    """A global step's trace id and root span id, derived from facts the barrier keeps
    durably (cycle, step, when it opened, the model it opened with), so a barrier that
    restarts mid-step puts its spans, and the contexts it sends, in the same trace."""

    step: int
    trace_id: int
    root_span_id: int

    @classmethod
    def derive(cls, cycle: int, step: int, opened_ms: int, base_digest: bytes) -> StepTrace:
        key = f"foldfed.trace/1/{cycle}/{step}/{opened_ms}/".encode() + base_digest
        digest = digest_of(key)
        trace_id = int.from_bytes(digest[:16], "big") or 1
        span_id = int.from_bytes(digest[16:24], "big") or 1
        return cls(step, trace_id, span_id)

    def span_id_for(self, label: str) -> int:
        """Another deterministic span id in this trace (a span emitted again after a
        restart keeps its id, so readers can drop the repeat)."""
        raw = digest_of(self.trace_id.to_bytes(16, "big") + label.encode())
        return int.from_bytes(raw[:8], "big") or 1

    @property
    def root(self) -> SpanContext:
        return SpanContext(
            self.trace_id,
            self.root_span_id,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )

    def contains_current(self) -> bool:
        """Whether the current span belongs to this step's trace."""
        return current_context().trace_id == self.trace_id

    def parent(self) -> SpanContext | Any:
        """The current span if it is in this trace, else the root."""
        return CURRENT if self.contains_current() else self.root

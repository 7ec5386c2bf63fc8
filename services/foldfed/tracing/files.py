"""The JSON-lines span exporter: a run can be inspected with no collector at all.

One file per service (and participant), append-only, one finished span per line:

    {"trace_id": 32 hex, "span_id": 16 hex, "parent_id": 16 hex or null, "name": str,
     "kind": str, "start_ns": int, "end_ns": int, "status": "UNSET" | "OK" | "ERROR",
     "service": str, "participant": str, "attributes": {str: value},
     "events": [{"name": str, "time_ns": int, "attributes": {...}}]}

A batch is written with one write() to a file opened O_APPEND, so a restarted service (or
a second process of the same name) appends whole lines after the earlier ones.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def _value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_value(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _attrs(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: _value(value) for key, value in (attributes or {}).items()}


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One line of the file, as a dict."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    resource = span.resource.attributes if span.resource is not None else {}
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "service": str(resource.get("service.name", "")),
        "participant": str(resource.get("foldfed.participant", "")),
        "attributes": _attrs(span.attributes),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": _attrs(e.attributes)}
            for e in span.events
        ],
    }


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        data = "".join(
            json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n" for s in spans
        ).encode("utf-8")
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

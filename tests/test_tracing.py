"""Tracing without a federation: the span helpers and their JSON-lines files, W3C context
through AMQP headers (real broker) and spool files, log lines with trace ids, and the pure
tree behind `foldfed trace`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from foldfed import topology, tracing
from foldfed.bus import Bus, Incoming
from foldfed.config import BusSettings
from foldfed.domain import StepReleased
from foldfed.errors import ConfigError, StoreError
from foldfed.logs import add_trace_ids
from foldfed.spool import Spool
from foldfed.tracing.files import JsonLinesExporter
from foldfed.tracing.tree import (
    NoTrace,
    SpanRecord,
    build_tree,
    parse_lines,
    read_folder,
    render,
    spans_of_step,
)

from conftest import PARTICIPANTS, BrokerHandle, reset_topology

D1 = bytes(range(32))


@pytest.fixture
def traces(tmp_path: Path) -> Iterator[Path]:
    """This process traced as the service "svc" of participant "org-a", spans written at
    once (no batching) to tmp_path/svc-org-a.jsonl."""
    path = tracing.trace_file(tmp_path, "svc", "org-a")
    provider = TracerProvider(
        resource=Resource.create({"service.name": "svc", "foldfed.participant": "org-a"}),
        id_generator=tracing._ids(),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(tracing._stamp("svc", "org-a"))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    tracing.install(provider)
    try:
        yield tmp_path
    finally:
        tracing.uninstall()
        provider.shutdown()


def _spans(folder: Path) -> dict[str, SpanRecord]:
    spans, problems = read_folder(folder)
    assert not problems
    return {s.name: s for s in spans}


# ------------------------------------------------------------------------------- helpers


def test_spans_nest_and_carry_the_foldfed_attributes(traces: Path) -> None:
    with tracing.span("outer", step=4) as outer:
        with tracing.span("inner", **{tracing.BYTES: 10}):
            tracing.annotate(step=4, chunks=2)
        with pytest.raises(ValueError), tracing.span("failing"):
            raise ValueError("boom")
    assert outer.get_span_context().is_valid
    spans = _spans(traces)
    assert spans["inner"].parent_id == spans["outer"].span_id
    assert spans["inner"].trace_id == spans["outer"].trace_id
    assert spans["outer"].parent_id is None
    assert spans["inner"].attributes == {
        "bytes": 10,
        "chunks": 2,
        "foldfed.step": 4,
        "foldfed.service": "svc",
        "foldfed.participant": "org-a",
    }
    assert spans["failing"].status == "ERROR"
    line = json.loads((traces / "svc-org-a.jsonl").read_text().splitlines()[0])
    assert set(line) == {
        "trace_id",
        "span_id",
        "parent_id",
        "name",
        "kind",
        "start_ns",
        "end_ns",
        "status",
        "service",
        "participant",
        "attributes",
        "events",
    }
    assert line["service"] == "svc" and line["participant"] == "org-a"


def test_a_carrier_parents_a_span_in_another_place(traces: Path) -> None:
    with tracing.span("sender"):
        carried = tracing.carrier()
    assert carried[tracing.TRACEPARENT].startswith("00-")
    with tracing.span("receiver", parent=carried):
        pass
    with tracing.span("unrelated", parent=None):
        pass
    with tracing.span("from garbage", parent={"traceparent": "not a traceparent"}):
        pass
    spans = _spans(traces)
    assert spans["receiver"].parent_id == spans["sender"].span_id
    assert spans["receiver"].trace_id == spans["sender"].trace_id
    assert spans["unrelated"].parent_id is None
    assert spans["unrelated"].trace_id != spans["sender"].trace_id
    # An unreadable context starts a trace of its own rather than failing the work.
    assert spans["from garbage"].parent_id is None


def test_headers_carry_the_context_and_a_handler_runs_under_it(traces: Path) -> None:
    with tracing.span("publish"):
        headers = tracing.inject({"x-foldfed-reason": "kept"})
        # A caller's own traceparent is left alone.
        assert tracing.inject({"traceparent": "mine"}) == {"traceparent": "mine"}
    assert headers["x-foldfed-reason"] == "kept" and tracing.TRACEPARENT in headers
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # AMQP may hand header values back as bytes.
    encoded = {
        tracing.TRACEPARENT: headers[tracing.TRACEPARENT].encode(),
        tracing.UPDATE_TRACEPARENT: other,
    }
    with tracing.consuming(encoded):
        assert tracing.incoming_carrier(tracing.UPDATE_TRACEPARENT) == {"traceparent": other}
        with tracing.span("handle"):
            pass
    assert tracing.incoming_carrier(tracing.UPDATE_TRACEPARENT) == {}
    assert tracing.inject({}) == {}  # no current span: nothing to carry
    spans = _spans(traces)
    assert spans["handle"].parent_id == spans["publish"].span_id


def test_child_span_only_under_a_span(traces: Path) -> None:
    with tracing.child_span("stray"):
        pass
    with tracing.span("parent"), tracing.child_span("child"):
        pass
    spans = _spans(traces)
    assert "stray" not in spans
    assert spans["child"].parent_id == spans["parent"].span_id


def test_step_traces_are_deterministic_and_distinct() -> None:
    a = tracing.StepTrace.derive(1, 5, 1_700_000_000_000, D1)
    assert a == tracing.StepTrace.derive(1, 5, 1_700_000_000_000, D1)
    others = {
        tracing.StepTrace.derive(1, 6, 1_700_000_000_000, D1),
        tracing.StepTrace.derive(2, 5, 1_700_000_000_000, D1),
        tracing.StepTrace.derive(1, 5, 1_700_000_000_001, D1),  # another run
        tracing.StepTrace.derive(1, 5, 1_700_000_000_000, bytes(32)),
    }
    assert a.trace_id not in {o.trace_id for o in others}
    assert a.span_id_for("barrier.wait") == a.span_id_for("barrier.wait") != a.root_span_id


def test_emitted_spans_take_the_step_ids_so_a_repeat_is_one_span(traces: Path) -> None:
    step = tracing.StepTrace.derive(1, 2, 1_000, D1)
    for _ in range(2):  # a barrier restarted after writing the root writes it again
        tracing.emit_span(
            "step",
            parent=None,
            start_ns=1_000_000_000,
            end_ns=3_000_000_000,
            step=2,
            ids=(step.trace_id, step.root_span_id),
        )
    with tracing.span("release", parent=step.root, step=2):
        assert step.contains_current()
        assert step.parent() is tracing.CURRENT
    assert step.parent() == step.root
    spans, _ = read_folder(traces)
    assert len(spans) == 3
    chosen = spans_of_step(spans, 2)
    assert [s.name for s in chosen] == ["step", "release"]
    root, release = chosen
    assert root.trace_id == f"{step.trace_id:032x}" and root.span_id == f"{step.root_span_id:016x}"
    assert (root.start_ns, root.end_ns) == (1_000_000_000, 3_000_000_000)
    assert release.parent_id == root.span_id and release.trace_id == root.trace_id


def test_settings_and_switching_tracing_off(tmp_path: Path) -> None:
    off = {"FOLDFED_TRACING": "off", "FOLDFED_TRACE_DIR": str(tmp_path)}
    assert tracing.setup_tracing("svc", env=off) is None
    with tracing.span("nothing"):
        assert tracing.carrier() == {}
    assert list(tmp_path.iterdir()) == []
    settings = tracing.TracingSettings.from_env({})
    assert settings.enabled and settings.trace_dir == Path("var/traces") and not settings.otlp
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
    assert tracing.TracingSettings.from_env(otlp).otlp
    with pytest.raises(ConfigError, match="FOLDFED_TRACING"):
        tracing.TracingSettings.from_env({"FOLDFED_TRACING": "maybe"})


def test_log_lines_get_the_current_span_ids(traces: Path) -> None:
    assert add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}
    with tracing.span("logging") as current:
        ctx = current.get_span_context()
        line = add_trace_ids(None, "info", {"event": "x"})
    assert line == {
        "event": "x",
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
    }


# ------------------------------------------------------------------------------- spool


def test_spool_files_carry_trace_contexts(tmp_path: Path, traces: Path) -> None:
    context = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    update = {"traceparent": "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"}
    spool = Spool(tmp_path / "spool", trace_carrier=tracing.carrier)
    spool.write_release(1, D1, None, trace=context, update_trace=update)
    release = spool.next_release(0)
    assert release is not None
    assert release.trace == context and release.update_trace == update
    # Without an explicit context the writer's current span goes into the file.
    with tracing.span("evaluate"):
        spool.write_model_report(1, D1, {"eval_loss": 0.5})
        expected = tracing.carrier()
    (report,) = spool.pending_model_reports()
    assert report.trace == expected
    delta = tmp_path / "delta.bin"
    delta.write_bytes(b"x" * 16)
    spool.write_delta(1, delta, 2.0, D1, {}, trace=context)
    (record,) = spool.pending_deltas()
    assert record.trace == context
    # A spool without the hook and a file without the field: no context, as before.
    plain = Spool(tmp_path / "plain")
    plain.write_release(1, D1, None)
    assert "trace" not in json.loads(plain.release_path(1).read_text())
    assert plain.next_release(0).trace == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [["00-ab"], {"traceparent": 7}, {"baggage": "x"}, {"traceparent": "0" * 2000}],
    ids=["list", "number", "unknown-key", "too-long"],
)
def test_bad_trace_fields_are_refused_with_the_reason(tmp_path: Path, bad: object) -> None:
    spool = Spool(tmp_path)
    spool.write_release(1, D1, None)
    body = {**json.loads(spool.release_path(1).read_text()), "trace": bad}
    spool.release_path(1).write_text(json.dumps(body))
    with pytest.raises(StoreError, match=r"release-000000000001\.json: trace"):
        spool.next_release(0)
    with pytest.raises(ValueError, match="trace context"):
        spool.write_release(2, D1, None, trace=bad if isinstance(bad, dict) else {"x": "y"})


# ------------------------------------------------------------------------------- the broker


@pytest.mark.broker
async def test_a_handler_over_the_real_broker_joins_the_senders_trace(
    broker: BrokerHandle, traces: Path
) -> None:
    await reset_topology(broker.admin_url)
    settings = BusSettings(broker.admin_url, publish_timeout_s=10, inflight_window=4)
    bus = await Bus.connect(settings, "tracing-test")
    try:
        await bus.declare_hub_topology(PARTICIPANTS)
        release = StepReleased(7, D1, PARTICIPANTS, 0)
        with tracing.span("release", step=7) as sent:
            await bus.publish(topology.CONTROL_EXCHANGE, "", release)
        got: list[tuple[Incoming, int, int]] = []
        stop = asyncio.Event()

        async def handler(incoming: Incoming) -> None:
            with tracing.span("handled") as span:
                ctx = span.get_span_context()
                got.append((incoming, ctx.trace_id, ctx.span_id))
            await incoming.raw.ack()
            stop.set()

        await asyncio.wait_for(bus.consume(topology.INGEST_QUEUE, handler, stop=stop), 30)
    finally:
        await bus.close()
    ((incoming, trace_id, _),) = got
    assert trace_id == sent.get_span_context().trace_id
    assert tracing.TRACEPARENT in incoming.headers
    spans = _spans(traces)
    assert spans["handled"].parent_id == spans["release"].span_id


# ------------------------------------------------------------------------------- the tree


def rec(
    name: str,
    span_id: str,
    parent: str | None,
    start: int,
    end: int,
    *,
    trace: str = "a" * 32,
    step: int | None = 1,
    service: str = "barrier",
    participant: str = "",
) -> SpanRecord:
    attributes = {} if step is None else {"foldfed.step": step}
    parent_id = None if parent is None else parent.ljust(16, "0")
    return SpanRecord(
        trace, span_id.ljust(16, "0"), parent_id, name, start, end, service, participant, attributes
    )


def test_a_steps_trace_is_the_one_under_its_latest_root() -> None:
    old = rec("step", "1", None, 0, 10, trace="b" * 32)
    new = rec("step", "2", None, 100, 200)
    child = rec("release", "3", "2", 110, 120)
    other_step = rec("step", "4", None, 300, 400, trace="c" * 32, step=2)
    chosen = spans_of_step([child, old, new, other_step, child], 1)
    assert chosen == [new, child]  # the repeat of `child` counted once
    with pytest.raises(NoTrace, match=r"no trace for step 5 \(steps with spans: 1, 2\)"):
        spans_of_step([old, other_step], 5)
    with pytest.raises(NoTrace, match="steps with spans: none"):
        spans_of_step([], 1)


def test_without_a_root_the_trace_most_spans_of_the_step_are_in() -> None:
    a = [rec("upload", str(i), "f", i, i + 1, trace="d" * 32) for i in range(1, 4)]
    b = [rec("upload", "9", "f", 0, 1, trace="e" * 32)]
    assert {s.trace_id for s in spans_of_step(a + b, 1)} == {"d" * 32}


def test_tree_orders_children_by_start_and_flags_orphans() -> None:
    root = rec("step", "1", None, 0, 1_000_000_000)
    late = rec("finalize", "2", "1", 500, 600, service="aggregator")
    early = rec("release", "3", "1", 100, 200)
    grandchild = rec("train", "4", "3", 150, 190, service="trainer", participant="org-a")
    orphan = rec("upload", "5", "9", 50, 60, service="uploader", participant="org-b")
    (first, second) = build_tree([late, grandchild, orphan, early, root])
    assert first.span is root and not first.orphan
    assert [c.span for c in first.children] == [early, late]
    assert [c.span for c in first.children[0].children] == [grandchild]
    assert second.span is orphan and second.orphan


def test_render_indents_shows_durations_and_cuts_long_runs() -> None:
    root = rec("step", "1", None, 0, 2_500_000_000)
    release = rec("release", "2", "1", 1_000_000, 13_000_000)
    chunks = [
        SpanRecord(
            "a" * 32,
            f"c{i}".ljust(16, "0"),
            "2".ljust(16, "0"),
            "ingest.chunk",
            20_000_000 + i,
            21_000_000 + i,
            "aggregator",
            "",
            {"bytes": 1024, "foldfed.step": 1},
        )
        for i in range(5)
    ]
    text = render([root, release, *chunks], 1, max_same=2)
    assert text.splitlines() == [
        f"step 1: trace {'a' * 32}, 7 spans from 2 processes, 2.500 s first to last",
        "step  [barrier]  2.500 s  at +0.000 s",
        "└─ release  [barrier]  12.0 ms  at +0.001 s",
        "   ├─ ingest.chunk  [aggregator]  1.0 ms  at +0.020 s  bytes=1024",
        "   ├─ ingest.chunk  [aggregator]  1.0 ms  at +0.020 s  bytes=1024",
        "   └─ … 3 more ingest.chunk spans (3.0 ms in all)",
    ]


def test_bad_lines_are_skipped_and_told() -> None:
    good = json.dumps(
        {
            "trace_id": "a" * 32,
            "span_id": "b" * 16,
            "parent_id": None,
            "name": "step",
            "start_ns": 1,
            "end_ns": 2,
            "attributes": {"foldfed.step": 1},
        }
    )
    lines = [good, '{"trace_id": "x"', json.dumps({"trace_id": "A" * 32, "name": "x"}), "", "[1]"]
    spans, problems = parse_lines(lines, "f.jsonl")
    assert [s.name for s in spans] == ["step"]
    assert problems == [
        "f.jsonl:2: not JSON: Expecting ',' delimiter: line 1 column 17 (char 16)",
        "f.jsonl:3: trace_id must be 32 hex digits, got 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'",
        "f.jsonl:5: not a JSON object",
    ]


# ------------------------------------------------------------------------------- exporters


def test_a_process_exports_to_its_file_and_to_an_otlp_collector_at_exit(tmp_path: Path) -> None:
    """A real OTLP/HTTP exporter against a real HTTP server standing in for the collector;
    the spans leave at the process's exit (the provider's atexit shutdown)."""
    import http.server
    import subprocess
    import sys
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    bodies: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            bodies.append((self.path, self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "PATH": "/usr/bin:/bin",
        "FOLDFED_TRACE_DIR": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
    }
    code = (
        "from foldfed import tracing\n"
        "tracing.setup_tracing('uploader', 'org-a')\n"
        "with tracing.span('upload', step=2):\n"
        "    pass\n"
    )
    try:
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    finally:
        server.shutdown()
    ((path, body),) = bodies
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "uploader"
    assert resource["foldfed.participant"] == "org-a"
    (otlp_span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert otlp_span.name == "upload"
    (local,) = _spans(tmp_path).values()
    assert local.name == "upload" and local.span_id == otlp_span.span_id.hex()
    assert (tmp_path / "uploader-org-a.jsonl").exists()


def test_a_gone_collector_cannot_hold_a_stop_past_the_bound() -> None:
    # The last flush runs at exit; OpenTelemetry's own 10 s export timeout would outlast
    # the service's stop bound when the collector is gone (docs/shutdown.md).
    from foldfed.runtime import DRAIN_S, HARD_EXIT_S
    from foldfed.tracing import OTLP_TIMEOUT_S, _otlp_timeout

    assert _otlp_timeout({}) == OTLP_TIMEOUT_S
    assert DRAIN_S + OTLP_TIMEOUT_S < HARD_EXIT_S
    # An operator's own setting wins (the exporter then reads it).
    assert _otlp_timeout({"OTEL_EXPORTER_OTLP_TIMEOUT": "30"}) is None
    assert _otlp_timeout({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "5"}) is None

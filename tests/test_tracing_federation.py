"""A whole federated run over the real broker, every service a real process writing its
spans to a JSON-lines file: each global step is one trace holding every service's spans,
correctly parented, and `foldfed trace STEP` prints it."""

from __future__ import annotations

import asyncio
import subprocess
from collections import defaultdict

import pytest

from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _watch
from foldfed.demo.observer import RunRecord
from foldfed.settings import env_for
from foldfed.tracing.tree import SpanRecord, read_folder, spans_of_step

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STEPS = 2


def run_traced(broker: BrokerHandle, workdir, crash: tuple[str, str] | None = None):
    """A whole run; `crash=(process, FOLDFED_CRASH_AT value)`: that process SIGKILLs
    itself there and is started again."""
    asyncio.run(reset_topology(broker.admin_url))
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        # Small rounds and small chunks: several chunks per delta, a quick run.
        common_env=env_for(seed=3, local_steps=3, grad_accum=2, chunk_size=1 << 20),
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    from foldfed.trainer.task import initial_model

    initial_model(federation.initial_model, 3)
    record = RunRecord(spec.participants, spec.steps)
    if crash is not None:
        federation.crash_env = {crash[0]: {"FOLDFED_CRASH_AT": crash[1]}}
    try:
        asyncio.run(_watch_with_restarts(federation, record))
    finally:
        federation.stop()  # SIGTERM: every process flushes its spans on the way out
    if crash is not None:
        assert federation.restarted == {crash[0]}, "the crash point was never reached"
    spans, problems = read_folder(federation.trace_dir)
    assert not problems, problems
    return federation, spans


async def _watch_with_restarts(federation: LocalFederation, record: RunRecord) -> None:
    task = asyncio.create_task(_watch(federation, record, timeout_s=300))
    while not task.done():
        await asyncio.sleep(0.1)
        for process in federation.dead():
            if process.name not in federation.restarted:
                assert process.proc.returncode == -9, process.log()  # its crash point
                federation.restarted.add(process.name)
                federation.restart(process.name)
    await task


@pytest.fixture(scope="module")
def traced_run(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run_traced(broker, tmp_path_factory.mktemp("traced"))


def _by_id(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    return {s.span_id: s for s in spans}


def _one(spans: list[SpanRecord], name: str, participant: str = "", **attrs: object) -> SpanRecord:
    found = [
        s
        for s in spans
        if s.name == name
        and (not participant or s.attributes.get("foldfed.participant") == participant)
        and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, (name, participant, attrs, found)
    return found[0]


def test_every_process_writes_its_own_trace_file(traced_run) -> None:
    federation, _ = traced_run
    names = {p.name for p in federation.trace_dir.glob("*.jsonl")}
    expected = {"aggregator.jsonl", "barrier.jsonl"}
    for p in PARTICIPANTS:
        expected |= {f"uploader-{p}.jsonl", f"trainer-{p}.jsonl"}
    assert expected <= names


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_each_step_is_one_trace_with_every_service_correctly_parented(
    traced_run, step: int
) -> None:
    _, all_spans = traced_run
    spans = spans_of_step(all_spans, step)
    ids = _by_id(spans)
    (trace_id,) = {s.trace_id for s in spans}
    # Every span labelled with this step lives in this one trace (nothing strayed).
    assert {s.trace_id for s in all_spans if s.step == step} == {trace_id}

    # One root, the barrier's step span; every other parent resolves inside the trace.
    roots = [s for s in spans if s.parent_id is None]
    assert [(r.name, r.service) for r in roots] == [("step", "barrier")]
    root = roots[0]
    assert all(s.parent_id in ids for s in spans if s is not root)

    services = {(s.service, s.participant) for s in spans}
    for p in PARTICIPANTS:
        assert ("trainer", p) in services and ("uploader", p) in services
    assert {"aggregator", "barrier"} <= {s.service for s in spans}

    release = _one(spans, "release")
    assert release.parent_id == root.span_id and release.service == "barrier"
    wait = _one(spans, "barrier.wait")
    assert wait.parent_id == root.span_id
    opened = _one(spans, "open_step")
    assert opened.service == "aggregator" and opened.parent_id == release.span_id

    for p in PARTICIPANTS:
        received = _one(spans, "receive_release", p)
        assert received.service == "uploader" and received.parent_id == release.span_id
        # The trainer's spans hang under the release its uploader wrote to the spool.
        train = _one(spans, "train", p)
        evaluate = _one(spans, "evaluate", p)
        assert train.service == evaluate.service == "trainer"
        assert train.parent_id == evaluate.parent_id == received.span_id
        assert train.attributes["k"] == 3
        # The delta's upload under the training that made it, after it.
        upload = _one(spans, "upload", p)
        assert upload.service == "uploader" and upload.parent_id == train.span_id
        assert upload.start_ns >= train.end_ns
        assert upload.attributes["chunks"] >= 1 and upload.attributes["bytes"] > 0
        assert _one(spans, "encode", p).parent_id == upload.span_id
        # The hub's handling of every chunk under that upload, each summed in.
        chunks = [
            s
            for s in spans
            if s.name == "ingest.chunk" and s.attributes.get("foldfed.participant") == p
        ]
        assert len(chunks) == upload.attributes["chunks_sent"]
        assert all(c.parent_id == upload.span_id and c.service == "aggregator" for c in chunks)
        sums = [s for s in spans if s.name == "aggregate" and ids[s.parent_id] in chunks]
        assert len(sums) == len(chunks)
        # The barrier heard of the delivery from the hub's handling of the last chunk.
        delivered = _one(spans, "delivered", p)
        assert delivered.service == "barrier" and ids[delivered.parent_id] in chunks
        # The model this step trained from was reported and checked.
        report = _one(spans, "report", p)
        assert report.parent_id == evaluate.span_id
        assert _one(spans, "model_report", p).parent_id == report.span_id

    # Close, finalize, and the update going out to every participant, in this trace.
    close = _one(spans, "close")
    finalize = _one(spans, "finalize")
    assert finalize.service == "aggregator" and finalize.parent_id == close.span_id
    broadcast = _one(spans, "broadcast")
    assert ids[broadcast.parent_id] is finalize
    finalized = _one(spans, "finalized")
    assert finalized.service == "barrier" and finalized.parent_id == finalize.span_id
    # Update chunks made final before the last delivery go out early (progressive
    # finalize), under the hub's handling of the chunk that completed them.
    early = {s.span_id for s in spans if s.name == "broadcast.early"}
    for s in spans:
        if s.name == "broadcast.early":
            assert s.service == "aggregator" and ids[s.parent_id].name == "ingest.chunk"
    downloads = defaultdict(list)
    for s in spans:
        if s.name == "download":
            assert s.parent_id == broadcast.span_id or s.parent_id in early
            downloads[s.participant].append(s)
    assert set(downloads) == set(PARTICIPANTS)
    # Applying this step's update (at the next release) belongs to this step's trace.
    for p in PARTICIPANTS:
        assemble = _one(spans, "assemble", p)
        assert assemble.parent_id == finalized.span_id
        assert _one(spans, "apply", p).parent_id == assemble.span_id


def test_steps_have_different_traces_and_the_final_release_its_own(traced_run) -> None:
    _, all_spans = traced_run
    traces = {spans_of_step(all_spans, step)[0].trace_id for step in range(1, STEPS + 2)}
    assert len(traces) == STEPS + 1
    final = spans_of_step(all_spans, STEPS + 1)
    release = _one(final, "release", final=True)
    for p in PARTICIPANTS:
        received = _one(final, "receive_release", p)
        assert received.parent_id == release.span_id
        assert _one(final, "evaluate", p).parent_id == received.span_id
    assert not [s for s in final if s.name == "train"]


def test_foldfed_trace_prints_the_tree(traced_run) -> None:
    federation, _ = traced_run
    out = subprocess.run(
        [*FOLDFED, "trace", "1", "--dir", str(federation.trace_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("step 1: trace ")
    assert lines[1].startswith("step  [barrier]")
    assert any("─ release  [barrier]" in line for line in lines)
    for p in PARTICIPANTS:
        assert f"train  [trainer {p}]" in out and f"upload  [uploader {p}]" in out
    missing = subprocess.run(
        [*FOLDFED, "trace", "99", "--dir", str(federation.trace_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "no trace for step 99 (steps with spans: 1, 2, 3)" in missing.stderr


def test_log_lines_carry_trace_and_span_ids(traced_run) -> None:
    federation, all_spans = traced_run
    import json

    span_ids = {s.span_id for s in all_spans}
    log = (federation.logs / "aggregator.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    delivered = [line for line in lines if line.get("event") == "delivered"]
    assert delivered and all(line["service"] == "aggregator" for line in delivered)
    assert all(line["span_id"] in span_ids for line in delivered)
    assert all(len(line["trace_id"]) == 32 and "step" in line for line in delivered)


def test_a_barrier_killed_mid_step_keeps_each_step_in_one_trace(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGKILL after step 1 closed and its finalize committed, before release 2 went out:
    the restarted barrier derives the same trace ids from its store."""
    _, spans = run_traced(
        broker,
        tmp_path_factory.mktemp("barrier-crash"),
        crash=("barrier", "barrier:before-release@2"),
    )
    for step in (1, 2):
        chosen = spans_of_step(spans, step)
        (root,) = [s for s in chosen if s.parent_id is None and s.name == "step"]
        # Every participant's spans of the step are in the root's trace, the ones made
        # before the crash (step 1) as well as after.
        assert {s.trace_id for s in spans if s.step == step} == {root.trace_id}
        for p in PARTICIPANTS:
            assert _one(chosen, "train", p).trace_id == root.trace_id
    # Step 2 began after the restart: complete, every parent in the trace.
    step2 = spans_of_step(spans, 2)
    ids = _by_id(step2)
    assert all(s.parent_id in ids for s in step2 if s.parent_id is not None)
    assert len([s for s in step2 if s.parent_id is None]) == 1

"""What tracing costs: global steps of a whole federation with tracing on vs off, same run.

    .venv/bin/python bench/tracing_overhead.py [--participants 3] [--steps 4] [--pairs 2]
        [--quick]

What runs: one private RabbitMQ, then `--pairs` pairs of whole federated runs (hub and, per
participant, trainer and uploader, every one a real process, foldfed.demo.cluster), the two
runs of a pair identical except FOLDFED_TRACING=off in one; the order alternates (off/on,
on/off, ...) so that drift (page cache, CPU frequency) falls on both. The trainer's rounds
are kept short (--local-steps) so that the parts tracing touches (messages, spool files,
uploads) weigh as much as they can against training.

What is timed: a step = the release of step t to the release of step t+1, on this
process's monotonic clock, seen from the events exchange (demo.observer). The first step of
each run is left out (processes still warming up). Reported: the median step of each mode and
their ratio (on / off), with the spread over runs.

Second measurement, in this process, no broker: the cost of one traced message, the work the
services add per message (a span with the foldfed attributes, traceparent injected into the
headers, extracted again on the other side and a child span under it, both exported through
the BatchSpanProcessor to a JSON-lines file), against the same code with tracing off. Times
the spans per step counted in the traced runs' files, this estimates the overhead per step
without the noise of whole runs.

Memory: peak RSS (VmHWM) of every service process, polled from /proc, summed per mode.
Results also go to bench/results/tracing-overhead-<UTC time>.json. The output ends with one
machine-readable line:

    RESULT ratio_on_off=<x> cpu_fraction=<x> peak_rss_mib_on=<MiB> peak_rss_mib_off=<MiB>

`--quick` is a smoke run (2 participants, one pair of 2-step runs, K = 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchkit import (
    BenchError,
    ResultValue,
    add_quick_option,
    clean_env,
    code_version,
    read_status_kib,
    run_bench,
)

from foldfed import tracing
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _watch
from foldfed.demo.observer import RunRecord
from foldfed.errors import FoldfedError
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
from foldfed.tracing.tree import read_folder

QUICK = {"participants": 2, "steps": 2, "pairs": 1, "local_steps": 1, "messages": 500}


class PeakRss:
    """Polls every process of a federation for VmHWM until stopped."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for name, process in list(self.federation.processes.items()):
                kib = read_status_kib(process.proc.pid, "VmHWM")
                self.peak_kib[name] = max(self.peak_kib.get(name, 0), kib)


def one_run(
    args: argparse.Namespace,
    broker: LocalBroker,
    passwords: dict[str, str],
    workdir: Path,
    traced: bool,
) -> dict[str, Any]:
    from foldfed.trainer.task import initial_model

    participants = tuple(f"org-{chr(ord('a') + i)}" for i in range(args.participants))
    spec = FederationSpec(
        participants=participants,
        steps=args.steps,
        workdir=workdir,
        common_env={
            "FOLDFED_SEED": "5",
            "FOLDFED_LOCAL_STEPS": str(args.local_steps),
            "FOLDFED_GRAD_ACCUM": "2",
            "FOLDFED_CHUNK_SIZE": str(1 << 20),
            "FOLDFED_TRACING": "on" if traced else "off",
        },
    )
    federation = LocalFederation(spec, broker=broker, passwords=passwords)
    federation.start_broker()  # running already; the first run adds the participants' users
    passwords.update(federation.passwords)
    initial_model(federation.initial_model, 5)
    record = RunRecord(spec.participants, spec.steps)
    try:
        # The demo's progress bars (stderr) are not this benchmark's output.
        with PeakRss(federation) as rss, contextlib.redirect_stderr(io.StringIO()):
            asyncio.run(_watch(federation, record, timeout_s=args.timeout_s))
    except FoldfedError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        federation.stop()
    seen = [record.step(t).opened_at for t in range(1, args.steps + 2)]
    opened = [t for t in seen if t is not None]
    if len(opened) != len(seen):
        raise BenchError(f"a release was not seen: {seen}")
    steps = [b - a for a, b in itertools.pairwise(opened)]
    spans = 0
    if traced:
        found, problems = read_folder(federation.trace_dir)
        if problems:
            raise BenchError(f"bad trace lines: {problems[:3]}")
        spans = len({s.span_id for s in found})
    return {
        "traced": traced,
        "step_s": steps,
        "spans": spans,
        "peak_rss_kib": dict(rss.peak_kib),
    }


def per_message_cost(n: int, folder: Path) -> dict[str, float]:
    """Seconds per message of the services' per-message tracing work, on and off."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from foldfed.tracing.files import JsonLinesExporter

    def work() -> float:
        started = time.perf_counter()
        for i in range(n):
            with tracing.span("upload", step=3, participant="org-a", **{tracing.BYTES: i}):
                headers = tracing.inject({})
            with tracing.consuming(headers), tracing.span("ingest.chunk", step=3, index=i):
                pass
        return (time.perf_counter() - started) / n

    tracing.uninstall()
    work()  # warm-up
    off = min(work() for _ in range(3))
    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench"}),
        id_generator=tracing._ids(),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(tracing._stamp("bench", "org-a"))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(folder / "bench.jsonl")))
    tracing.install(provider)
    try:
        work()
        on = min(work() for _ in range(3))
        provider.force_flush()
    finally:
        tracing.uninstall()
        provider.shutdown()
    return {"off_s": off, "on_s": on, "spans_per_message": 2.0}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    ensure_rabbitmq_installed()
    with tempfile.TemporaryDirectory(prefix="foldfed-bench-tracing-") as tmp:
        root = Path(tmp)
        broker = LocalBroker(root / "broker")
        admin_url = broker.start()
        runs: list[dict[str, Any]] = []
        passwords: dict[str, str] = {}
        try:
            for pair in range(args.pairs):
                order = (False, True) if pair % 2 == 0 else (True, False)
                for traced in order:
                    label = "on" if traced else "off"
                    print(f"pair {pair + 1}/{args.pairs}: tracing {label} ...", flush=True)
                    _reset(admin_url)
                    workdir = root / f"run-{pair}-{label}"
                    runs.append(one_run(args, broker, passwords, workdir, traced))
        finally:
            broker.stop()
        cost = per_message_cost(args.messages, root)
    return summarize(args, runs, cost)


def _reset(admin_url: str) -> None:
    """Delete the foldfed queues, so each run starts from an empty broker."""
    import aio_pika

    from foldfed import topology

    async def reset() -> None:
        connection = await aio_pika.connect(admin_url)
        try:
            for name in (topology.INGEST_QUEUE, topology.BARRIER_QUEUE, topology.DEAD_QUEUE):
                channel = await connection.channel()
                await channel.queue_delete(name)
                await channel.close()
            for i in range(26):
                channel = await connection.channel()
                await channel.queue_delete(topology.participant_queue(f"org-{chr(97 + i)}"))
                await channel.close()
        finally:
            await connection.close()

    asyncio.run(reset())


def summarize(
    args: argparse.Namespace, runs: list[dict[str, Any]], cost: dict[str, float]
) -> dict[str, Any]:
    def steps(traced: bool) -> list[float]:
        # The first step of each run is left out: processes still warming up.
        return [s for r in runs if r["traced"] is traced for s in r["step_s"][1:]]

    def peak(traced: bool) -> int:
        return max(sum(r["peak_rss_kib"].values()) for r in runs if r["traced"] is traced)

    on, off = steps(True), steps(False)
    spans_per_step = statistics.mean(
        r["spans"] / args.steps for r in runs if r["traced"] and r["spans"]
    )
    extra_per_span = (cost["on_s"] - cost["off_s"]) / cost["spans_per_message"]
    median_off = statistics.median(off)
    return {
        "benchmark": "tracing-overhead",
        "code": code_version(),
        "participants": args.participants,
        "steps_per_run": args.steps,
        "pairs": args.pairs,
        "local_steps": args.local_steps,
        "step_s_on": on,
        "step_s_off": off,
        "median_step_s_on": statistics.median(on),
        "median_step_s_off": median_off,
        "ratio_on_off": statistics.median(on) / median_off,
        "spans_per_step": spans_per_step,
        "per_message_s_on": cost["on_s"],
        "per_message_s_off": cost["off_s"],
        "extra_s_per_span": extra_per_span,
        # CPU the spans of one step cost, summed over all processes, against one step.
        "estimated_cpu_fraction": spans_per_step * extra_per_span / median_off,
        "peak_rss_kib_on": peak(True),
        "peak_rss_kib_off": peak(False),
        # Other work on the machine moves whole-run timings; the per-message loop less so.
        "load_average_1m_at_end": os.getloadavg()[0],
        "runs": runs,
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"tracing overhead: {r['participants']} participants, {r['pairs']} pairs of runs "
            f"of {r['steps_per_run']} steps (K={r['local_steps']}), code {r['code']}",
            f"  median step, tracing off   {r['median_step_s_off']:.3f} s  "
            f"(n={len(r['step_s_off'])}, {min(r['step_s_off']):.3f}-{max(r['step_s_off']):.3f})",
            f"  median step, tracing on    {r['median_step_s_on']:.3f} s  "
            f"(n={len(r['step_s_on'])}, {min(r['step_s_on']):.3f}-{max(r['step_s_on']):.3f})",
            f"  ratio on/off               {r['ratio_on_off']:.3f}",
            f"  spans per step             {r['spans_per_step']:.0f} (all processes)",
            f"  one traced message         {r['per_message_s_on'] * 1e6:.1f} us vs "
            f"{r['per_message_s_off'] * 1e6:.1f} us off "
            f"({r['extra_s_per_span'] * 1e6:.1f} us per span)",
            f"  estimated CPU per step     {r['estimated_cpu_fraction'] * 100:.3f} % of a step",
            f"  peak RSS, all processes    on {r['peak_rss_kib_on'] / 1024:.0f} MiB, "
            f"off {r['peak_rss_kib_off'] / 1024:.0f} MiB "
            f"(ratio {r['peak_rss_kib_on'] / r['peak_rss_kib_off']:.3f})",
            f"  load average (1 min)       {r['load_average_1m_at_end']:.1f} at the end",
        ]
    )


def result_fields(r: dict[str, Any]) -> dict[str, ResultValue]:
    return {
        "ratio_on_off": r["ratio_on_off"],
        "cpu_fraction": r["estimated_cpu_fraction"],
        "peak_rss_mib_on": r["peak_rss_kib_on"] / 1024,
        "peak_rss_mib_off": r["peak_rss_kib_off"] / 1024,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="global steps per run")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of runs (off, on)")
    parser.add_argument("--local-steps", type=int, default=3, help="K optimizer steps")
    parser.add_argument("--messages", type=int, default=5000, help="per-message loop size")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    add_quick_option(parser, QUICK, argv)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.pairs < 1 or args.participants < 1:
        parser.error("need --steps >= 2, --pairs >= 1, --participants >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # What is measured must not depend on the shell: no FOLDFED_* or OTEL_* settings.
    env = clean_env(OMP_NUM_THREADS="1")
    os.environ.clear()
    os.environ.update({k: v for k, v in env.items() if not k.startswith("OTEL_")})
    return run_bench(
        args,
        bench,
        render,
        "tracing-overhead",
        result_fields=result_fields,
        interrupted="interrupted: runs stopped, broker stopped",
        failed="tracing overhead benchmark failed: ",
    )


if __name__ == "__main__":
    raise SystemExit(main())

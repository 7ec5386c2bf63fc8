"""The barrier's release latency: from the hub's verification of a step's last chunk to the
release of the next step, with the real hub services and a realistic model size.

    .venv/bin/python bench/release_latency.py [--size-mib 64] [--participants 5] [--steps 3]
        [--progressive on|off] [--quick]

Why it matters: training is synchronous, so every participant idles from the moment its
delta is delivered until the next step is released. Upload time belongs to the participants'
links; what the hub adds on top, once per global step and paid by everyone, is the time
between the last delivery and the next release: the barrier noticing the step is complete,
the aggregator's finalization (the whole-model pass over the running sum, writing the global
update and θ_{t+1}), the update's broadcast and the barrier's release. Goal: median <= 50 ms.

What runs: a private RabbitMQ and the hub as real processes (`foldfed aggregator`, which
includes ingest, and `foldfed barrier`), started by foldfed.demo.cluster.LocalFederation
with the same FOLDFED_* environment as in production, on an initial model θ_0 of --size-mib
MiB of seeded float32 tensors. No trainer and no uploader service: this script plays the
participants. Per step it writes one delta per participant (θ_0's names, shapes and dtypes,
values ~1e-3, seeded by participant and step) and runs the one-shot `foldfed upload` for all
of them at once, each as its participant's own broker user, against θ_t's digest (θ_1's is
the initial model file's; θ_{t+1}'s comes from the aggregator's StepFinalized).

What is timed: this process watches the hub the way an operator's tool would, from one
exclusive queue bound to the events exchange ("#") and to the control exchange. Latency of
step t, on this process's monotonic clock = arrival of the barrier's `step_released` Event of
step t+1 (`cycle_done` after the last step) - arrival of step t's last DeliveryReceipt (the
`ingest.receipt` copy the barrier consumes too). Each observation is one broker hop after the
fact, so the hop cancels out. The StepReleased message itself (control exchange, published
before the event) is timed too.

Where it goes (wall clock, this machine's; hub file times are the kernel's coarse clock,
+-1 jiffy):
  ->request   last receipt -> FinalizeRequest seen: the barrier consumes the receipt, commits
              it to SQLite and publishes the request (confirmed)
  model pass  FinalizeRequest seen -> θ_{t+1} committed (its ctime; the rename after fsync):
              the aggregator's dequeue and finalize_step, the whole-model pass
  hash+store  -> last update chunk in the hub's chunk store (ctime): hashing the update
              (plan_chunks), hashing θ_{t+1} (file_digest), storing each chunk (fsync);
              0 with --progressive on, whose chunks are stored before the commit
  broadcast   -> StepFinalized seen: the update's chunks published to every participant's
              queue (persistent, confirmed), then StepFinalized
  ->release   StepFinalized seen -> release Event seen: the barrier consumes StepFinalized,
              commits, publishes StepReleased (control, broadcast), then the Event
The aggregator's own `finalize_ms` (step_finalized Event: request dequeued -> StepFinalized
confirmed) covers model pass + hash+store + broadcast.

Baselines, same broker, same run, after the cycle: the round trip of a tiny transient message
admin -> broker -> admin (no confirm), and a confirmed publish of a 1 KiB persistent message
to a durable queue (what each of the hub's publishes on this path waits for), median of 20;
and, to split hash+store, the two whole-file hashes alone (plan_chunks over the last update,
file_digest over the last model, on the hub's files, page cache warm, best of 3).
Memory: peak RSS (VmHWM) of the aggregator and barrier processes, and the highest
anonymous RSS seen, polled from /proc every 50 ms.

Results also go to bench/results/release-latency-<UTC time>.json. Children run in their own
sessions: Ctrl-C or SIGTERM reaches only this script, which then ends the uploads, the hub
and the broker, and deletes its temporary folder (unless --workdir was given).

The output ends with one machine-readable line (median over the steps; confirm_ms: the
confirmed-publish baseline; peak RSS: VmHWM, MiB):

    RESULT median_ms=<ms> size_mib=<MiB> confirm_ms=<ms> median_over_confirm=<x>
        aggregator_peak_rss_mib=<x> barrier_peak_rss_mib=<x>              (one line)

`--quick` is a smoke run (8 MiB, 2 participants, 2 steps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import torch

# Run as `python bench/<name>.py`, which puts bench/ on sys.path: benchkit is a sibling.
from benchkit import (
    BenchError,
    ResultValue,
    add_quick_option,
    clean_env,
    code_version,
    read_status_kib,
    run_bench,
    signals_deferred,
)

from foldfed import topology
from foldfed.deltafile import write_delta
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.digests import file_digest, short
from foldfed.domain import (
    DeliveryReceipt,
    Event,
    FinalizeRequest,
    Manifest,
    StepFinalized,
    StepReleased,
)
from foldfed.errors import DecodeError
from foldfed.format import validate_chunk_size
from foldfed.messages import AnyMessage, decode
from foldfed.payloadfile import plan_chunks

MIB = 1 << 20
COLS = 1024  # every weight matrix has 1024 float32 columns: 4 KiB rows
SHARES = (0.4, 0.3, 0.2, 0.1)  # how θ_0's bytes split over its weight matrices
MODEL_SCALE = 0.02
DELTA_SCALE = 1e-3
WEIGHT = 1000.0
FIRST_STEP = 1  # FOLDFED_FIRST_STEP's default; the federation does not set it
GOAL_MS = 50.0
BASELINE_SAMPLES = 20
BASELINE_WARMUP = 3
BASELINE_QUEUE = "bench.release-latency.confirm"
RSS_SAMPLE_S = 0.05
HASH_REPEATS = 3
FOLDFED_CLI = (sys.executable, "-m", "foldfed.cli")


# --------------------------------------------------------------------------- tensors


def model_shapes(size_mib: int) -> dict[str, tuple[int, ...]]:
    """A few weight matrices totalling `size_mib` MiB of float32, plus a bias for each."""
    rows_total = size_mib * MIB // (COLS * 4)
    shapes: dict[str, tuple[int, ...]] = {}
    left = rows_total
    for i, share in enumerate(SHARES):
        rows = left if i == len(SHARES) - 1 else max(1, round(rows_total * share))
        left -= rows
        shapes[f"blocks.{i}.weight"] = (rows, COLS)
        shapes[f"blocks.{i}.bias"] = (COLS,)
    return shapes


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> int:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=generator, dtype=torch.float32).mul_(scale)
        for name, shape in shapes.items()
    }
    write_delta(path, tensors)
    return path.stat().st_size


def delta_seed(seed: int, step: int, index: int) -> int:
    return seed * 1_000_003 + step * 1_009 + index + 1


# --------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class Stamp:
    """When this process saw something: monotonic for intervals, wall to compare with the
    hub's file times."""

    mono: float
    wall: float

    @staticmethod
    def now() -> Stamp:
        return Stamp(time.monotonic(), time.time())


@dataclass
class StepObs:
    """What was seen of step `step`, first sighting of each thing only."""

    step: int
    receipts: dict[str, Stamp] = field(default_factory=dict)
    receipt_hub_ms: dict[str, int] = field(default_factory=dict)
    finalize_request: Stamp | None = None
    finalized: Stamp | None = None
    next_model: bytes = b""  # θ_{step+1}'s digest, from StepFinalized
    update_manifest: bytes = b""
    finalize_ms: float | None = None  # the aggregator's own, from its step_finalized Event
    release_msg: Stamp | None = None  # StepReleased of step+1 (control exchange)
    release_event: Stamp | None = None  # step_released of step+1, or cycle_done
    release_event_hub_ms: int = 0
    release_detail: str = ""

    def complete(self, participants: int) -> bool:
        return (
            len(self.receipts) == participants
            and self.finalized is not None
            and self.finalize_ms is not None
            and self.release_event is not None
        )


class Watcher:
    """An exclusive queue on the events exchange ("#") and the control exchange."""

    def __init__(self, admin_url: str, health: Callable[[], None]) -> None:
        self.admin_url = admin_url
        self.health = health
        self.steps: dict[int, StepObs] = {}
        self.opened: dict[int, Stamp] = {}  # step -> its step_released Event
        self.rejections: list[str] = []
        self.undecodable = 0
        self._changed = asyncio.Event()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def step(self, step: int) -> StepObs:
        return self.steps.setdefault(step, StepObs(step))

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self.admin_url)
        channel = await self._connection.channel()
        # The hub declares both too, with these same arguments (Bus.declare_hub_topology).
        events = await channel.declare_exchange(
            topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        control = await channel.declare_exchange(
            topology.CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, "#")
        await queue.bind(control)
        await queue.consume(self._on_message, no_ack=True)

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = Stamp.now()
        try:
            msg = decode(message.type, message.body)
        except DecodeError:
            self.undecodable += 1
            return
        self._record(msg, now)
        self._changed.set()

    def _record(self, msg: AnyMessage, now: Stamp) -> None:
        match msg:
            case DeliveryReceipt():
                obs = self.step(msg.step)
                obs.receipts.setdefault(msg.participant, now)
                obs.receipt_hub_ms.setdefault(msg.participant, msg.completed_unix_ms)
            case FinalizeRequest():
                obs = self.step(msg.step)
                obs.finalize_request = obs.finalize_request or now
            case StepFinalized():
                obs = self.step(msg.step)
                if obs.finalized is None:
                    obs.finalized = now
                    obs.next_model = msg.model_digest
                    obs.update_manifest = msg.update_manifest
            case StepReleased() if msg.step > FIRST_STEP:
                obs = self.step(msg.step - 1)
                obs.release_msg = obs.release_msg or now
            case Event():
                self._record_event(msg, now)

    def _record_event(self, event: Event, now: Stamp) -> None:
        if event.kind in ("step_released", "cycle_done"):
            self.opened.setdefault(event.step, now)
            if event.step > FIRST_STEP:
                obs = self.step(event.step - 1)
                if obs.release_event is None:
                    obs.release_event = now
                    obs.release_event_hub_ms = event.unix_ms
                    obs.release_detail = event.detail
        elif event.kind == "step_finalized":
            obs = self.step(event.step)
            if obs.finalize_ms is None:
                obs.finalize_ms = float(event.metrics.get("finalize_ms", float("nan")))
        elif event.kind == "rejected":
            self.rejections.append(event.detail)

    async def wait_until(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.rejections:
                raise BenchError(f"the hub rejected a message: {self.rejections[0]}")
            self.health()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no {what} within {timeout:g} s")
            # No await between the check above and clear(): nothing can slip in between.
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))


# --------------------------------------------------------------------------- processes


class PeakRss:
    """Polls some processes' /proc status every RSS_SAMPLE_S in a thread: VmHWM (the
    kernel's own peak RSS) and the highest RssAnon seen. VmHWM counts file pages a process
    maps too (file_digest memory-maps whole models, the accumulator is a mapped file); the
    anonymous part is what a model size really costs in heap."""

    KEYS = ("VmHWM", "RssAnon")

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_kib = {name: dict.fromkeys(self.KEYS, 0) for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_SAMPLE_S)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            peaks = self.peak_kib[name]
            for key in self.KEYS:
                peaks[key] = max(peaks[key], read_status_kib(pid, key))

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sample()
        return {
            name: {"vm_hwm_mib": p["VmHWM"] / 1024, "rss_anon_peak_mib": p["RssAnon"] / 1024}
            for name, p in self.peak_kib.items()
        }


@dataclass
class Upload:
    participant: str
    proc: subprocess.Popen[bytes]
    out_path: Path
    log_path: Path

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# Uploads still running, ended by the clean-up whatever happened.
_uploads: list[Upload] = []


def start_upload(
    fed: LocalFederation, participant: str, delta: Path, step: int, base: bytes
) -> Upload:
    out = fed.logs / f"upload-{step}-{participant}.out"
    log = fed.logs / f"upload-{step}-{participant}.log"
    argv = [
        *FOLDFED_CLI,
        "upload",
        "--delta",
        str(delta),
        "--step",
        str(step),
        "--weight",
        str(WEIGHT),
        "--base-model-digest",
        base.hex(),
    ]
    # OMP_NUM_THREADS as LocalFederation gives its processes.
    env = {**clean_env(OMP_NUM_THREADS="1"), **fed.participant_env(participant)}
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    upload = Upload(participant, proc, out, log)
    _uploads.append(upload)
    return upload


async def wait_uploads(
    uploads: Sequence[Upload], timeout: float, health: Callable[[], None]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while any(u.proc.poll() is None for u in uploads):
        health()
        if time.monotonic() > deadline:
            late = [u.participant for u in uploads if u.proc.poll() is None]
            raise BenchError(f"uploads of {late} still running after {timeout:g} s")
        await asyncio.sleep(0.05)
    reports: list[dict[str, Any]] = []
    for u in uploads:
        _uploads.remove(u)
        if u.proc.returncode != 0:
            raise BenchError(
                f"upload of {u.participant} exited {u.proc.returncode}:\n{u.log_tail()}"
            )
        reports.append(json.loads(u.out_path.read_text().strip().splitlines()[-1]))
    return reports


def stop_uploads() -> None:
    for u in _uploads:
        if u.proc.poll() is None:
            u.proc.terminate()
    for u in _uploads:
        try:
            u.proc.wait(10)
        except subprocess.TimeoutExpired:
            u.proc.kill()
            u.proc.wait(10)
    _uploads.clear()


def hub_health(fed: LocalFederation) -> Callable[[], None]:
    def check() -> None:
        for process in fed.dead():
            tail = "\n".join(process.log().splitlines()[-25:])
            raise BenchError(f"{process.name} exited {process.proc.returncode}:\n{tail}")

    return check


# --------------------------------------------------------------------------- baselines


async def broker_baselines(admin_url: str) -> dict[str, Any]:
    """Median round trip of a tiny transient message, and of a confirmed persistent publish
    of 1 KiB to a durable queue, on the federation's own broker."""
    connection = await aio_pika.connect(admin_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        arrivals: asyncio.Queue[float] = asyncio.Queue()

        async def arrived(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrivals.put_nowait(time.monotonic())

        await queue.consume(arrived, no_ack=True)
        round_trips: list[float] = []
        for i in range(BASELINE_WARMUP + BASELINE_SAMPLES):
            sent = time.monotonic()
            await channel.default_exchange.publish(
                aio_pika.Message(b"x", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                routing_key=queue.name,
            )
            got = await asyncio.wait_for(arrivals.get(), 10)
            if i >= BASELINE_WARMUP:
                round_trips.append((got - sent) * 1000)

        confirming = await connection.channel(publisher_confirms=True)
        durable = await confirming.declare_queue(BASELINE_QUEUE, durable=True)
        confirms: list[float] = []
        for i in range(BASELINE_WARMUP + BASELINE_SAMPLES):
            sent = time.monotonic()
            await confirming.default_exchange.publish(
                aio_pika.Message(bytes(1024), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=BASELINE_QUEUE,
                timeout=10,
            )
            if i >= BASELINE_WARMUP:
                confirms.append((time.monotonic() - sent) * 1000)
        await durable.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return {
        "round_trip_ms": statistics.median(round_trips),
        "round_trip_samples_ms": round_trips,
        "persistent_confirm_ms": statistics.median(confirms),
        "persistent_confirm_samples_ms": confirms,
    }


def hashing_alone(hub_dir: Path, step: int, chunk_size: int) -> dict[str, float]:
    """What the two whole-file hashes of hash+store cost by themselves: the aggregator's
    plan_chunks over the update and file_digest over θ_{step+1}, on its own files."""
    update = hub_dir / "updates" / f"update-{step:012d}.safetensors"
    model = hub_dir / "models" / f"model-{step + 1:012d}.safetensors"
    plan: list[float] = []
    digest: list[float] = []
    for _ in range(HASH_REPEATS):
        started = time.perf_counter()
        plan_chunks(update, chunk_size)
        plan.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        file_digest(model)
        digest.append((time.perf_counter() - started) * 1000)
    return {"plan_chunks_update_ms": min(plan), "file_digest_model_ms": min(digest)}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepRow:
    step: int
    latency_ms: float  # last receipt seen -> release Event seen (monotonic)
    to_release_msg_ms: float | None  # last receipt -> StepReleased seen (None: last step)
    to_request_ms: float  # last receipt -> FinalizeRequest seen
    model_pass_ms: float  # FinalizeRequest seen -> θ_{t+1} committed
    hash_store_ms: float  # -> last update chunk stored
    broadcast_ms: float  # -> StepFinalized seen
    to_release_ms: float  # StepFinalized seen -> release Event seen
    finalize_ms: float  # the aggregator's own
    hub_clock_ms: int  # release Event's unix_ms - last receipt's completed_unix_ms
    receipt_spread_ms: float  # first -> last receipt of the step
    upload_s_max: float  # the slowest participant's upload (its own report)
    model_digest: str  # θ_{t+1}


def hub_times(hub_dir: Path, step: int, obs: StepObs) -> tuple[float, float]:
    """When θ_{step+1} was committed and the last of the update's chunks was stored
    (ctime: set by the rename into place, after fsync)."""
    model = hub_dir / "models" / f"model-{step + 1:012d}.safetensors"
    update = hub_dir / "updates" / f"update-{step:012d}.safetensors"
    committed = max(model.stat().st_ctime_ns, update.stat().st_ctime_ns) / 1e9
    manifest = decode("foldfed.v1.DeltaManifest", obs.update_manifest)
    assert isinstance(manifest, Manifest)
    chunks = hub_dir / "store" / "chunks"
    stored = max(
        (chunks / d.hex()[:2] / d.hex()).stat().st_ctime_ns for d in manifest.chunk_digests
    )
    return committed, stored / 1e9


def step_row(
    obs: StepObs, committed: float, stored: float, reports: Sequence[dict[str, Any]]
) -> StepRow:
    assert obs.finalize_request and obs.finalized and obs.release_event
    assert obs.finalize_ms is not None
    last = max(obs.receipts.values(), key=lambda s: s.mono)
    first = min(obs.receipts.values(), key=lambda s: s.mono)
    release = obs.release_event

    def ms(a: float, b: float) -> float:
        return (b - a) * 1000

    # A progressive finalize stores (and broadcasts) the update's chunks before the
    # commit: nothing is left to hash or store after it, and the broadcast column starts
    # at the commit.
    stored = max(stored, committed)

    return StepRow(
        step=obs.step,
        latency_ms=ms(last.mono, release.mono),
        to_release_msg_ms=ms(last.mono, obs.release_msg.mono) if obs.release_msg else None,
        to_request_ms=ms(last.wall, obs.finalize_request.wall),
        model_pass_ms=ms(obs.finalize_request.wall, committed),
        hash_store_ms=ms(committed, stored),
        broadcast_ms=ms(stored, obs.finalized.wall),
        to_release_ms=ms(obs.finalized.wall, release.wall),
        finalize_ms=obs.finalize_ms,
        hub_clock_ms=obs.release_event_hub_ms - max(obs.receipt_hub_ms.values()),
        receipt_spread_ms=ms(first.mono, last.mono),
        upload_s_max=max(float(r["seconds"]) for r in reports),
        model_digest=obs.next_model.hex(),
    )


COLUMNS = (
    ("step", "step", "{:>4d}"),
    ("latency", "latency_ms", "{:>8.1f}"),
    ("->StepRel", "to_release_msg_ms", "{:>9.1f}"),
    ("->request", "to_request_ms", "{:>9.1f}"),
    ("model pass", "model_pass_ms", "{:>10.1f}"),
    ("hash+store", "hash_store_ms", "{:>10.1f}"),
    ("broadcast", "broadcast_ms", "{:>9.1f}"),
    ("->release", "to_release_ms", "{:>9.1f}"),
    ("agg finalize_ms", "finalize_ms", "{:>15.1f}"),
)


def _cell(fmt: str, width: int, value: object) -> str:
    if value is None:
        return "-".rjust(width)
    return fmt.format(value)


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    rows: list[dict[str, Any]] = result["steps"]
    widths = [max(len(title), len(fmt.format(0))) for title, _, fmt in COLUMNS]
    header = "  ".join(title.rjust(w) for (title, _, _), w in zip(COLUMNS, widths, strict=True))
    lines = [
        f"release latency: {p['model_mib']:.1f} MiB model ({p['tensors']} tensors, float32), "
        f"{p['participants']} participants, {p['chunk_mib']} MiB chunks, {p['steps']} steps, "
        f"progressive finalize {p.get('progressive', 'on')}",
        f"{result['machine']}; code {result['code']}; "
        f"load average before: {result['loadavg_1min_before']:.2f}",
        "",
        "ms; latency = last DeliveryReceipt seen -> next step_released (cycle_done) seen",
        header,
    ]
    for row in rows:
        cells = [_cell(fmt, w, row[key]) for (_, key, fmt), w in zip(COLUMNS, widths, strict=True)]
        lines.append("  ".join(cells))
    med = result["median"]
    cells = [
        "med".rjust(widths[0]),
        *(
            _cell(fmt, w, med.get(key))
            for (_, key, fmt), w in zip(COLUMNS[1:], widths[1:], strict=True)
        ),
    ]
    lines.append("  ".join(cells))
    verdict = "met" if result["goal_met"] else "NOT met"
    base = result["baseline"]
    rss = result["peak_rss_mib"]
    hashing = result["hashing_alone_ms"]
    lines += [
        "",
        f"median release latency {med['latency_ms']:.1f} ms; goal <= {GOAL_MS:g} ms: {verdict}",
        f"broker baseline (median of {BASELINE_SAMPLES}): tiny message admin->broker->admin "
        f"{base['round_trip_ms']:.2f} ms; confirmed 1 KiB persistent publish to a durable "
        f"queue {base['persistent_confirm_ms']:.2f} ms",
        f"hashing alone (after the run, page cache warm, best of {HASH_REPEATS}): "
        f"plan_chunks(update) {hashing['plan_chunks_update_ms']:.1f} ms, "
        f"file_digest(θ_t+1) {hashing['file_digest_model_ms']:.1f} ms",
        "peak RSS, VmHWM (of which anonymous, polled): "
        + ", ".join(
            f"{name} {m['vm_hwm_mib']:.0f} MiB ({m['rss_anon_peak_mib']:.0f} MiB)"
            for name, m in rss.items()
        ),
        "slowest upload per step (s): " + ", ".join(f"{r['upload_s_max']:.1f}" for r in rows),
    ]
    return "\n".join(lines)


def result_fields(result: dict[str, Any]) -> dict[str, ResultValue]:
    median_ms = result["median"]["latency_ms"]
    confirm_ms = result["baseline"]["persistent_confirm_ms"]
    rss = result["peak_rss_mib"]
    return {
        "median_ms": median_ms,
        "size_mib": result["params"]["size_mib"],
        "progressive": result["params"].get("progressive", "on"),
        "confirm_ms": confirm_ms,
        "median_over_confirm": median_ms / confirm_ms,
        "aggregator_peak_rss_mib": rss["aggregator"]["vm_hwm_mib"],
        "barrier_peak_rss_mib": rss["barrier"]["vm_hwm_mib"],
    }


def medians(rows: Sequence[StepRow]) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, key, _ in COLUMNS[1:]:
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


# --------------------------------------------------------------------------- the run


def check_disk(work: Path, args: argparse.Namespace) -> None:
    """Deltas of one step, the hub's chunk store (every delta of every step), the models and
    updates it writes, the accumulator, and the broker's copy of what is in flight."""
    size = args.size_mib * MIB
    need = size * (1 + args.participants * (2 + args.steps) + 3 * args.steps + 2 + args.steps)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work}: {free / MIB:.0f} MiB free, this run needs ~{need / MIB:.0f}")


async def run(
    args: argparse.Namespace, fed: LocalFederation, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    participants = fed.spec.participants
    health = hub_health(fed)
    watcher = Watcher(fed.admin_url, health)
    await watcher.start()
    rss: PeakRss | None = None
    try:
        print("starting the hub (aggregator, barrier) ...", flush=True)
        await asyncio.to_thread(fed.start_hub)
        rss = PeakRss({name: fed.processes[name].proc.pid for name in ("aggregator", "barrier")})
        rss.start()
        await watcher.wait_until(
            f"release of step {FIRST_STEP}", lambda: FIRST_STEP in watcher.opened, 120
        )
        digests = {FIRST_STEP: await asyncio.to_thread(file_digest, fed.initial_model)}
        upload_timeout = 120 + args.size_mib * args.participants / 10
        release_timeout = 60 + args.size_mib / 4
        rows: list[StepRow] = []
        deltas_dir = fed.workdir / "deltas"
        deltas_dir.mkdir(exist_ok=True)
        for step in range(FIRST_STEP, FIRST_STEP + args.steps):
            print(f"step {step}: writing {len(participants)} deltas ...", end=" ", flush=True)
            deltas: dict[str, Path] = {}
            for index, participant in enumerate(participants):
                deltas[participant] = deltas_dir / f"{participant}-{step}.safetensors"
                seed = delta_seed(args.seed, step, index)
                await asyncio.to_thread(
                    write_random, deltas[participant], shapes, seed, DELTA_SCALE
                )
            print("uploading ...", end=" ", flush=True)
            uploads = [start_upload(fed, p, deltas[p], step, digests[step]) for p in participants]
            reports = await wait_uploads(uploads, upload_timeout, health)
            obs = watcher.step(step)
            await watcher.wait_until(
                f"release after step {step}",
                lambda obs=obs: obs.complete(len(participants)),
                release_timeout,
            )
            if obs.release_detail not in (short(obs.next_model), obs.next_model.hex()):
                raise BenchError(
                    f"step {step}: released {obs.release_detail!r}, "
                    f"finalized {obs.next_model.hex()}"
                )
            committed, stored = hub_times(fed.hub_dir, step, obs)
            row = step_row(obs, committed, stored, reports)
            rows.append(row)
            digests[step + 1] = obs.next_model
            print(f"released in {row.latency_ms:.1f} ms", flush=True)
            for path in deltas.values():
                path.unlink()
        peak = rss.stop()
        rss = None
        print("broker baselines ...", flush=True)
        baseline = await broker_baselines(fed.admin_url)
        last_step = rows[-1].step
        hashing = await asyncio.to_thread(
            hashing_alone, fed.hub_dir, last_step, args.chunk_mib * MIB
        )
        # θ_{t+1} on the hub's disk is what was released (a check of what we measured).
        for row in rows:
            model = fed.hub_dir / "models" / f"model-{row.step + 1:012d}.safetensors"
            if (await asyncio.to_thread(file_digest, model)).hex() != row.model_digest:
                raise BenchError(f"{model.name} does not have the released digest")
        version = fed.broker.rabbitmqctl("version").strip()
    finally:
        if rss is not None:
            rss.stop()
        await watcher.close()
    med = medians(rows)
    model_bytes = fed.initial_model.stat().st_size
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": (
            f"Python {platform.python_version()}, RabbitMQ {version}, "
            f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}"
        ),
        "code": code_version(),
        "params": {
            "size_mib": args.size_mib,
            "model_bytes": model_bytes,
            "model_mib": model_bytes / MIB,
            "tensors": len(shapes),
            "participants": args.participants,
            "steps": args.steps,
            "chunk_mib": args.chunk_mib,
            "weight": WEIGHT,
            "seed": args.seed,
            "progressive": args.progressive,
        },
        "goal_ms": GOAL_MS,
        "goal_met": med["latency_ms"] <= GOAL_MS,
        "median": med,
        "steps": [asdict(r) for r in rows],
        "baseline": baseline,
        "hashing_alone_ms": hashing,
        "peak_rss_mib": peak,
        "undecodable_messages": watcher.undecodable,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    chunk_size = args.chunk_mib * MIB
    validate_chunk_size(chunk_size)
    keep = bool(args.workdir)
    # Other work on the machine inflates every number here: say how busy it was before.
    load_before = os.getloadavg()[0]
    if keep:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=False)
    else:
        work = Path(tempfile.mkdtemp(prefix="foldfed-release-"))
    try:
        check_disk(work, args)
        sites = tuple(f"site{i}" for i in range(1, args.participants + 1))
        spec = FederationSpec(
            participants=sites,
            steps=args.steps,
            workdir=work,
            common_env={
                "FOLDFED_CHUNK_SIZE": str(chunk_size),
                # The cycle's agreed weights (the hub rejects any other): the bench's own.
                "FOLDFED_MEMBER_WEIGHTS": ",".join(f"{site}={WEIGHT:g}" for site in sites),
                # Every step's model is checked after the run: keep them (docs/retention.md).
                "FOLDFED_RETAIN_STEPS": "0",
                # Finalize while the deltas arrive, or only after the last (--progressive).
                "FOLDFED_PROGRESSIVE_FINALIZE": args.progressive,
            },
        )
        fed = LocalFederation(spec)
        try:
            print(f"starting RabbitMQ in {work / 'broker'} ...", flush=True)
            fed.start_broker()
            shapes = model_shapes(args.size_mib)
            print(f"writing θ_0 ({args.size_mib} MiB) ...", flush=True)
            write_random(fed.initial_model, shapes, args.seed, MODEL_SCALE)
            result = asyncio.run(run(args, fed, shapes))
            result["loadavg_1min_before"] = load_before
            return result
        finally:
            # A second Ctrl-C must not cut the clean-up short; each part has a timeout.
            with signals_deferred():
                stop_uploads()
                fed.stop()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="the barrier's release latency: last delivery -> next step released"
    )
    parser.add_argument("--size-mib", type=int, default=64, help="model size (default 64)")
    parser.add_argument("--participants", type=int, default=5, help="(default 5)")
    parser.add_argument("--steps", type=int, default=3, help="global steps (default 3)")
    parser.add_argument("--chunk-mib", type=int, default=4, help="chunk size (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of θ_0 and the deltas")
    parser.add_argument(
        "--progressive",
        choices=("on", "off"),
        default="on",
        help="FOLDFED_PROGRESSIVE_FINALIZE at the hub (default on)",
    )
    parser.add_argument("--workdir", default="", help="a new folder to keep (default: a temp)")
    add_quick_option(parser, {"size_mib": 8, "participants": 2, "steps": 2}, argv)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.participants < 1 or args.steps < 1:
        parser.error("--size-mib, --participants and --steps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(
        args,
        bench,
        render,
        "release-latency",
        result_fields=result_fields,
        interrupted="\ninterrupted: uploads and hub ended, broker stopped",
        failed="\nfailed: ",
    )


if __name__ == "__main__":
    sys.exit(main())

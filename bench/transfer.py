"""Throughput and memory of one foldfed delta transfer, against the bare broker pipe.

    .venv/bin/python bench/transfer.py [--size-mib 1024] [--chunk-mib 4] [--repeats 1]
        [--quick]

What is compared, in one run, on one private RabbitMQ (foldfed.localbroker.LocalBroker):

foldfed  `foldfed upload` (participant `bench`) sends a delta to `foldfed ingest` (the hub),
         both as real processes. The uploader hashes the file (plan_chunks), publishes the
         manifest, asks the hub what it lacks, publishes every chunk as a persistent message
         with publisher confirms (at most FOLDFED_INFLIGHT_WINDOW unconfirmed), and exits only
         after the hub's delivery receipt: by then the ingest has verified each chunk's
         digest, written it to its content-addressed store, fsynced it and recorded it in
         SQLite. The uploader's wall time, process start to exit, is what a participant waits.

bare     The same file, chunk size, broker, client library (aio-pika), window of unconfirmed
         persistent publishes and consumer prefetch, to a durable classic queue, and nothing
         else: no hashing, no protobuf, no handshake, no disk writes by the consumer, which
         only acks. Timed from the publisher's process start to the consumer's last ack. It
         is the ceiling on this machine: what moving the bytes through RabbitMQ costs at all.

The ratio foldfed/bare is the share of the pipe that foldfed's guarantees leave; the goal is
>= 0.8. To tell where a gap comes from, the uploader's log splits its time into start-up +
hashing (until "upload start"), the transfer proper (until "upload done", i.e. the receipt)
and exit; plan_chunks is also timed in this process, and a bare `python -c "import ..."` of
each side's modules gives the start-up time and memory that no transfer is needed for.

Memory: the peak RSS (VmHWM) of every process, polled from /proc/<pid>/status every 50 ms
(the bare roles and the import-only processes also report their own at the end). The design
goal is memory bounded by the in-flight window (window x chunk size), not by the delta: the
table shows peak RSS, the part above the import-only baseline, and both as multiples of
window x chunk and of the delta size.

CPU: the seconds each process (and the broker) spent during each run, and what every other
process on the machine spent meanwhile. A share near 100% of the CPUs means CPU-bound; a low
one with a slow run means waiting (disk, a serial pipeline). A benchmark on a shared machine
is only as good as the machine is idle: the table warns when others used over 10%.

Runs alternate (foldfed, bare, foldfed, ...) so that drift (page cache, the broker's message
store, CPU clocks) hits both alike; medians are reported. Results also go to
bench/results/transfer-<UTC timestamp>.json. Every child runs in its own session: Ctrl-C or
SIGTERM reaches only this script, which then ends the children and stops the broker.

The bare roles run this same file (`--role bare-publish|bare-consume`); they import only
the standard library and aio-pika, so their start-up is that of a minimal client.

The output ends with one machine-readable line (medians; peak RSS in MiB):

    RESULT ratio=<foldfed/bare> foldfed_mib_s=<x> bare_mib_s=<x> uploader_peak_rss_mib=<x>
        ingest_peak_rss_mib=<x>                                           (one line)

`--quick` is a smoke run (a 16 MiB delta): start-up dominates, so its ratio means little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

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

if TYPE_CHECKING:
    from foldfed.localbroker import LocalBroker

MIB = 1 << 20
PARTICIPANT = "bench"
BARE_QUEUE = "bench.bare"
URL_ENV = "BENCH_AMQP_URL"  # the bare roles' broker URL (kept off their command line)
THIS = Path(__file__).resolve()
FOLDFED_CLI = (sys.executable, "-m", "foldfed.cli")
SAMPLE_S = 0.05  # RSS polling interval
STARTUP_TIMEOUT_S = 120.0
RATIO_GOAL = 0.8
OTHER_LOAD_WARN = 0.10  # share of the machine used by unrelated processes during a run
# What each side's process imports before doing anything (for the import-only baselines).
UPLOADER_MODULES = ("foldfed.cli", "foldfed.config", "foldfed.logs", "foldfed.uploader.upload")
INGEST_MODULES = ("foldfed.cli", "foldfed.config", "foldfed.logs", "foldfed.ingest.service")
BARE_MODULES = ("argparse", "asyncio", "json", "aio_pika")


# --------------------------------------------------------------------------- child processes


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a live process so far (0.0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent so far (user, nice, system, irq,
    softirq; not idle, iowait or steal), from /proc/stat."""
    fields_ = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields_[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Child:
    """A subprocess in its own session, watched by one thread that polls its VmHWM every
    SAMPLE_S and reaps it (with a pidfd the exit is seen at once), recording the exit time.

    wait4()'s CPU times are exact, but not its ru_maxrss: Linux carries the forking parent's
    RSS into the child's maxrss across exec, so every child would report at least this
    (torch-importing) process's size.
    """

    live: set[Child] = set()

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        *,
        capture_stdout: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed by _watch, or below if Popen fails
        self.exited_at: float | None = None
        self.returncode: int | None = None
        self._hwm_kib = 0
        self.cpu_s = 0.0  # user + system seconds of the whole life, known at exit
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.started_wall = time.time()
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else self._log,
                stderr=self._log,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        Child.live.add(self)
        threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True).start()

    def _watch(self) -> None:
        pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(self.pid)
        try:
            while True:
                # Read before reaping: until our wait4 the PID cannot be reused.
                self._hwm_kib = max(self._hwm_kib, read_status_kib(self.pid, "VmHWM"))
                if pidfd is not None:
                    select.select([pidfd], [], [], SAMPLE_S)
                with self._lock:
                    pid, status, usage = os.wait4(self.pid, os.WNOHANG)
                    if pid:
                        self.exited_at = time.monotonic()
                        self.cpu_s = usage.ru_utime + usage.ru_stime
                        self.returncode = os.waitstatus_to_exitcode(status)
                        self.proc.returncode = self.returncode  # Popen must not reap it again
                        break
                if pidfd is None:
                    time.sleep(0.005)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            self._log.close()
            Child.live.discard(self)
            self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def peak_rss_mib(self) -> float:
        """The last VmHWM read (it only grows): growth in the final SAMPLE_S can be missed."""
        return self._hwm_kib / 1024

    @property
    def seconds(self) -> float:
        if self.exited_at is None:
            raise BenchError(f"{self.name} has not exited")
        return self.exited_at - self.started

    def wait(self, timeout: float) -> int:
        if not self._done.wait(timeout):
            raise BenchError(f"{self.name} still running after {timeout:.0f} s\n{self.log_tail()}")
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int) -> None:
        with self._lock:  # not reaped yet, so the process group is still ours
            if self.running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the services shut down gracefully), SIGKILL after `timeout`."""
        self.signal(signal.SIGTERM)
        if not self._done.wait(timeout):
            self.signal(signal.SIGKILL)
            self._done.wait(10.0)

    def read_line(self, timeout: float) -> str:
        """The next line of captured stdout; BenchError if none comes in time."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            self.stop()
            raise BenchError(
                f"{self.name} printed nothing within {timeout:.0f} s\n{self.log_tail()}"
            )
        return line.strip()

    def stdout_rest(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode()
        self.proc.stdout.close()
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last lines of {self.log_path}:\n{tail}"

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if not self.running:
                raise BenchError(f"{self.name} exited ({self.returncode})\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name}: no {needle!r} in {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def check_exit(self, timeout: float) -> None:
        code = self.wait(timeout)
        if code != 0:
            raise BenchError(f"{self.name} failed with exit code {code}\n{self.log_tail()}")


def stop_all_children() -> None:
    for child in list(Child.live):
        child.signal(signal.SIGTERM)
    for child in list(Child.live):
        child.stop(timeout=10.0)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FoldfedRun:
    seconds: float  # uploader process start -> exit (after the hub's receipt)
    mib_s: float
    to_upload_start_s: float  # start-up + plan_chunks (log "upload start")
    transfer_s: float  # "upload start" -> "upload done": manifest, chunks, receipt
    to_delivered_s: float  # start -> the ingest's "delivered" (last chunk durable)
    exit_s: float  # "upload done" -> process exit
    uploader_rss_mib: float
    ingest_rss_mib: float
    # CPU seconds while the uploader ran (its whole life), to tell CPU- from wait-bound.
    uploader_cpu_s: float
    ingest_cpu_s: float
    broker_cpu_s: float
    other_cpu_s: float  # everything else on the machine meanwhile: other load skews results
    chunks_sent: int


@dataclass(frozen=True)
class BareRun:
    seconds: float  # publisher process start -> consumer's last ack
    mib_s: float
    to_first_publish_s: float  # start-up + connect
    transfer_s: float  # first publish -> last ack
    publisher_exit_s: float  # publisher start -> its exit (all confirms in)
    publisher_rss_mib: float
    consumer_rss_mib: float
    # CPU seconds from the publisher's start to the consumer's exit.
    publisher_cpu_s: float
    consumer_cpu_s: float
    broker_cpu_s: float
    other_cpu_s: float


@dataclass(frozen=True)
class Baseline:
    """A process that only imports what a side imports: its start-up time and memory."""

    seconds: float
    rss_mib: float


def median_of(runs: Sequence[Any]) -> dict[str, float]:
    return {
        f.name: statistics.median(float(getattr(r, f.name)) for r in runs) for f in fields(runs[0])
    }


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Context:
    work: Path
    admin_url: str
    bench_url: str
    delta: Path
    delta_bytes: int
    chunk_size: int
    window: int
    prefetch: int
    timeout_s: float
    base_env: Mapping[str, str]
    broker_pid: int | None

    @property
    def chunks(self) -> int:
        return math.ceil(self.delta_bytes / self.chunk_size)

    @property
    def mib(self) -> float:
        return self.delta_bytes / MIB


def foldfed_defaults() -> tuple[int, int]:
    """foldfed's default in-flight window and ingest prefetch, from its own settings code."""
    from foldfed.config import BusSettings, IngestSettings

    env = {"FOLDFED_AMQP_URL": "amqp://unused/", "FOLDFED_PARTICIPANTS": PARTICIPANT}
    return BusSettings.from_env(env).inflight_window, IngestSettings.from_env(env).prefetch


def write_bench_delta(path: Path, size_mib: int, seed: int) -> int:
    """A delta of exactly `size_mib` MiB of float32 data (plus the header) from a seeded
    generator, in tensors of at most 64 MiB as a model's layers would be. Returns its size."""
    import torch

    from foldfed.deltafile import write_delta

    generator = torch.Generator().manual_seed(seed)
    cols = 1024
    left = size_mib * MIB // 4  # elements; a multiple of `cols`
    tensors: dict[str, torch.Tensor] = {}
    while left:
        n = min(left, 64 * MIB // 4)
        tensors[f"layers.{len(tensors):04d}.weight"] = torch.randn(
            n // cols, cols, generator=generator
        )
        left -= n
    write_delta(path, tensors, {"bench": "transfer", "seed": str(seed)})
    return path.stat().st_size


def time_plan_chunks(path: Path, chunk_size: int) -> float:
    from foldfed.payloadfile import plan_chunks

    started = time.perf_counter()
    plan_chunks(path, chunk_size)
    return time.perf_counter() - started


def measure_import(ctx: Context, name: str, modules: Sequence[str]) -> Baseline:
    """Start a process that imports `modules`, prints its own VmHWM and exits."""
    code = f"import {', '.join(modules)}\nprint(open('/proc/self/status').read(), flush=True)"
    child = Child(
        f"import-{name}",
        [sys.executable, "-c", code],
        ctx.base_env,
        ctx.work,
        ctx.work / f"import-{name}.log",
        capture_stdout=True,
    )
    child.check_exit(STARTUP_TIMEOUT_S)
    hwm = next(ln for ln in child.stdout_rest().splitlines() if ln.startswith("VmHWM:"))
    return Baseline(child.seconds, max(child.peak_rss_mib, int(hwm.split()[1]) / 1024))


def user_url(admin_url: str, user: str, password: str) -> str:
    parsed = urlparse(admin_url)
    return f"amqp://{quote(user)}:{quote(password)}@{parsed.hostname}:{parsed.port}/"


def check_disk(work: Path, delta_bytes: int) -> None:
    # The delta, one hub store at a time (deleted after each run), the broker's message
    # store, and RabbitMQ's own 1 GB disk alarm threshold.
    need = 3 * delta_bytes + (2 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work}: {free / MIB:.0f} MiB free, the bench needs {need / MIB:.0f}")


# --------------------------------------------------------------------------- foldfed path


def _log_times(child: Child, events: Sequence[str]) -> dict[str, float]:
    """Seconds from the child's start to the first log line of each event (JSON lines with
    structlog's ISO timestamps)."""
    found: dict[str, float] = {}
    for line in child.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event") if isinstance(record, dict) else None
        if event in events and event not in found and "timestamp" in record:
            stamp = datetime.fromisoformat(record["timestamp"]).timestamp()
            found[event] = stamp - child.started_wall
    missing = set(events) - set(found)
    if missing:
        raise BenchError(f"{child.name}: no {sorted(missing)} in its log\n{child.log_tail()}")
    return found


def run_foldfed(ctx: Context, index: int) -> FoldfedRun:
    run_dir = ctx.work / f"foldfed-{index}"
    run_dir.mkdir()
    hub_env = {
        **ctx.base_env,
        "FOLDFED_AMQP_URL": ctx.admin_url,
        "FOLDFED_PARTICIPANTS": PARTICIPANT,
        "FOLDFED_STATE_DIR": str(run_dir / "hub"),
        "FOLDFED_FIRST_STEP": "1",
        "FOLDFED_MAX_PAYLOAD_BYTES": str(max(8 << 30, ctx.delta_bytes)),
    }
    uploader_env = {
        **ctx.base_env,
        "FOLDFED_AMQP_URL": ctx.bench_url,
        "FOLDFED_PARTICIPANT": PARTICIPANT,
        "FOLDFED_SPOOL_DIR": str(run_dir / "spool"),
        "FOLDFED_CHUNK_SIZE": str(ctx.chunk_size),
    }
    upload_argv = [
        *FOLDFED_CLI,
        *("upload", "--delta", str(ctx.delta), "--step", "1", "--weight", "1"),
    ]
    ingest = Child("ingest", [*FOLDFED_CLI, "ingest"], hub_env, run_dir, run_dir / "ingest.log")
    try:
        ingest.wait_for_log("ingest ready", STARTUP_TIMEOUT_S)
        # The hub counts a delta only once its step is released (ingest/rules.py).
        subprocess.run(
            [*FOLDFED_CLI, "release", "1"], env=hub_env, check=True, timeout=STARTUP_TIMEOUT_S
        )
        cpu_before = cpu_seconds(ingest.pid), cpu_seconds(ctx.broker_pid), machine_busy_seconds()
        uploader = Child(
            "uploader",
            upload_argv,
            uploader_env,
            run_dir,
            run_dir / "upload.log",
            capture_stdout=True,
        )
        try:
            uploader.check_exit(ctx.timeout_s)
        finally:
            uploader.stop()
        ingest_cpu = cpu_seconds(ingest.pid) - cpu_before[0]
        broker_cpu = cpu_seconds(ctx.broker_pid) - cpu_before[1]
        machine_cpu = machine_busy_seconds() - cpu_before[2]
        report = json.loads(uploader.stdout_rest().strip().splitlines()[-1])
    finally:
        ingest.stop()
    if report["chunks_sent"] != ctx.chunks or report["bytes_sent"] != ctx.delta_bytes:
        raise BenchError(f"uploader sent {report['chunks_sent']} chunks, not {ctx.chunks}")
    phases = _log_times(uploader, ("upload start", "upload done"))
    delivered = _log_times(ingest, ("delivered",))["delivered"]
    delivered += ingest.started_wall - uploader.started_wall  # to the uploader's start
    shutil.rmtree(run_dir / "hub")  # a delta's worth of chunks
    return FoldfedRun(
        seconds=uploader.seconds,
        mib_s=ctx.mib / uploader.seconds,
        to_upload_start_s=phases["upload start"],
        transfer_s=phases["upload done"] - phases["upload start"],
        to_delivered_s=delivered,
        exit_s=uploader.seconds - phases["upload done"],
        uploader_rss_mib=uploader.peak_rss_mib,
        ingest_rss_mib=ingest.peak_rss_mib,
        uploader_cpu_s=uploader.cpu_s,
        ingest_cpu_s=ingest_cpu,
        broker_cpu_s=broker_cpu,
        other_cpu_s=max(0.0, machine_cpu - uploader.cpu_s - ingest_cpu - broker_cpu),
        chunks_sent=int(report["chunks_sent"]),
    )


# --------------------------------------------------------------------------- bare path


async def _reset_bare_queue(url: str, *, delete: bool = False) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        if delete:
            await channel.queue_delete(BARE_QUEUE)
        else:
            queue = await channel.declare_queue(BARE_QUEUE, durable=True)
            await queue.purge()
    finally:
        await connection.close()


def run_bare(ctx: Context, index: int) -> BareRun:
    run_dir = ctx.work / f"bare-{index}"
    run_dir.mkdir()
    asyncio.run(_reset_bare_queue(ctx.admin_url))
    env = {**ctx.base_env, URL_ENV: ctx.admin_url}
    role = [sys.executable, str(THIS), "--role"]
    consumer = Child(
        "bare-consumer",
        [*role, "bare-consume", "--count", str(ctx.chunks), "--prefetch", str(ctx.prefetch)],
        env,
        run_dir,
        run_dir / "consume.log",
        capture_stdout=True,
    )
    try:
        if consumer.read_line(STARTUP_TIMEOUT_S) != "ready":
            raise BenchError(f"bare consumer did not get ready\n{consumer.log_tail()}")
        cpu_before = cpu_seconds(consumer.pid), cpu_seconds(ctx.broker_pid), machine_busy_seconds()
        publisher = Child(
            "bare-publisher",
            [
                *role,
                "bare-publish",
                "--delta",
                str(ctx.delta),
                "--chunk-size",
                str(ctx.chunk_size),
                "--window",
                str(ctx.window),
            ],
            env,
            run_dir,
            run_dir / "publish.log",
            capture_stdout=True,
        )
        try:
            publisher.check_exit(ctx.timeout_s)
        finally:
            publisher.stop()
        consumer.check_exit(ctx.timeout_s)
        broker_cpu = cpu_seconds(ctx.broker_pid) - cpu_before[1]
        machine_cpu = machine_busy_seconds() - cpu_before[2]
    finally:
        consumer.stop()
    sent = json.loads(publisher.stdout_rest())
    got = json.loads(consumer.stdout_rest())
    if got["bytes"] != ctx.delta_bytes or sent["bytes"] != ctx.delta_bytes:
        raise BenchError(f"bare: sent {sent['bytes']} bytes, received {got['bytes']}")
    asyncio.run(_reset_bare_queue(ctx.admin_url, delete=True))
    seconds = got["last_ack"] - publisher.started
    return BareRun(
        seconds=seconds,
        mib_s=ctx.mib / seconds,
        to_first_publish_s=sent["first_publish"] - publisher.started,
        transfer_s=got["last_ack"] - sent["first_publish"],
        publisher_exit_s=publisher.seconds,
        publisher_rss_mib=max(publisher.peak_rss_mib, sent["vmhwm_kib"] / 1024),
        consumer_rss_mib=max(consumer.peak_rss_mib, got["vmhwm_kib"] / 1024),
        publisher_cpu_s=publisher.cpu_s,
        consumer_cpu_s=consumer.cpu_s - cpu_before[0],
        broker_cpu_s=broker_cpu,
        other_cpu_s=max(
            0.0, machine_cpu - publisher.cpu_s - (consumer.cpu_s - cpu_before[0]) - broker_cpu
        ),
    )


async def bare_publish(url: str, path: Path, chunk_size: int, window: int) -> dict[str, Any]:
    """Publish the file's chunks as persistent messages to the bare queue, at most `window`
    unconfirmed at once, as foldfed's uploader does, and nothing more."""
    import aio_pika

    connection = await aio_pika.connect(url, heartbeat=30)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        slots = asyncio.Semaphore(window)
        failures: list[BaseException] = []
        tasks: set[asyncio.Task[None]] = set()

        async def publish(body: bytes) -> None:
            try:
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await exchange.publish(message, BARE_QUEUE, mandatory=True)
            except BaseException as exc:
                failures.append(exc)
            finally:
                slots.release()

        first_publish = time.monotonic()
        sent = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, chunk_size):
                await slots.acquire()
                if failures:
                    break
                body = os.pread(fd, chunk_size, offset)
                sent += len(body)
                task = asyncio.create_task(publish(body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            os.close(fd)
        if failures:
            raise failures[0]
        return {
            "bytes": sent,
            "first_publish": first_publish,
            "last_confirm": time.monotonic(),
            "vmhwm_kib": read_status_kib("self", "VmHWM"),
        }
    finally:
        await connection.close()


async def bare_consume(url: str, count: int, prefetch: int) -> dict[str, Any]:
    """Consume `count` messages from the bare queue with `prefetch`, one at a time as the
    ingest does, acking each; print "ready" once the consumer is registered."""
    import aio_pika

    connection = await aio_pika.connect(url, heartbeat=30)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(BARE_QUEUE, ensure=False)
        received = nbytes = 0
        first = last = 0.0
        async with queue.iterator() as messages:
            print("ready", flush=True)
            async for message in messages:
                if not received:
                    first = time.monotonic()
                nbytes += len(message.body)
                await message.ack()
                received += 1
                if received == count:
                    last = time.monotonic()
                    break
        return {
            "received": received,
            "bytes": nbytes,
            "first_delivery": first,
            "last_ack": last,
            "vmhwm_kib": read_status_kib("self", "VmHWM"),
        }
    finally:
        await connection.close()


# --------------------------------------------------------------------------- report


def _rss_row(name: str, peak: float, base: float, window_bytes: int, delta_bytes: int) -> str:
    above = peak - base
    return (
        f"  {name:<16}{peak:>9.0f}{base:>9.0f}{above:>9.0f}"
        f"{peak * MIB / window_bytes:>9.1f}{above * MIB / window_bytes:>9.1f}"
        f"{peak * MIB / delta_bytes:>9.3f}{above * MIB / delta_bytes:>9.3f}"
    )


def _cpu_row(name: str, cpu: Sequence[float], other: float, seconds: float) -> str:
    machine = (os.cpu_count() or 1) * seconds
    cols = "".join(f"{x:>9.2f}" for x in cpu)
    return f"  {name:<16}{cols}{sum(cpu) / machine:>9.0%}{other:>9.2f}{other / machine:>9.0%}"


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    f, b = result["foldfed_median"], result["bare_median"]
    up, ing, bare = (result["import_baseline"][k] for k in ("uploader", "ingest", "bare"))
    ratio = result["ratio"]
    mib, delta_bytes = p["delta_mib"], p["delta_bytes"]
    window_bytes = p["window"] * p["chunk_size"]
    hash_s = result["hash_seconds"]
    verdict = "meets the goal" if ratio >= RATIO_GOAL else "BELOW the goal"
    transfer_ratio = b["transfer_s"] / f["transfer_s"]
    ncpu = os.cpu_count() or 1
    cpu_f = (f["uploader_cpu_s"], f["ingest_cpu_s"], f["broker_cpu_s"])
    cpu_b = (b["publisher_cpu_s"], b["consumer_cpu_s"], b["broker_cpu_s"])
    other = max(f["other_cpu_s"] / (ncpu * f["seconds"]), b["other_cpu_s"] / (ncpu * b["seconds"]))
    lines = [
        f"foldfed transfer bench: delta {mib:.1f} MiB ({delta_bytes} B), "
        f"{p['chunks']} chunks of {p['chunk_size'] / MIB:g} MiB, window {p['window']}, "
        f"prefetch {p['prefetch']}, median of {p['repeats']} run(s)",
        f"  {result['machine']}; foldfed {result['code']}",
        "",
        f"  {'throughput':<44}{'seconds':>9}{'MiB/s':>9}",
        f"  {'foldfed end to end (upload CLI, to receipt)':<44}"
        f"{f['seconds']:>9.2f}{f['mib_s']:>9.1f}",
        f"  {'bare broker pipe (publish to last ack)':<44}{b['seconds']:>9.2f}{b['mib_s']:>9.1f}",
        f"  {'ratio foldfed / bare':<44}{'':>9}{ratio:>9.2f}  goal >= {RATIO_GOAL}: {verdict}",
        f"  {'hash only (plan_chunks, in process)':<44}{hash_s:>9.2f}{mib / hash_s:>9.1f}",
        "",
        "  where the time goes (seconds from process start)",
        f"  foldfed  start-up + plan_chunks  {f['to_upload_start_s']:>7.2f}"
        f"   (import-only process {up['seconds']:.2f}, plan_chunks {hash_s:.2f})",
        f"           transfer to receipt    {f['transfer_s']:>7.2f}"
        f"   {mib / f['transfer_s']:.1f} MiB/s; hub had it all at {f['to_delivered_s']:.2f}",
        f"           exit                   {f['exit_s']:>7.2f}",
        f"  bare     start-up + connect     {b['to_first_publish_s']:>7.2f}"
        f"   (import-only process {bare['seconds']:.2f})",
        f"           first publish to ack   {b['transfer_s']:>7.2f}"
        f"   {mib / b['transfer_s']:.1f} MiB/s; publisher exited at {b['publisher_exit_s']:.2f}",
        f"  transfer phases only, foldfed / bare: {transfer_ratio:.2f}",
        "",
        f"  CPU seconds     {'sender':>9}{'receiver':>9}{'broker':>9}{'share':>9}"
        f"{'other':>9}{'share':>9}",
        _cpu_row("foldfed", cpu_f, f["other_cpu_s"], f["seconds"]),
        _cpu_row("bare", cpu_b, b["other_cpu_s"], b["seconds"]),
        f"  share = of {ncpu} CPUs x the run's seconds (near 100%: CPU-bound); other = every"
        " other process on the machine meanwhile",
        *(
            [f"  WARNING: other processes used {other:.0%} of the machine: numbers are skewed"]
            if other > OTHER_LOAD_WARN
            else []
        ),
        "",
        f"  peak RSS (MiB)  {'peak':>9}{'import':>9}{'above':>9}"
        f"{'pk/win':>9}{'ab/win':>9}{'pk/delta':>9}{'ab/delta':>9}",
        _rss_row("uploader", f["uploader_rss_mib"], up["rss_mib"], window_bytes, delta_bytes),
        _rss_row("ingest", f["ingest_rss_mib"], ing["rss_mib"], window_bytes, delta_bytes),
        _rss_row(
            "bare publisher", b["publisher_rss_mib"], bare["rss_mib"], window_bytes, delta_bytes
        ),
        _rss_row(
            "bare consumer", b["consumer_rss_mib"], bare["rss_mib"], window_bytes, delta_bytes
        ),
        f"  import = a process that only imports that side's modules; above = peak - import;"
        f" win = window x chunk = {window_bytes / MIB:g} MiB; delta = {mib:.0f} MiB",
    ]
    return "\n".join(lines)


def result_fields(result: dict[str, Any]) -> dict[str, ResultValue]:
    f, b = result["foldfed_median"], result["bare_median"]
    return {
        "ratio": result["ratio"],
        "foldfed_mib_s": f["mib_s"],
        "bare_mib_s": b["mib_s"],
        "uploader_peak_rss_mib": f["uploader_rss_mib"],
        "ingest_peak_rss_mib": f["ingest_rss_mib"],
    }


def machine_line(broker_version: str) -> str:
    return (
        f"Python {platform.python_version()}, RabbitMQ {broker_version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}"
    )


# --------------------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from foldfed.format import validate_chunk_size
    from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed

    validate_chunk_size(args.chunk_mib * MIB)
    ensure_rabbitmq_installed()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir).resolve()
            work.mkdir(parents=True, exist_ok=False)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="foldfed-bench-")))
        check_disk(work, args.size_mib * MIB)
        broker = LocalBroker(work / "broker")
        try:
            return bench_on(args, work, broker)
        finally:
            # Before the temp folder goes; a second Ctrl-C must not cut this short.
            with signals_deferred():
                stop_all_children()
                broker.stop(20.0)


def bench_on(args: argparse.Namespace, work: Path, broker: LocalBroker) -> dict[str, Any]:
    from foldfed import topology

    code = code_version()
    print(f"starting RabbitMQ in {work / 'broker'} ...", flush=True)
    admin_url = broker.start()
    version = broker.rabbitmqctl("version").strip()
    password = secrets.token_hex(16)
    perms = topology.participant_permissions(PARTICIPANT)
    broker.add_user(
        PARTICIPANT, password, configure=perms.configure, write=perms.write, read=perms.read
    )
    delta = work / "delta.safetensors"
    print(f"writing a {args.size_mib} MiB delta ...", flush=True)
    delta_bytes = write_bench_delta(delta, args.size_mib, args.seed)
    window, prefetch = foldfed_defaults()
    ctx = Context(
        work=work,
        admin_url=admin_url,
        bench_url=user_url(admin_url, PARTICIPANT, password),
        delta=delta,
        delta_bytes=delta_bytes,
        chunk_size=args.chunk_mib * MIB,
        window=window,
        prefetch=prefetch,
        timeout_s=args.timeout_s or 120.0 + args.size_mib * 0.5,
        base_env=clean_env(),
        broker_pid=broker.status().pid,
    )
    hash_seconds = time_plan_chunks(delta, ctx.chunk_size)
    baselines = {
        "uploader": measure_import(ctx, "uploader", UPLOADER_MODULES),
        "ingest": measure_import(ctx, "ingest", INGEST_MODULES),
        "bare": measure_import(ctx, "bare", BARE_MODULES),
    }
    foldfed_runs: list[FoldfedRun] = []
    bare_runs: list[BareRun] = []
    for i in range(args.repeats):
        print(f"run {i + 1}/{args.repeats}: foldfed ...", end=" ", flush=True)
        foldfed_runs.append(run_foldfed(ctx, i))
        print(f"{foldfed_runs[-1].mib_s:.1f} MiB/s; bare ...", end=" ", flush=True)
        bare_runs.append(run_bare(ctx, i))
        print(f"{bare_runs[-1].mib_s:.1f} MiB/s", flush=True)
    foldfed_median, bare_median = median_of(foldfed_runs), median_of(bare_runs)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_line(version),
        "code": code,
        "params": {
            "size_mib": args.size_mib,
            "delta_bytes": delta_bytes,
            "delta_mib": delta_bytes / MIB,
            "chunk_size": ctx.chunk_size,
            "chunks": ctx.chunks,
            "window": window,
            "prefetch": prefetch,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "ratio": foldfed_median["mib_s"] / bare_median["mib_s"],
        "ratio_goal": RATIO_GOAL,
        "hash_seconds": hash_seconds,
        "hash_mib_s": delta_bytes / MIB / hash_seconds,
        "import_baseline": {k: asdict(v) for k, v in baselines.items()},
        "foldfed_median": foldfed_median,
        "bare_median": bare_median,
        "foldfed_runs": [asdict(r) for r in foldfed_runs],
        "bare_runs": [asdict(r) for r in bare_runs],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="foldfed upload->ingest vs the bare RabbitMQ pipe: throughput and memory"
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="delta size (default 1024)")
    parser.add_argument("--chunk-mib", type=int, default=4, help="chunk size (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="foldfed/bare pairs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the delta's tensors")
    parser.add_argument("--timeout-s", type=float, default=0.0, help="per transfer (0: auto)")
    parser.add_argument("--workdir", default="", help="a new folder to keep (default: a temp)")
    # The bare roles: this file run as the baseline's publisher or consumer.
    hidden = argparse.SUPPRESS
    parser.add_argument(
        "--role", choices=["bench", "bare-publish", "bare-consume"], default="bench", help=hidden
    )
    parser.add_argument("--delta", help=hidden)
    parser.add_argument("--chunk-size", type=int, help=hidden)
    parser.add_argument("--window", type=int, help=hidden)
    parser.add_argument("--count", type=int, help=hidden)
    parser.add_argument("--prefetch", type=int, help=hidden)
    add_quick_option(parser, {"size_mib": 16}, argv)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeats < 1 or args.timeout_s < 0:
        parser.error("--size-mib and --repeats must be >= 1, --timeout-s >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "bare-publish":
        url = os.environ[URL_ENV]
        out = asyncio.run(bare_publish(url, Path(args.delta), args.chunk_size, args.window))
        print(json.dumps(out), flush=True)
        return 0
    if args.role == "bare-consume":
        out = asyncio.run(bare_consume(os.environ[URL_ENV], args.count, args.prefetch))
        print(json.dumps(out), flush=True)
        return 0
    return run_bench(
        args,
        bench,
        render,
        "transfer",
        result_fields=result_fields,
        interrupted="\ninterrupted: children ended, broker stopped",
        failed="bench failed: ",
    )


if __name__ == "__main__":
    sys.exit(main())

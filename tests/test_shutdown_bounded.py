"""Bounded shutdown (docs/shutdown.md): every service is gone within 10 s of SIGTERM in any
state, a broker that is blocked or gone included; a restart after such a stop completes
the step bit-identical; `foldfed demo` and `foldfed loadtest` leave no process of theirs
behind on SIGTERM, SIGINT or SIGHUP. Real processes, a real broker, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_federation import STEPS, direct_fedavg

from foldfed import settings
from foldfed.bus import unless_stopped
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.interrupts import Interrupted, StopOnSignals
from foldfed.localbroker.processes import BrokerProcesses
from foldfed.localbroker.procfs import alive
from foldfed.runtime import SHUTDOWN_BOUND_S, stop_within
from foldfed.settings import env_for, load
from foldfed.trainer.backends.sim import SimSettings
from foldfed.trainer.families import load_family

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, reset_topology

MIB = 1 << 20

# ------------------------------------------------------------------ the stop, in-process


def test_a_body_that_stops_by_itself_keeps_its_result() -> None:
    async def body(stop: asyncio.Event) -> str:
        await stop.wait()
        return "clean"

    async def main() -> str | None:
        stop = asyncio.Event()
        task = asyncio.create_task(body(stop))
        asyncio.get_running_loop().call_later(0.05, stop.set)
        return await stop_within(task, stop, drain_s=5.0, cancel_s=1.0)

    assert asyncio.run(main()) == "clean"


def test_a_body_that_ignores_stop_is_cancelled_after_the_drain() -> None:
    cleaned: list[str] = []

    async def body(stop: asyncio.Event) -> str:
        try:
            await asyncio.sleep(3600)  # an upload waiting for a receipt, say
        finally:
            cleaned.append("finally ran")
        return "never"

    async def main() -> tuple[str | None, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(body(stop))
        stop.set()
        started = time.monotonic()
        result = await stop_within(task, stop, drain_s=0.2, cancel_s=1.0)
        return result, time.monotonic() - started

    result, took = asyncio.run(main())
    assert result is None and cleaned == ["finally ran"]
    assert took < 1.0


def test_an_error_of_a_body_that_was_not_cancelled_is_raised() -> None:
    async def body(_stop: asyncio.Event) -> None:
        raise ValueError("broken")

    async def main() -> None:
        stop = asyncio.Event()
        await stop_within(asyncio.create_task(body(stop)), stop, drain_s=1.0, cancel_s=1.0)

    with pytest.raises(ValueError, match="broken"):
        asyncio.run(main())


def test_unless_stopped_abandons_a_wait_at_stop() -> None:
    async def main() -> tuple[object, object]:
        stop = asyncio.Event()
        done = await unless_stopped(asyncio.sleep(0, "done"), stop)
        asyncio.get_running_loop().call_later(0.05, stop.set)
        abandoned = await unless_stopped(asyncio.sleep(3600), stop)
        return done, abandoned

    assert asyncio.run(main()) == ("done", None)


def test_the_first_signal_terminates_raises_and_stops_once_and_later_ones_are_ignored() -> None:
    calls: list[str] = []
    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(Interrupted) as raised, StopOnSignals() as signals:
        signals.track(lambda: calls.append("stop"), lambda: calls.append("terminate"))
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1.0)  # the handler runs at the next bytecode; never reached
        calls.append("not interrupted")
    assert raised.value.signum == signal.SIGHUP and raised.value.exit_status == 129
    assert calls == ["terminate", "stop"]
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_signal_during_the_stop_itself_does_not_interrupt_it() -> None:
    calls: list[str] = []

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, during the stop
        time.sleep(0.05)
        calls.append("stop finished")

    with pytest.raises(Interrupted), StopOnSignals() as signals:
        signals.track(stop)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
    assert calls == ["stop finished"]


# ------------------------------------------------------------------ helpers


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _group_members(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes in any of `pgids`."""
    members = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and int(fields[2]) in pgids and fields[0] not in ("Z", "X"):
            members.append(pid)
    return members


def _timed_stop(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    """SIGTERM to all at once; seconds until each one exited (inf: still alive at 2x the
    bound, then SIGKILLed)."""
    started = time.monotonic()
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    took: dict[str, float] = {}
    while len(took) < len(procs) and time.monotonic() - started < 2 * SHUTDOWN_BOUND_S:
        for name, proc in procs.items():
            if name not in took and proc.poll() is not None:
                took[name] = time.monotonic() - started
        time.sleep(0.02)
    for name, proc in procs.items():
        if name not in took:
            took[name] = float("inf")
            proc.kill()
            proc.wait(10)
    return took


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def _confirmed_chunks(federation: LocalFederation, participant: str, step: int) -> int:
    for process in federation.dead():
        raise AssertionError(f"{process.name} died:\n{process.log()[-3000:]}")
    journal = federation.spool_of(participant) / "uploads" / f"step-{step:012d}" / "confirmed"
    return journal.stat().st_size // 4 if journal.exists() else 0


class BrokerPipe:
    """A TCP relay between the services and the broker that can go `blocked` (bytes are
    taken and never passed on: a broker under an alarm or a dead link, where a close never
    gets its close-ok) or `gone` (every connection cut, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.mode = "forward"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "gone":
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                while self.mode == "blocked":
                    time.sleep(0.05)
                if self.mode == "gone":
                    return
                dst.sendall(data)
        except OSError:
            return

    def block(self) -> None:
        self.mode = "blocked"

    def cut(self) -> None:
        self.mode = "gone"
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.cut()


def _sim_federation(
    broker: BrokerHandle,
    workdir: Path,
    *,
    slow: str,
    steps: int = STEPS,
    participants: tuple[str, ...] = PARTICIPANTS,
) -> LocalFederation:
    """A federation of the `sim` family (6 chunks of 1 MiB per delta, the same bytes in
    every run), `slow`'s uploader at 1 MiB/s, so that its upload lasts seconds; broker
    started, θ_0 written, no process started yet."""
    asyncio.run(reset_topology(broker.admin_url))
    no_compute = {step: 0.0 for step in range(1, steps + 2)}
    sim = SimSettings(weight=100.0, elements=6 * MIB // 4, compute_s=no_compute)
    spec = FederationSpec(
        participants=participants,
        steps=steps,
        workdir=workdir,
        # Retention off: direct_fedavg reads every step's sent delta (docs/retention.md).
        common_env={
            **env_for(seed=7, tracing=False, reply_timeout_s=10.0, retain_steps=0),
            **sim.env(),
        },
        participant_env={slow: env_for(rate_limit_bps=MIB)},
        monitor_port=0,
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    load_family("sim").write_initial_model(federation.initial_model, load(sim.env()), 7)
    return federation


def _until_final(federation: LocalFederation, timeout: float) -> None:
    """Until every participant holds the final model (released after the last step)."""
    import json

    def done() -> bool:
        for process in federation.dead():
            raise AssertionError(f"{process.name} died:\n{process.log()[-3000:]}")
        for participant in PARTICIPANTS:
            path = federation.spool_of(participant) / "model" / "current.json"
            try:
                if json.loads(path.read_text()).get("step") != STEPS + 1:
                    return False
            except (OSError, ValueError):
                return False
        return True

    _wait_for(done, timeout, "the final release")


def _final_digests(federation: LocalFederation) -> set[str]:
    import json

    return {
        json.loads((federation.spool_of(p) / "model" / "current.json").read_text())["model_digest"]
        for p in PARTICIPANTS
    }


# ------------------------------------------------------------------ services


@pytest.mark.broker
@pytest.mark.slow
def test_sigterm_mid_upload_stops_in_time_and_the_restart_is_bit_identical(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    slow = PARTICIPANTS[1]
    federation = _sim_federation(broker, tmp_path, slow=slow)
    uploader = f"{slow}-uploader"
    try:
        federation.start_all()
        # Step 2: a chunk confirmed, the other five still to go at 1 MiB/s.
        _wait_for(lambda: _confirmed_chunks(federation, slow, 2) >= 1, 120, "step 2's upload")
        assert _confirmed_chunks(federation, slow, 2) < 6
        took = _timed_stop({uploader: federation.processes[uploader].proc})
        assert took[uploader] < SHUTDOWN_BOUND_S, took
        assert "stopped mid-upload" in federation.processes[uploader].log()
        federation.restart(uploader)
        _until_final(federation, 180)
    finally:
        federation.stop()
    # The same model as the weighted mean of the deltas written, recomputed here.
    digests = _final_digests(federation)
    assert len(digests) == 1
    assert digests == {direct_fedavg(federation).hex()}


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("broker_state", ["blocked", "gone"])
def test_every_service_stops_in_time_when_the_broker_is_blocked_or_gone(
    broker: BrokerHandle, tmp_path: Path, broker_state: str
) -> None:
    slow = PARTICIPANTS[1]
    two = PARTICIPANTS[:2]  # every kind of service, fewer processes to start
    federation = _sim_federation(broker, tmp_path, slow=slow, steps=50, participants=two)
    pipe = BrokerPipe(int(broker.admin_url.rsplit(":", 1)[1].split("/")[0]))
    # Every process reaches the broker through the pipe.
    federation.admin_url = federation.admin_url.replace(
        f":{broker.admin_url.rsplit(':', 1)[1].split('/')[0]}/", f":{pipe.port}/"
    )
    try:
        federation.start_all()
        for participant in two:
            federation.wait_for_log(f"{participant}-trainer", "trainer ready")
        # Mid-upload: the slow participant is sending step 1's chunks.
        _wait_for(lambda: _confirmed_chunks(federation, slow, 1) >= 1, 120, "step 1's upload")
        pipe.block() if broker_state == "blocked" else pipe.cut()
        time.sleep(1.0)  # publishes, heartbeats and consumers now wait on the broker
        procs = {name: p.proc for name, p in federation.processes.items()}
        took = _timed_stop(procs)
    finally:
        federation.stop()
        pipe.close()
    assert set(procs) >= {"aggregator", "barrier", "monitor", f"{slow}-uploader"}
    late = {name: s for name, s in took.items() if s >= SHUTDOWN_BOUND_S}
    assert not late, {name: f"{s:.1f} s" for name, s in took.items()}


@pytest.mark.timeout(60)
def test_a_body_stuck_in_a_thread_ends_by_the_hard_exit(tmp_path: Path) -> None:
    """A finalize of a large model in a worker thread cannot be cancelled: the process still
    ends within the bound, and its stderr says where it was stuck."""
    script = (
        "import asyncio, time\n"
        "from foldfed.runtime import run_service\n"
        "async def body(stop):\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.to_thread(time.sleep, 3600)\n"
        "run_service('stuck', body, tracing=False)\n"
    )
    # No health server: the stuck body is the only thing the process runs.
    health = (settings.variable("health_port"), settings.variable("health_host"))
    env = {k: v for k, v in os.environ.items() if k not in health}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    took = _timed_stop({"stuck": proc})["stuck"]
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert took < SHUTDOWN_BOUND_S, stderr
    assert proc.returncode == 1
    assert "Timeout (" in stderr, stderr  # faulthandler's dump: every thread's stack


# ------------------------------------------------------------------ demo and loadtest


def _watch_command(args: list[str], tmp_path: Path) -> subprocess.Popen[bytes]:
    with open(tmp_path / "command.out", "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            [*FOLDFED, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")},
            cwd=tmp_path,
        )


def _stop_and_check_nothing_left(
    proc: subprocess.Popen[bytes], sig: int, broker_dir: Path, tmp_path: Path
) -> None:
    """Signal the command; it exits with 128 + sig, and nothing it started lives on: no
    process of those it had when signalled, none in their process groups, no broker."""
    started = _descendants(proc.pid)
    groups = {int(f[2]) for pid in started if (f := _stat_fields(pid))} - {os.getpgid(0)}
    broker = BrokerProcesses(broker_dir.resolve())
    assert broker.pids(), "the broker was not running"
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    took = time.monotonic() - t0
    output = (tmp_path / "command.out").read_text(errors="replace")
    assert proc.returncode == 128 + sig, output[-3000:]
    left = [pid for pid in started if alive(pid)]
    assert not left, (left, output[-3000:])
    assert not _group_members(groups), output[-3000:]
    assert not broker.pids(), "the broker's processes survived"
    print(f"stopped {len(started)} processes in {took:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sig", "moment"),
    [(signal.SIGTERM, "running"), (signal.SIGHUP, "starting")],
    ids=["sigterm-running", "sighup-starting"],
)
def test_demo_leaves_nothing_behind(tmp_path: Path, sig: int, moment: str) -> None:
    proc = _watch_command(
        ["demo", "--participants", "2", "--steps", "1000", "--workdir", str(tmp_path / "d")],
        tmp_path,
    )
    try:
        # "starting": the hub's first service is up, the participants not yet.
        needle = "trainer ready" if moment == "running" else "ingest ready"
        name = "company-b-trainer" if moment == "running" else "aggregator"

        def reached() -> bool:
            assert proc.poll() is None, (tmp_path / "command.out").read_text()
            return any(needle in p.read_text() for p in (tmp_path / "d").glob(f"*/logs/{name}.log"))

        _wait_for(reached, 180, f"{name} {needle!r}")
        (run_dir,) = (tmp_path / "d").iterdir()
        _stop_and_check_nothing_left(proc, sig, run_dir / "broker", tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


SCENARIO = """\
name: tiny
description: two sites, small deltas, many steps (long enough to be stopped mid-run)
time_scale: 10
steps: 200
seed: 1
delta_mib: 20
defaults:
  compute: 5
  bandwidth_mbps: 100
  latency_ms: 1
participants:
  - name: site-a
  - name: site-b
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loadtest_leaves_nothing_behind_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(SCENARIO)
    out = tmp_path / "out"
    proc = _watch_command(["loadtest", str(tmp_path / "tiny.yaml"), "--out", str(out)], tmp_path)
    try:

        def running() -> bool:
            assert proc.poll() is None, (tmp_path / "command.out").read_text()
            log = out / "tiny" / "run" / "logs" / "barrier.log"
            return log.exists() and "barrier" in log.read_text()

        _wait_for(running, 180, "the load test's barrier")
        _stop_and_check_nothing_left(proc, signal.SIGTERM, out / "broker", tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(autouse=True)
def _no_stray_handlers() -> Iterator[None]:
    """The in-process signal tests restore the handlers they change."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before

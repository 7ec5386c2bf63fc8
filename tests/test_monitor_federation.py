"""A whole federation with the monitor, every service a real process on the real broker;
one participant is made slower by a known delay per step (FOLDFED_UPLOADER_EXTRA_DELAY_S).

The monitor must charge the barrier's waiting to that participant (within 10 % of the
delay), raise a straggler alert on the wire, project its idle cost over the remaining steps
within 10 %, survive a SIGKILL mid-run and another at the end with the same numbers, serve
valid /metrics and `foldfed status`, and its dashboard must load in a real headless
chromium, showing the current step and the straggler (screenshot in test-artifacts/)."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from foldfed import topology
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _progress
from foldfed.demo.observer import Observer, RunRecord
from foldfed.messages import decode
from foldfed.settings import env_for

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
STEPS = 6
SLOW = "org-c"
DELAY_S = 4.0


async def delete_monitor_queue(admin_url: str) -> None:
    connection = await aio_pika.connect(admin_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(topology.MONITOR_QUEUE)
    finally:
        await connection.close()


def get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except (urllib.error.URLError, OSError):
        return None  # the monitor is restarting


def state(federation: LocalFederation) -> dict[str, Any] | None:
    body = get(federation.monitor_url + "api/state")
    return None if body is None else json.loads(body)


class Sampler:
    """Polls the monitor during the run: SIGKILLs it (and restarts it) once the first step
    closed, and keeps the first picture taken with 3 or more steps closed."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.mid: dict[str, Any] | None = None
        self.killed_at_closed: int | None = None

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            snap = await asyncio.to_thread(state, self.federation)
            if snap is not None:
                closed = snap["cycle"]["closed"]
                if self.killed_at_closed is None and closed >= 1:
                    self.killed_at_closed = closed
                    await asyncio.to_thread(restart_monitor, self.federation)
                elif self.mid is None and 3 <= closed <= STEPS - 2:
                    self.mid = snap
            await asyncio.sleep(0.2)


def restart_monitor(federation: LocalFederation) -> None:
    federation.kill("monitor")  # SIGKILL
    before = federation.processes["monitor"].log()
    federation.restart("monitor")
    federation.restarted.add("monitor")
    deadline = time.monotonic() + 60
    while federation.processes["monitor"].log().count("monitor ready") <= before.count(
        "monitor ready"
    ):
        assert time.monotonic() < deadline, federation.processes["monitor"].log()[-3000:]
        time.sleep(0.1)


async def listen_alerts(admin_url: str) -> tuple[aio_pika.abc.AbstractConnection, list]:
    """What the monitor publishes (monitor.*), as a separate operator tool would see it."""
    connection = await aio_pika.connect(admin_url)
    channel = await connection.channel()
    events = await channel.declare_exchange(
        topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(events, "monitor.#")
    seen: list = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen.append(decode(message.type, message.body))

    await queue.consume(on_message, no_ack=True)
    return connection, seen


def start_in_order(federation: LocalFederation) -> None:
    """Hub, monitor and participants first; the barrier (which releases step 1) once every
    trainer is ready, so step 1 is not skewed by process start-up."""
    federation.start("aggregator", ["aggregator"], federation.hub_env())
    federation.wait_for_log("aggregator", "ingest ready")
    federation.start_monitor()
    for p in PARTICIPANTS:
        federation.start_participant(p)
    for p in PARTICIPANTS:
        federation.wait_for_log(f"{p}-trainer", "trainer ready", timeout=120)
        federation.wait_for_log(f"{p}-uploader", "uploader ready", timeout=120)
    federation.start("barrier", ["barrier"], federation.hub_env())


async def run(federation: LocalFederation, record: RunRecord) -> tuple[Sampler, list]:
    connection, alerts = await listen_alerts(federation.admin_url)
    observer = Observer(federation.admin_url, record)
    await observer.start()
    await asyncio.to_thread(start_in_order, federation)
    sampler = Sampler(federation)
    done = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(done))
    try:
        await _progress(federation, record, observer, timeout_s=300)
    finally:
        done.set()
        await sampling
        await observer.close()
    await asyncio.sleep(1.0)  # the last alerts, if any, reach the listener
    await connection.close()
    return sampler, alerts


def wait_until_done(federation: LocalFederation, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        snap = state(federation)
        if snap and snap["cycle"]["done"] and snap["cycle"]["closed"] == STEPS:
            return snap
        assert time.monotonic() < deadline, snap
        time.sleep(0.2)


def numbers(snap: dict[str, Any]) -> dict[str, Any]:
    """What must survive a restart: everything that does not depend on the clock now."""
    volatile = {"heartbeat_age_s", "silent"}
    return {
        "cycle": snap["cycle"],
        "steps": snap["steps"],
        "alerts": snap["alerts"],
        "table": [{k: v for k, v in row.items() if k not in volatile} for row in snap["table"]],
        "current_step": snap["current_step"],
        "eta_s": snap["eta_s"],
    }


@pytest.fixture(scope="module")
def slow_run(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    asyncio.run(reset_topology(broker.admin_url))
    asyncio.run(delete_monitor_queue(broker.admin_url))
    workdir = tmp_path_factory.mktemp("monitor-run")
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        common_env=env_for(seed=7, local_steps=2, grad_accum=2, heartbeat_s=1.0),
        participant_env={SLOW: env_for(uploader_extra_delay_s=DELAY_S)},
        monitor_port=0,
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    from foldfed.trainer.task import initial_model

    initial_model(federation.initial_model, 7)
    record = RunRecord(spec.participants, spec.steps)
    # The monitor is killed on purpose: the run's liveness check must not count that.
    federation.crash_env = {"monitor": {}}
    try:
        sampler, alerts = asyncio.run(run(federation, record))
        final = wait_until_done(federation)
        yield federation, sampler, alerts, final
    finally:
        federation.stop()
        asyncio.run(delete_monitor_queue(broker.admin_url))


def test_barrier_wait_is_attributed_to_the_slow_participant(slow_run) -> None:
    _, _, _, final = slow_run
    steps = [s for s in final["steps"] if s["closed"]]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    held = [s["held_s"] for s in steps]
    print(f"held by {SLOW} per step (s): {[round(h, 3) for h in held]}; injected {DELAY_S} s")
    assert all(s["holder"] == SLOW for s in steps), [s["holder"] for s in steps]
    assert statistics.mean(held) == pytest.approx(DELAY_S, rel=0.10)
    row = {r["participant"]: r for r in final["table"]}
    assert row[SLOW]["idle_s"] == pytest.approx(sum(held))
    assert row[SLOW]["idle_s"] == pytest.approx(STEPS * DELAY_S, rel=0.10)
    assert all(row[p]["idle_s"] == 0.0 for p in PARTICIPANTS if p != SLOW)
    # Each participant's own phases are there for every step, and the slow one's
    # compute phase (release received -> upload start, its own clock) carries the delay.
    extra = []
    for s in steps:
        for p in PARTICIPANTS:
            phases = s["participants"][p]
            assert phases["compute_s"] is not None and phases["upload_s"] is not None
            assert phases["wait_s"] is not None and phases["wait_s"] >= 0
        others = max(s["participants"][p]["compute_s"] for p in PARTICIPANTS if p != SLOW)
        extra.append(s["participants"][SLOW]["compute_s"] - others)
    print(f"{SLOW}'s extra compute phase per step (s): {[round(e, 3) for e in extra]}")
    assert statistics.median(extra) == pytest.approx(DELAY_S, rel=0.10)


def test_a_straggler_alert_goes_out_once_and_the_page_flags_it(slow_run) -> None:
    federation, _, alerts, final = slow_run
    stragglers = [a for a in alerts if a.kind == "straggler"]
    assert [(a.participant, a.service) for a in stragglers] == [(SLOW, "monitor")]
    assert stragglers[0].step == 3  # slow in 3 of the first 3 steps (rule: 3 of 5)
    assert {r["participant"]: r["straggler"] for r in final["table"]} == {
        p: p == SLOW for p in PARTICIPANTS
    }
    assert "STRAGGLER" in federation.processes["monitor"].log()


def test_projected_idle_cost_over_the_remaining_steps_is_right(slow_run) -> None:
    _, sampler, _, final = slow_run
    mid = sampler.mid
    assert mid is not None, "no picture with 3..4 steps closed was taken"
    closed, remaining = mid["cycle"]["closed"], mid["cycle"]["remaining"]
    projected = {r["participant"]: r["projected_idle_s"] for r in mid["table"]}[SLOW]
    actual = sum(s["held_s"] for s in final["steps"] if s["step"] > closed)
    print(
        f"after {closed} steps: projected {projected:.2f} s over {remaining} steps; "
        f"actual {actual:.2f} s; injected {DELAY_S * remaining:.2f} s"
    )
    assert remaining == STEPS - closed >= 2
    assert projected == pytest.approx(actual, rel=0.10)
    assert projected == pytest.approx(DELAY_S * remaining, rel=0.10)
    # The ETA then was the rest of the cycle at the measured pace, not nothing.
    assert mid["eta_s"] is not None and mid["eta_s"] > 0
    last = final["steps"][-1]
    ended_ms = last["released_ms"] + 1000 * last["wall_s"]
    actual_rest = (ended_ms - mid["now_ms"]) / 1e3
    print(f"ETA then {mid['eta_s']:.1f} s; the cycle ended {actual_rest:.1f} s later")


def test_sigkilled_monitor_rebuilds_the_same_numbers(slow_run) -> None:
    federation, sampler, _, final = slow_run
    assert sampler.killed_at_closed is not None  # killed mid-run, caught up after
    restart_monitor(federation)
    rebuilt = wait_until_done(federation)
    assert numbers(rebuilt) == numbers(final)
    log = federation.processes["monitor"].log()
    assert "state rebuilt from the store" in log


def test_metrics_and_status_tell_the_same_story(slow_run) -> None:
    federation, _, _, _ = slow_run
    body = get(federation.monitor_url + "metrics")
    assert body is not None
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    straggler = {
        s.labels["participant"]: s.value for s in families["foldfed_participant_straggler"].samples
    }
    assert straggler == {p: float(p == SLOW) for p in PARTICIPANTS}
    assert families["foldfed_steps_closed"].samples[0].value == STEPS
    result = subprocess.run(
        [*FOLDFED, "status", "--url", federation.monitor_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert f"cycle done: {STEPS} steps" in result.stdout
    assert f"held by {SLOW}" in result.stdout
    assert any(SLOW in line and "STRAGGLER" in line for line in result.stdout.splitlines())


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed (make chromium: Debian's package)"
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_dashboard_loads_in_a_real_browser(slow_run, tmp_path: Path) -> None:
    federation, _, _, final = slow_run
    url = federation.monitor_url
    dom = chromium("--dump-dom", url, tmp=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f'id="current-step">{final["current_step"]}<' in html
    assert final["current_step"] == STEPS
    assert f'<tr data-participant="{SLOW}"><td>{SLOW}</td><td class="bad">STRAGGLER</td>' in html
    assert "<svg" in html and html.count("<rect") >= STEPS * len(PARTICIPANTS) * 3
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "monitor-dashboard.png"
    shot.unlink(missing_ok=True)
    result = chromium(
        f"--screenshot={shot}", "--window-size=1280,900", url, tmp=tmp_path / "profile-shot"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(shot) == (1280, 900)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

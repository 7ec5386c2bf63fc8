"""The monitor service on the real broker with real uploader processes: a participant whose
heartbeats stop (SIGKILL) or never start is flagged SILENT while the open step waits for it;
forged heartbeats and events are not believed (dead-lettered with the reason)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.domain import Event, Heartbeat
from foldfed.messages import now_ms
from foldfed.settings import env_for

from conftest import BrokerHandle, Service, participant_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SILENT_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def delete_monitor_queue(admin_url: str) -> None:
    connection = await aio_pika.connect(admin_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(topology.MONITOR_QUEUE)
    finally:
        await connection.close()


async def publish_as(url: str, key: str, msg: Event | Heartbeat) -> None:
    bus = await Bus.connect(BusSettings(url, 30.0, 8), name="test")
    try:
        await bus.publish(topology.EVENTS_EXCHANGE, key, msg, mandatory=False)
    finally:
        await bus.close()


def state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=5) as response:
        return json.loads(response.read())


def wait_for(url: str, what, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        snap = state(url)
        if what(snap):
            return snap
        assert time.monotonic() < deadline, json.dumps(snap, indent=1)[:4000]
        time.sleep(0.2)


def row(snap: dict[str, Any], participant: str) -> dict[str, Any]:
    return {r["participant"]: r for r in snap["table"]}[participant]


def alerts_for(snap: dict[str, Any], participant: str) -> list[dict[str, Any]]:
    return [a for a in snap["alerts"] if a["kind"] == "silent" and a["participant"] == participant]


async def read_dead_letters(admin_url: str) -> list[tuple[str, str]]:
    connection = await aio_pika.connect(admin_url)
    out = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.DEAD_QUEUE, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = message.headers or {}
            out.append((str(message.type), str(headers.get(topology.REASON_HEADER, ""))))
    finally:
        await connection.close()
    return out


def test_silent_participants_are_flagged_and_forgeries_ignored(
    broker: BrokerHandle, hub: tuple[dict[str, str], Service], tmp_path: Path
) -> None:
    env, _ingest = hub
    asyncio.run(delete_monitor_queue(broker.admin_url))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    monitor = Service(
        ["monitor"],
        {
            **env,
            **env_for(
                steps=3,
                monitor_host="127.0.0.1",
                monitor_port=port,
                monitor_silent_s=SILENT_S,
                monitor_tick_s=0.2,
            ),
        },
        tmp_path / "monitor.log",
    )
    uploaders: dict[str, Service] = {}
    try:
        monitor.wait_for_log("monitor ready")
        # The barrier's word that step 1 is open (the hub's own identity).
        asyncio.run(
            publish_as(
                broker.admin_url,
                "barrier.step_released",
                Event("step_released", "barrier", "", 1, "x", {}, now_ms()),
            )
        )
        # org-a pretends to be org-c: a heartbeat and a delivery it has no say about.
        forged_beat = Heartbeat("uploader", "org-c", 1, "uploading", now_ms())
        asyncio.run(publish_as(broker.url_for("org-a"), "uploader.heartbeat", forged_beat))
        forged = Event("upload_finished", "uploader", "org-c", 1, "", {"upload_s": 1.0}, now_ms())
        asyncio.run(publish_as(broker.url_for("org-a"), "uploader.upload_finished", forged))
        for p in ("org-a", "org-b"):
            uploaders[p] = Service(
                ["uploader"],
                participant_env(broker, p, tmp_path / p, FOLDFED_HEARTBEAT_S="0.3"),
                tmp_path / f"{p}.log",
            )
            uploaders[p].wait_for_log("uploader ready")
        snap = wait_for(
            url,
            lambda s: (
                all(row(s, p)["heartbeat_age_s"] is not None for p in ("org-a", "org-b"))
                and alerts_for(s, "org-c")
            ),
        )
        # org-c never sent a heartbeat (the forged one does not count): silent, and the open
        # step waits for it.
        assert row(snap, "org-c")["heartbeat_age_s"] is None
        assert row(snap, "org-c")["silent"]
        (alert,) = alerts_for(snap, "org-c")
        assert "step 1 is waiting for it" in alert["detail"]
        assert not row(snap, "org-a")["silent"] and not row(snap, "org-b")["silent"]
        assert snap["steps"][0]["participants"]["org-c"]["upload_s"] is None

        # (Slow to start, org-a and org-b may have been flagged once before their first beat.)
        before = len(alerts_for(snap, "org-b"))
        uploaders["org-b"].kill()  # SIGKILL: its heartbeats stop
        snap = wait_for(url, lambda s: len(alerts_for(s, "org-b")) > before)
        assert row(snap, "org-b")["silent"] and not row(snap, "org-a")["silent"]
        assert row(snap, "org-b")["heartbeat_age_s"] > SILENT_S
        assert "SILENT" in monitor.log()

        letters = asyncio.run(read_dead_letters(broker.admin_url))
        reasons = [reason for _type, reason in letters]
        assert any("forged sender" in r and "Heartbeat" in r and "'org-c'" in r for r in reasons), (
            letters
        )
        assert any("forged sender" in r and "Event" in r for r in reasons), letters
    finally:
        for service in uploaders.values():
            service.stop()
        returncode = monitor.stop()
        asyncio.run(delete_monitor_queue(broker.admin_url))
    # SIGTERM: a graceful stop (consumer, HTTP server and store closed), no traceback.
    assert returncode == 0, monitor.log()[-3000:]
    assert "Traceback" not in monitor.log()

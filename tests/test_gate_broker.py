"""`foldfed gate check` against the real broker, as a real process: a ready participant
passes, its signed record reaches the hub (the events exchange) and verifies; a wrong θ0
digest fails the gate naming the check and its fix; a tampered record does not verify."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import aio_pika
import pytest

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.digests import file_digest
from foldfed.gate.record import verify_record
from foldfed.gate.run import READINESS_KEY
from foldfed.keyfiles import write_keyring, write_private_key
from foldfed.messages import Event, decode
from foldfed.signing import Keyring, SigningKey

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, participant_env, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ORG = PARTICIPANTS[0]
WATCH_QUEUE = "test.gate.readiness"


async def _hub_with_watch(admin_url: str) -> None:
    """The hub's topology, and a queue that sees what the hub's monitor would."""
    bus = await Bus.connect(BusSettings(admin_url, 10.0, 8), name="test-hub")
    try:
        await bus.declare_hub_topology(PARTICIPANTS)
    finally:
        await bus.close()
    connection = await aio_pika.connect(admin_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(WATCH_QUEUE, auto_delete=False)
        await queue.purge()
        await queue.bind(topology.EVENTS_EXCHANGE, READINESS_KEY)
    finally:
        await connection.close()


async def _published(admin_url: str) -> list[tuple[str | None, Event]]:
    connection = await aio_pika.connect(admin_url)
    out = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(WATCH_QUEUE)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            event = decode(message.type, message.body)
            assert isinstance(event, Event)
            out.append((message.user_id, event))
    finally:
        await connection.close()
    return out


@pytest.fixture
def site(broker: BrokerHandle, tmp_path: Path) -> dict[str, object]:
    from foldfed.trainer.task import initial_model

    asyncio.run(reset_topology(broker.admin_url))
    asyncio.run(_hub_with_watch(broker.admin_url))
    theta0 = tmp_path / "theta0.safetensors"
    initial_model(theta0, 3)
    key = SigningKey.generate(ORG)
    write_private_key(tmp_path / f"{ORG}.key", key)
    others = [SigningKey.generate(p).verify_key() for p in PARTICIPANTS[1:]]
    write_keyring(tmp_path / "keyring.json", Keyring((key.verify_key(), *others), 2))
    env = participant_env(
        broker,
        ORG,
        tmp_path / "spool",
        FOLDFED_PARTICIPANTS=",".join(PARTICIPANTS),
        FOLDFED_INITIAL_MODEL=str(theta0),
        FOLDFED_MODEL="mlp",
        FOLDFED_SAMPLES="256",
    )
    return {"env": env, "theta0": file_digest(theta0).hex(), "dir": tmp_path}


def _gate(site: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    folder = site["dir"]
    assert isinstance(folder, Path)
    command = [*FOLDFED, "gate", "check", "--key", str(folder / f"{ORG}.key"), "--cycle", "2"]
    return subprocess.run(
        [*command, *args],
        env=site["env"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=300,
    )


def _verify(record: Path, keyring: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOLDFED, "gate", "verify", str(record), "--keyring", str(keyring)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_ready_participant_passes_publishes_and_its_record_verifies(
    broker: BrokerHandle, site: dict[str, object], hub_clock: str
) -> None:
    folder = site["dir"]
    assert isinstance(folder, Path)
    record = folder / "ready.dsse.json"
    done = _gate(
        site, "--theta0-digest", str(site["theta0"]), "--hub-clock", hub_clock, "--out", str(record)
    )
    print(done.stdout)  # the table, for the docs and the log
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("broker", "clock", "disk", "compute", "theta0"):
        assert any(line.startswith(f"{name} ") and " PASS " in line for line in lines), name
    assert any(line.startswith("data ") and " SKIP " in line for line in lines)
    assert "READY" in lines and "published to the hub" in done.stdout

    # The hub received it from the participant's own broker identity, and it verifies.
    (published,) = asyncio.run(_published(broker.admin_url))
    user_id, event = published
    assert (user_id, event.kind, event.participant) == (ORG, "readiness", ORG)
    assert event.metrics["ready"] == 1.0 and event.metrics["cycle"] == 2.0
    assert json.loads(event.detail) == json.loads(record.read_text())
    verified = _verify(record, folder / "keyring.json")
    assert verified.returncode == 0, verified.stderr
    assert f"verified: {ORG} is READY for cycle 2" in verified.stdout

    # One changed byte of the payload: refused.
    document = json.loads(record.read_text())
    payload = bytearray(base64.b64decode(document["payload"]))
    payload[payload.index(b'"cycle":2') + 8] = ord("3")
    document["payload"] = base64.b64encode(bytes(payload)).decode()
    tampered = folder / "tampered.dsse.json"
    tampered.write_text(json.dumps(document))
    refused = _verify(tampered, folder / "keyring.json")
    assert refused.returncode == 1 and "REFUSED" in refused.stderr


def test_a_wrong_theta0_fails_the_gate_naming_the_check_and_fix(
    broker: BrokerHandle, site: dict[str, object], hub_clock: str
) -> None:
    folder = site["dir"]
    assert isinstance(folder, Path)
    record = folder / "not-ready.dsse.json"
    wrong = "00" * 32
    done = _gate(site, "--theta0-digest", wrong, "--hub-clock", hub_clock, "--out", str(record))
    print(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert any(line.startswith("theta0 ") and " FAIL " in line for line in done.stdout.splitlines())
    assert "FIX theta0: fetch the cycle's θ0 file again" in done.stdout
    assert "NOT READY: 1 check(s) failed" in done.stdout

    (published,) = asyncio.run(_published(broker.admin_url))
    assert published[1].metrics["ready"] == 0.0
    keyring = folder / "keyring.json"
    verified = _verify(record, keyring)
    assert verified.returncode == 0, verified.stderr
    assert "NOT READY (failed: theta0)" in verified.stdout
    readiness = verify_record(
        json.loads(record.read_text()),
        [SigningKey.generate("x").verify_key(), *_keys(keyring)],
    )
    assert readiness.failed_checks() == ["theta0"]


def _keys(path: Path) -> list:
    from foldfed.keyfiles import read_keyring

    return list(read_keyring(path).keys)

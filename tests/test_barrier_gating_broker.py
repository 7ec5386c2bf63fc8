"""Gated cycles over the real broker, every service a real process: two of the three roster
members send ready records, the third a failing one; the barrier starts the cycle by itself
at the deadline with exactly the two, the cycle completes, `foldfed cycle status` names the
failed check, and the round of the next cycle opens at the boundary."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from foldfed import topology
from foldfed.barrier.machine import Phase
from foldfed.barrier.store import BarrierStore
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.digests import file_digest
from foldfed.gate.checks import CheckResult, Result, Terms
from foldfed.gate.record import readiness_statement, sign_record
from foldfed.keyfiles import write_keyring
from foldfed.messages import Event, now_ms
from foldfed.signing import Keyring, SigningKey

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

READY = PARTICIPANTS[:2]
FAILING = PARTICIPANTS[2]
WINDOW_S = 4.0


async def _publish_record(url: str, key: SigningKey, theta0: str, ready: bool) -> None:
    """What `foldfed gate check` publishes (gate/run.py), without measuring anything."""
    checks = [CheckResult("theta0", Result.PASS, "θ0 is the cycle's")]
    if not ready:
        checks.append(CheckResult("disk", Result.FAIL, "0.1 GiB free, 2 GiB needed", "free disk"))
    terms = Terms(cycle=1, theta0_digest=theta0, schema_version="foldfed.data/1")
    statement = readiness_statement(key.name, terms, checks, theta0, "2025-01-01T00:00:00+00:00")
    envelope = sign_record(statement, key)
    event = Event("readiness", "gate", key.name, 0, json.dumps(envelope.to_json()), {}, now_ms())
    bus = await Bus.connect(BusSettings(url, 10.0, 8), name=f"test-gate-{key.name}")
    try:
        await bus.publish(topology.EVENTS_EXCHANGE, topology.READINESS_KEY, event, mandatory=False)
    finally:
        await bus.close()


def _wait_done(db: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with BarrierStore(db) as store:
            state = store.load()
        if state is not None and state.phase is Phase.DONE:
            return
        time.sleep(0.5)
    raise AssertionError(f"the gated cycle did not complete within {timeout_s} s")


def _status(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*FOLDFED, "cycle", "status", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_barrier_starts_a_cycle_with_exactly_the_gated_members(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    from foldfed.trainer.task import initial_model

    asyncio.run(reset_topology(broker.admin_url))
    keys = {p: SigningKey.generate(p) for p in PARTICIPANTS}
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, Keyring(tuple(k.verify_key() for k in keys.values()), 2))
    spec = FederationSpec(
        participants=PARTICIPANTS,  # the roster; only two will gate
        steps=2,
        workdir=tmp_path,
        common_env={
            "FOLDFED_SEED": "7",
            "FOLDFED_GATED_CYCLES": "on",
            "FOLDFED_CONSORTIUM_KEYRING": str(keyring),
            "FOLDFED_GATE_WINDOW_S": str(WINDOW_S),
            "FOLDFED_GATE_MIN_MEMBERS": "2",
        },
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    initial_model(federation.initial_model, 7)
    theta0 = file_digest(federation.initial_model).hex()
    try:
        federation.start_hub()
        federation.wait_for_log("barrier", "barrier ready")
        for p in PARTICIPANTS:
            asyncio.run(_publish_record(broker.url_for(p), keys[p], theta0, p in READY))
        for p in READY:
            federation.start_participant(p)
        federation.wait_for_log("barrier", "gated cycle starts", timeout=60)
        db = federation.hub_dir / "barrier.sqlite3"
        _wait_done(db, timeout_s=240)
        env = {**os.environ, **federation.hub_env()}
        cycle1 = _status(env, "--cycle", "1")
        print(cycle1)  # for the docs
        nxt = _status(env)
        print(nxt)
    finally:
        federation.stop()
    with BarrierStore(db) as store:
        state = store.load()
        assert state is not None and state.phase is Phase.DONE and state.cycle == 1
        assert state.participants == frozenset(READY)
        history = store.step_history(cycle=1)
        assert [r.step for r in history] == [1, 2]
        assert all(r.delivered == frozenset(READY) for r in history)
        latest = store.latest_round()
        assert latest is not None and latest[0].cycle == 2 and latest[1] is None
        assert latest[0].theta0 == state.model_digest and latest[0].first_step == 4
        store.verify()
    assert "started at its deadline" in cycle1 and "org-a, org-b" in cycle1
    failing = next(line for line in cycle1.splitlines() if line.startswith(FAILING))
    assert "failed" in failing and "disk: 0.1 GiB free" in failing and "free disk" in failing
    assert "cycle 2: gating open" in nxt
    assert all("pending" in line for line in nxt.splitlines() if line.startswith("org-"))

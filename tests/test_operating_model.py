"""The operating model end to end over the real broker, every party a real process
(docs/operating-model.md): three companies gate for cycle 1 with `foldfed gate check`;
org-c split its data with another held-out fraction, so its blind-split reference hash is
not the consortium's: it fails gating, the barrier starts cycle 1 without it and `foldfed
cycle status` names the reason. Cycle 1's final model is evaluated at org-a and org-b
(their held-out metrics, release vs θ0, from their own model reports), approved 2-of-3
and published with `foldfed checkpoint`. org-c fixes its split and gates with
`--after-release`: it is admitted to cycle 2 at the boundary with no hub redeploy, trains
in it, and evaluates the release too. `foldfed checkpoint verify` passes, then fails once
one byte of the weights changes.

The smoke form (make test): a late joiner gates with `--after-release` against a release
built in-process, its spool then holds the release's model, and `foldfed gate publish`
delivers its record to the hub under its own broker identity."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from foldfed.barrier.machine import Phase
from foldfed.barrier.store import BarrierStore
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.digests import file_digest
from foldfed.keyfiles import read_private_key, write_keyring
from foldfed.messages import now_ms
from foldfed.of3.data.split_standard import SplitConfig, consortium_table, split_reference
from foldfed.signing import Keyring

from conftest import FOLDFED, PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ORG_A, ORG_B, ORG_C = PARTICIPANTS
STEPS = 2  # per cycle: cycle 1 is steps 1-2 and its final release 3; cycle 2 starts at 4
FINAL_1 = STEPS + 1
# Long enough for three `foldfed gate publish` at once on a busy 2-core machine.
WINDOW_S = 10.0
SPLIT_KEY = "the consortium's split key (never published)"
SPLIT = SplitConfig(split_by="entries", heldout_fraction=0.3, companies=3)


def _write_split(path: Path, heldout_fraction: float) -> Path:
    """A site's local split configuration, as `foldfed data sample` writes it."""
    partition = {
        "key": SPLIT_KEY,
        "heldout_fraction": heldout_fraction,
        "companies": list(PARTICIPANTS),
        "cluster": "minhash8",
        "split_by": "entries",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"partition": partition}))
    return path


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [*FOLDFED, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _gate_all(
    federation: LocalFederation, cycle: int, extra: dict[str, list[str]], hub_clock: str
) -> dict[str, subprocess.CompletedProcess[str]]:
    """`foldfed gate check --no-publish` at every company at once (each with its own
    environment); the records are published by `_publish_all`."""
    running = {}
    for p, args in extra.items():
        command = [*FOLDFED, "gate", "check", "--key", str(federation.key_of(p)), "--no-publish"]
        command += ["--hub-clock", hub_clock, "--out", str(_record(federation, p, cycle)), *args]
        running[p] = subprocess.Popen(
            command, env=_env(federation, p), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    return _finish(running)


def _publish_all(federation: LocalFederation, cycle: int) -> None:
    """`foldfed gate publish` at every company at once, right after a deadline (the
    measuring took longer than a window on a busy machine): the three records reach the
    barrier within the same window, so the decision does not depend on the machine's load."""
    _just_after_a_deadline(federation)
    running = {
        p: subprocess.Popen(
            [*FOLDFED, "gate", "publish", str(_record(federation, p, cycle))],
            env=_env(federation, p),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in PARTICIPANTS
    }
    for done in _finish(running).values():
        assert done.returncode == 0 and "published" in done.stdout, done.stdout + done.stderr


def _finish(
    running: dict[str, subprocess.Popen[str]],
) -> dict[str, subprocess.CompletedProcess[str]]:
    done = {}
    for p, proc in running.items():
        out, err = proc.communicate(timeout=300)
        done[p] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _env(federation: LocalFederation, participant: str) -> dict[str, str]:
    return {**os.environ, **federation.participant_env(participant)}


def _record(federation: LocalFederation, participant: str, cycle: int) -> Path:
    return federation.workdir / "sites" / participant / f"readiness-c{cycle}.dsse.json"


def _store(federation: LocalFederation) -> BarrierStore:
    return BarrierStore(federation.hub_dir / "barrier.sqlite3")


def _wait(what: str, timeout_s: float, ready: object) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _cycle_done(federation: LocalFederation, cycle: int) -> bool:
    with _store(federation) as store:
        state = store.load()
    return state is not None and state.cycle == cycle and state.phase is Phase.DONE


def _round_open(federation: LocalFederation, cycle: int) -> bool:
    with _store(federation) as store:
        latest = store.latest_round()
    return latest is not None and latest[0].cycle == cycle


def _just_after_a_deadline(federation: LocalFederation) -> None:
    """Sleep until just after the open round's next deadline, so that a whole window lies
    ahead (the round extends while fewer than the minimum gated)."""
    with _store(federation) as store:
        latest = store.latest_round()
    assert latest is not None and latest[1] is None
    now = now_ms()
    if now - latest[0].opened_ms < 1000:  # it has just opened: the window is ahead
        return
    time.sleep((latest[0].next_deadline(now) - now) / 1000 + 0.3)


def _model_report(federation: LocalFederation, participant: str, step: int) -> dict:
    outbox = federation.spool_of(participant) / "outbox"
    (path,) = [p for p in outbox.glob(f"model-{step:012d}.*") if p.suffix in (".json", ".sent")]
    return json.loads(path.read_text())


def _evaluation(federation: LocalFederation, participant: str, release_step: int) -> dict:
    """The company's evaluation summary of the release: its held-out metrics of the
    released model against its baseline θ0 (aggregates only), from its model reports."""
    release = _model_report(federation, participant, release_step)["metrics"]
    theta0 = _model_report(federation, participant, 1)["metrics"]
    return {
        "benchmark": "held-out set of the mlp task",
        "release": release,
        "theta0": theta0,
        "eval_loss_change": release["eval_loss"] - theta0["eval_loss"],
    }


@pytest.mark.long  # minutes on a busy 2-core machine; the smoke below runs in make test
def test_gating_a_late_joiner_and_a_release_end_to_end(
    broker: BrokerHandle, tmp_path: Path, hub_clock: str
) -> None:
    from foldfed.trainer.task import initial_model

    asyncio.run(reset_topology(broker.admin_url))
    consortium_keyring = tmp_path / "consortium" / "keyring.json"
    expected = split_reference(SPLIT, SPLIT_KEY)
    consortium = tmp_path / "consortium" / "consortium.toml"
    consortium.parent.mkdir(parents=True)
    consortium.write_text(consortium_table(expected) + "\n")
    spec = FederationSpec(
        participants=PARTICIPANTS,  # the roster
        steps=STEPS,
        workdir=tmp_path,
        common_env={
            "FOLDFED_SEED": "7",
            "FOLDFED_SAMPLES": "200",
            "FOLDFED_GATED_CYCLES": "on",
            "FOLDFED_CONSORTIUM_KEYRING": str(consortium_keyring),
            "FOLDFED_GATE_WINDOW_S": str(WINDOW_S),
            "FOLDFED_GATE_MIN_MEMBERS": "2",
            "FOLDFED_SPLIT_REFERENCE_HASH": expected.reference_hash,
        },
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    federation.provision_keys()
    keys = [read_private_key(federation.key_of(p)).verify_key() for p in PARTICIPANTS]
    write_keyring(consortium_keyring, Keyring(tuple(keys), 2))  # 2-of-3 releases
    initial_model(federation.initial_model, 7)
    theta0 = file_digest(federation.initial_model).hex()
    splits = {
        ORG_A: _write_split(tmp_path / "sites" / ORG_A / "sample.json", 0.3),
        ORG_B: _write_split(tmp_path / "sites" / ORG_B / "sample.json", 0.3),
        # org-c split its data holding out 25 %: another standard than the consortium's.
        ORG_C: _write_split(tmp_path / "sites" / ORG_C / "sample.json", 0.25),
    }
    hub = {**os.environ, **federation.hub_env()}
    gov = tmp_path / "governance"
    started = time.monotonic()
    try:
        # ---- cycle 1: three companies gate, org-c fails its split check
        federation.start_hub()
        federation.wait_for_log("barrier", "barrier ready")
        common = ["--consortium", str(consortium)]
        gates = _gate_all(
            federation,
            1,
            {
                p: [*common, "--split", str(splits[p]), "--cycle", "1", "--theta0-digest", theta0]
                for p in PARTICIPANTS
            },
            hub_clock,
        )
        for p in (ORG_A, ORG_B):
            assert gates[p].returncode == 0, gates[p].stdout + gates[p].stderr
        failing = gates[ORG_C]
        print(failing.stdout)  # for the docs
        assert failing.returncode == 1, failing.stdout + failing.stderr
        assert "heldout_fraction: 0.25 here, 0.3 in the consortium's config" in failing.stdout
        assert "FIX split: set the split configuration to the consortium's" in failing.stdout
        _publish_all(federation, 1)
        for p in (ORG_A, ORG_B):
            federation.start_participant(p)
        federation.wait_for_log("barrier", "gated cycle starts", timeout=60)
        status_1 = _run(["cycle", "status", "--cycle", "1"], hub)
        print(status_1)
        assert f"with 2 members: {ORG_A}, {ORG_B}" in status_1
        c_line = next(line for line in status_1.splitlines() if line.startswith(ORG_C))
        assert "failed" in c_line and "split: split configuration differs" in c_line
        _wait("cycle 1 done", 240, lambda: _cycle_done(federation, 1))
        _wait("round 2 open", 30, lambda: _round_open(federation, 2))

        # ---- the release of cycle 1's final model: propose, evaluate, approve 2-of-3
        final = federation.hub_dir / "models" / f"model-{FINAL_1:012d}.safetensors"
        final_digest = file_digest(final)  # retention deletes the file during cycle 2
        proposal = gov / "proposal.json"
        _run(
            [
                *("checkpoint", "propose", str(final), "--cycle", "1", "--step", str(FINAL_1)),
                *("--out", str(proposal)),
            ],
            hub,
        )
        approvals = []
        for p in (ORG_A, ORG_B):
            _wait(f"{p} evaluated the release", 60, lambda p=p: _has_report(federation, p))
            evaluation = gov / f"eval-{p}.json"
            evaluation.write_text(json.dumps(_evaluation(federation, p, FINAL_1)))
            own_copy = federation.spool_of(p) / "model" / f"model-{FINAL_1:012d}.safetensors"
            approval = gov / f"approval-{p}.dsse.json"
            _run(
                [
                    *("checkpoint", "approve", str(proposal), "--weights", str(own_copy)),
                    *("--key", str(federation.key_of(p)), "--evaluation", str(evaluation)),
                    *("--out", str(approval)),
                ],
                hub,
            )
            approvals.append(str(approval))
        bundle = gov / "release-c1"
        _run(
            [
                *("checkpoint", "publish", str(proposal), *approvals, "--weights", str(final)),
                *("--keyring", str(consortium_keyring), "--key", str(federation.key_of(ORG_A))),
                *("--out", str(bundle)),
            ],
            hub,
        )
        verified = _run(
            ["checkpoint", "verify", str(bundle), "--keyring", str(consortium_keyring)], hub
        )
        assert f"approved by {ORG_A}, {ORG_B}" in verified

        # ---- cycle 2: org-c fixes its split; everyone gates after the release
        _write_split(splits[ORG_C], 0.3)
        after = ["--after-release", str(bundle), *common]
        gates = _gate_all(
            federation, 2, {p: [*after, "--split", str(splits[p])] for p in PARTICIPANTS}, hub_clock
        )
        for p in PARTICIPANTS:
            assert gates[p].returncode == 0, gates[p].stdout + gates[p].stderr
            assert "gating for cycle 2" in gates[p].stdout
        print(gates[ORG_C].stdout)
        _publish_all(federation, 2)
        federation.start_participant(ORG_C)  # its gateway: admitted with no hub redeploy
        _wait("cycle 2 started", WINDOW_S + 60, lambda: _decided(federation, 2))
        status_2 = _run(["cycle", "status", "--cycle", "2"], hub)
        print(status_2)
        assert f"with 3 members: {ORG_A}, {ORG_B}, {ORG_C}" in status_2
        _wait("cycle 2 done", 120, lambda: _cycle_done(federation, 2))
        c_evaluation = _model_report(federation, ORG_C, FINAL_1)
        elapsed = time.monotonic() - started
    finally:
        federation.stop()
    print(f"end to end: {elapsed:.1f} s")

    with _store(federation) as store:
        state = store.load()
        assert state is not None and state.cycle == 2 and state.phase is Phase.DONE
        assert state.participants == frozenset(PARTICIPANTS)
        assert [r.delivered for r in store.step_history(cycle=1)] == [{ORG_A, ORG_B}] * STEPS
        history = store.step_history(cycle=2)
        assert [r.step for r in history] == [FINAL_1 + 1, FINAL_1 + 2]
        assert all(r.delivered == frozenset(PARTICIPANTS) for r in history)
        round_2 = store.round_of(2)
        assert round_2 is not None and round_2[0].theta0.hex() == final_digest.hex()
        store.verify()
    # org-c evaluated the release on its own held-out set once it held it.
    assert c_evaluation["model_digest"] == final_digest.hex()
    assert "eval_loss" in c_evaluation["metrics"]

    # One changed byte of the published weights: refused.
    weights = bundle / final.name
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    refused = subprocess.run(
        [*FOLDFED, "checkpoint", "verify", str(bundle), "--keyring", str(consortium_keyring)],
        env=hub,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "the weights file was modified" in refused.stderr


def _has_report(federation: LocalFederation, participant: str) -> bool:
    outbox = federation.spool_of(participant) / "outbox"
    return any(outbox.glob(f"model-{FINAL_1:012d}.*"))


def _decided(federation: LocalFederation, cycle: int) -> bool:
    with _store(federation) as store:
        found = store.round_of(cycle)
    return found is not None and found[1] is not None


# ---------------------------------------------------------------------- smoke


def test_smoke_a_late_joiner_gates_after_a_release_and_publishes(
    broker: BrokerHandle, tmp_path: Path, hub_clock: str
) -> None:
    import aio_pika

    from foldfed import topology
    from foldfed.bus import Bus
    from foldfed.config import BusSettings
    from foldfed.governance.bundle import safetensors_tensor_count, weights_digest, write_bundle
    from foldfed.governance.release import Proposal, approve, assemble_release
    from foldfed.keyfiles import write_private_key
    from foldfed.messages import decode
    from foldfed.signing import SigningKey
    from foldfed.spool import Spool
    from foldfed.trainer.task import initial_model

    from conftest import participant_env

    watch = "test.operating-model.readiness"

    async def hub_and_watch() -> None:
        bus = await Bus.connect(BusSettings(broker.admin_url, 10.0, 8), name="test-hub")
        try:
            await bus.declare_hub_topology(PARTICIPANTS)
        finally:
            await bus.close()
        connection = await aio_pika.connect(broker.admin_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(watch, auto_delete=False)
            await queue.purge()
            await queue.bind(topology.EVENTS_EXCHANGE, topology.READINESS_KEY)
        finally:
            await connection.close()

    async def received() -> list[tuple[str | None, object]]:
        connection = await aio_pika.connect(broker.admin_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(watch)
            out = []
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                out.append((message.user_id, decode(message.type, message.body)))
            await queue.delete(if_unused=False, if_empty=False)
            return out
        finally:
            await connection.close()

    asyncio.run(reset_topology(broker.admin_url))
    asyncio.run(hub_and_watch())
    keys = {p: SigningKey.generate(p) for p in PARTICIPANTS}
    for p, key in keys.items():
        write_private_key(tmp_path / f"{p}.key", key)
    keyring = tmp_path / "keyring.json"
    write_keyring(keyring, Keyring(tuple(k.verify_key() for k in keys.values()), 2))
    # Cycle 1's final model (released as step 3), approved by org-a and org-b.
    final = tmp_path / "release" / f"model-{FINAL_1:012d}.safetensors"
    final.parent.mkdir()
    initial_model(final, 11)
    proposal = Proposal(weights_digest(final), 1, FINAL_1, safetensors_tensor_count(final), "now")
    approvals = [approve(proposal, {"eval_loss": 0.1}, keys[p]) for p in (ORG_A, ORG_B)]
    release = assemble_release(
        proposal, approvals, Keyring(tuple(k.verify_key() for k in keys.values()), 2), keys[ORG_A]
    )
    bundle = tmp_path / "release-c1"
    write_bundle(bundle, final, final.name, release)
    expected = split_reference(SPLIT, SPLIT_KEY)
    consortium = tmp_path / "consortium.toml"
    consortium.write_text(consortium_table(expected) + "\n")
    split = _write_split(tmp_path / "sample.json", 0.3)
    spool = tmp_path / "spool"
    env = participant_env(
        broker,
        ORG_C,
        spool,
        FOLDFED_INITIAL_MODEL=str(tmp_path / "cycle-1-theta0.safetensors"),  # not used
        FOLDFED_PARTICIPANTS=",".join(PARTICIPANTS),
        FOLDFED_MODEL="mlp",
        FOLDFED_SAMPLES="64",
    )
    record = tmp_path / "readiness-c2.dsse.json"
    gate = subprocess.run(
        [
            *FOLDFED, "gate", "check", "--key", str(tmp_path / f"{ORG_C}.key"),
            "--after-release", str(bundle), "--keyring", str(keyring),
            "--consortium", str(consortium), "--split", str(split),
            "--hub-clock", hub_clock, "--out", str(record), "--no-publish",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "gating for cycle 2: θ0 = the release of step 3" in gate.stdout
    assert "approved by org-a, org-b" in gate.stdout
    assert any(line.startswith("split ") and " PASS " in line for line in gate.stdout.splitlines())
    current = Spool(spool).current_model()
    assert current is not None and current.step == FINAL_1
    assert current.model_digest == file_digest(final)

    sent = subprocess.run(
        [*FOLDFED, "gate", "publish", str(record)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0 and "(cycle 2)" in sent.stdout, sent.stdout + sent.stderr
    ((user, event),) = asyncio.run(received())
    assert user == ORG_C
    assert event.participant == ORG_C and event.metrics["cycle"] == 2.0  # type: ignore[attr-defined]
    assert event.metrics["ready"] == 1.0  # type: ignore[attr-defined]
    carried = json.loads(event.detail)  # type: ignore[attr-defined]
    assert carried == json.loads(record.read_text())

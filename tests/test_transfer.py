"""Resumable content-addressed transfer over a real RabbitMQ, with real processes and
real SIGKILLs: nothing is lost, and little is sent twice."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from foldfed.chunkstore import ChunkStore
from foldfed.deltafile import load_delta, write_delta
from foldfed.digests import digest_of
from foldfed.messages import Manifest, decode
from foldfed.payloadfile import plan_chunks

from conftest import (
    FOLDFED,
    PARTICIPANTS,
    BrokerHandle,
    Service,
    participant_env,
    release,
    start_ingest,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MIB = 1 << 20
CHUNK = 4 * MIB


def make_delta(path: Path, mib: int, seed: int) -> Path:
    """A delta of about `mib` MiB: a few float32 tensors from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    elements = mib * MIB // 4
    tensors = {
        "encoder.weight": torch.randn(elements // 2, generator=generator),
        "decoder.weight": torch.randn(elements // 4, generator=generator),
        "head.bias": torch.randn(elements - elements // 2 - elements // 4, generator=generator),
    }
    write_delta(path, tensors)
    return path


def upload(env: dict[str, str], delta: Path, step: int, weight: float = 100.0) -> Service:
    return Service(
        ["upload", "--delta", str(delta), "--step", str(step), "--weight", str(weight)],
        env,
        Path(str(delta) + f".upload-{time.monotonic_ns()}.log"),
    )


def report_of(service: Service, timeout: float = 300.0) -> dict[str, object]:
    out, _ = service.proc.communicate(timeout=timeout)
    code = service.stop()
    assert code == 0, f"upload failed ({code}):\n{service.log()}"
    return json.loads(out.decode().strip().splitlines()[-1])


def stored_payload(state_dir: Path, step: int, participant: str) -> bytes:
    """Reassemble a delivered payload from the hub's store (verifying every chunk)."""
    store = ChunkStore(state_dir / "store")
    raw = store.get_manifest(step, participant)
    assert raw is not None, "hub has no manifest"
    manifest = decode("foldfed.v1.DeltaManifest", raw)
    assert isinstance(manifest, Manifest)
    return b"".join(store.get(d) for d in manifest.chunk_digests)


def confirmed_count(spool: Path, step: int) -> int:
    path = spool / "uploads" / f"step-{step:012d}" / "confirmed"
    return path.stat().st_size // 4 if path.exists() else 0


def test_256mib_delta_round_trips_bit_exact(hub, broker: BrokerHandle, tmp_path: Path) -> None:
    env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 256, seed=1)
    penv = participant_env(broker, PARTICIPANTS[0], tmp_path / "spool")

    report = report_of(upload(penv, delta, step=1))

    plan = plan_chunks(delta, CHUNK)
    # 256 MiB of tensor data plus the safetensors header: 65 chunks of 4 MiB.
    assert report["chunks_total"] == len(plan.chunk_digests) == 65
    assert report["chunks_sent"] == 65 and report["hub_duplicates"] == 0
    payload = stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, PARTICIPANTS[0])
    assert digest_of(payload) == plan.payload_digest
    assert payload == delta.read_bytes()
    rebuilt = tmp_path / "rebuilt.safetensors"
    rebuilt.write_bytes(payload)
    original, copy = load_delta(delta), load_delta(rebuilt)
    assert original.keys() == copy.keys()
    assert all(torch.equal(original[k], copy[k]) for k in original)


def test_second_upload_of_same_delta_sends_nothing(
    hub, broker: BrokerHandle, tmp_path: Path
) -> None:
    _env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 8, seed=2)
    penv = participant_env(broker, PARTICIPANTS[1], tmp_path / "spool")
    first = report_of(upload(penv, delta, step=1))
    again = report_of(upload(penv, delta, step=1))
    assert first["chunks_sent"] == 3
    assert again["chunks_sent"] == 0 and again["skipped_held_by_hub"] == 3


def test_uploader_sigkill_at_half_resumes_with_at_most_one_resend(
    hub, broker: BrokerHandle, tmp_path: Path
) -> None:
    env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 256, seed=3)
    spool = tmp_path / "spool"
    # 64 MB/s: the 256 MiB transfer takes ~4 s, so "half way" is easy to catch.
    penv = participant_env(broker, PARTICIPANTS[0], spool, FOLDFED_RATE_LIMIT_BPS=str(64 * MIB))
    first = upload(penv, delta, step=1)
    deadline = time.monotonic() + 120
    total = len(plan_chunks(delta, CHUNK).chunk_digests)
    while confirmed_count(spool, 1) < total // 2:
        assert first.proc.poll() is None, first.log()
        assert time.monotonic() < deadline, "upload made no progress"
        time.sleep(0.02)
    first.kill()
    confirmed_at_kill = confirmed_count(spool, 1)
    assert total // 2 <= confirmed_at_kill < total

    report = report_of(upload(penv, delta, step=1))

    assert report["resumed"] is True
    print(
        f"\nresume after SIGKILL: {confirmed_at_kill}/{total} chunks confirmed before the kill;"
        f" the restart sent {report['chunks_sent']}, skipped {report['skipped_held_by_hub']}"
        f" held by the hub; the hub saw {report['hub_duplicates']} duplicate(s)"
    )
    # Only what never reached the broker is sent again...
    assert report["chunks_sent"] <= total - confirmed_at_kill
    # ...and the hub saw at most one chunk twice (the manifest is re-sent, idempotently).
    assert report["hub_duplicates"] <= 1
    payload = stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, PARTICIPANTS[0])
    assert payload == delta.read_bytes()


def test_ingest_sigkill_mid_transfer_loses_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    import asyncio

    from conftest import hub_env, reset_topology

    asyncio.run(reset_topology(broker.admin_url))
    env = hub_env(broker, tmp_path / "hub")
    ingest = start_ingest(env, tmp_path / "ingest-1.log")
    release(env, 1)
    delta = make_delta(tmp_path / "delta.safetensors", 128, seed=4)
    store = ChunkStore(Path(env["FOLDFED_STATE_DIR"]) / "store")
    penv = participant_env(
        broker, PARTICIPANTS[2], tmp_path / "spool", FOLDFED_RATE_LIMIT_BPS=str(48 * MIB)
    )
    up = upload(penv, delta, step=1)
    deadline = time.monotonic() + 120
    while sum(1 for _ in store.digests()) < 10:
        assert time.monotonic() < deadline, ingest.log()
        time.sleep(0.02)
    ingest.kill()
    stored_at_kill = sum(1 for _ in store.digests())
    assert stored_at_kill < 32
    time.sleep(1.0)  # chunks pile up in the durable queue meanwhile
    ingest = start_ingest(env, tmp_path / "ingest-2.log")
    try:
        report = report_of(up)
    finally:
        ingest.stop()
    assert report["chunks_sent"] == report["chunks_total"] == 33
    payload = stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, PARTICIPANTS[2])
    assert payload == delta.read_bytes()


@pytest.mark.parametrize("point", ["batch-written", "batch-durable"])
def test_ingest_sigkill_mid_batch_loses_nothing(
    broker: BrokerHandle, tmp_path: Path, point: str
) -> None:
    """The group commit's crash windows (a real SIGKILL at the crash point): with the
    batch's bodies written but not yet fsynced, and with the batch durable but not yet
    acked. The restarted ingest gets the batch again and the payload arrives bit-exact."""
    import asyncio

    from conftest import hub_env, reset_topology

    asyncio.run(reset_topology(broker.admin_url))
    env = hub_env(broker, tmp_path / "hub")
    armed = start_ingest({**env, "FOLDFED_CRASH_AT": f"ingest:{point}@1"}, tmp_path / "i1.log")
    release(env, 1)
    delta = make_delta(tmp_path / "delta.safetensors", 32, seed=7)  # 9 chunks
    penv = participant_env(broker, PARTICIPANTS[0], tmp_path / "spool")
    up = upload(penv, delta, step=1)
    assert armed.proc.wait(120) == -9, armed.log()
    assert "crash point reached" in armed.log()
    ingest = start_ingest(env, tmp_path / "ingest-2.log")
    try:
        report = report_of(up)
    finally:
        ingest.stop()
    assert report["chunks_total"] == 9
    payload = stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, PARTICIPANTS[0])
    assert payload == delta.read_bytes()


def test_broker_restart_mid_transfer_completes(hub, broker: BrokerHandle, tmp_path: Path) -> None:
    env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 128, seed=5)
    spool = tmp_path / "spool"
    penv = participant_env(broker, PARTICIPANTS[1], spool, FOLDFED_RATE_LIMIT_BPS=str(32 * MIB))
    up = upload(penv, delta, step=1)
    deadline = time.monotonic() + 120
    while confirmed_count(spool, 1) < 8:
        assert up.proc.poll() is None, up.log()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    broker.broker.stop()
    assert not broker.broker.status().running
    broker.broker.start()

    report = report_of(up)

    assert report["chunks_total"] == 33
    payload = stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, PARTICIPANTS[1])
    assert payload == delta.read_bytes()


def test_release_opens_next_step(hub, broker: BrokerHandle, tmp_path: Path) -> None:
    env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 4, seed=6)
    penv = participant_env(broker, PARTICIPANTS[0], tmp_path / "spool")
    release(env, 2)
    report = report_of(upload(penv, delta, step=2))
    assert report["chunks_sent"] == 2
    assert subprocess.run([*FOLDFED, "--help"], capture_output=True).returncode == 0

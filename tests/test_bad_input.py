"""Every kind of bad message is dead-lettered with its reason, the sender hears about it,
and the step it claims stays intact: a legitimate delivery still completes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aio_pika
import aiormq
import pytest

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.digests import digest_of
from foldfed.format import MAX_CHUNK_SIZE
from foldfed.messages import CODEC_SAFETENSORS, Chunk, Manifest, encode
from foldfed.payloadfile import plan_chunks, read_chunk

from conftest import OUTSIDER, PARTICIPANTS, BrokerHandle, participant_env
from test_transfer import make_delta, report_of, stored_payload, upload

pytestmark = pytest.mark.broker

A, B = PARTICIPANTS[0], PARTICIPANTS[1]


def manifest_for(delta: Path, participant: str, step: int = 1, weight: float = 10.0) -> Manifest:
    plan = plan_chunks(delta, 1 << 20)
    return Manifest(
        step=step,
        participant=participant,
        weight=weight,
        codec=CODEC_SAFETENSORS,
        tensors=plan.tensors,
        chunk_size=plan.chunk_size,
        payload_size=plan.payload_size,
        chunk_digests=plan.chunk_digests,
        payload_digest=plan.payload_digest,
    )


async def send_as(handle: BrokerHandle, user: str, type_name: str, body: bytes) -> None:
    """Publish raw bytes to the hub as `user`, stamped with its real identity."""
    connection = await aio_pika.connect(handle.url_for(user))
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.HUB_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(body, type=type_name, user_id=user),
            topology.INGEST_ROUTING_KEY,
        )
    finally:
        await connection.close()


async def next_dead_letter(handle: BrokerHandle, timeout: float = 30.0) -> dict[str, object]:
    connection = await aio_pika.connect(handle.admin_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.DEAD_QUEUE)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return dict(message.headers)
            await asyncio.sleep(0.05)
        raise AssertionError("no dead letter within timeout")
    finally:
        await connection.close()


def bad_messages(delta: Path) -> list[tuple[str, str, str, bytes]]:
    """(sender, type, expected reason fragment, body) for each kind of bad input."""
    good = manifest_for(delta, A)
    body0 = read_chunk(delta, good.chunk_size, 0)
    chunk0 = Chunk(1, A, 0, good.chunk_digests[0], body0)
    oversized = b"\0" * (MAX_CHUNK_SIZE + 1)
    return [
        (A, "foldfed.v1.Chunk", "malformed", b"\xff\xff\xff garbage"),
        (A, "foldfed.v1.Nonsense", "unknown message type", b""),
        (
            A,
            "foldfed.v1.Chunk",
            "digest mismatch",
            encode(dataclasses.replace(chunk0, body=body0[:-1] + b"\x00"))[1],
        ),
        (
            A,
            "foldfed.v1.Chunk",
            "oversized",
            encode(Chunk(1, A, 0, digest_of(oversized), oversized))[1],
        ),
        (A, "foldfed.v1.Chunk", "unknown step", encode(dataclasses.replace(chunk0, step=7))[1]),
        (A, "foldfed.v1.DeltaManifest", "is closed", encode(dataclasses.replace(good, step=0))[1]),
        (
            OUTSIDER,
            "foldfed.v1.DeltaManifest",
            "unknown participant",
            encode(dataclasses.replace(good, participant=OUTSIDER))[1],
        ),
        (B, "foldfed.v1.DeltaManifest", "forged sender", encode(good)[1]),
        (
            A,
            "foldfed.v1.DeltaManifest",
            "weight",
            encode(dataclasses.replace(good, weight=float("nan")))[1],
        ),
        (
            A,
            "foldfed.v1.DeltaManifest",
            "chunk digests",
            encode(dataclasses.replace(good, chunk_digests=good.chunk_digests[:-1]))[1],
        ),
        (A, "foldfed.v1.StepReleased", "only the hub releases steps", b"\x08\x05"),
    ]


def test_each_bad_input_is_rejected_with_reason_and_step_stays_intact(
    hub, broker: BrokerHandle, tmp_path: Path
) -> None:
    env, ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 3, seed=11)
    for sender, type_name, reason, body in bad_messages(delta):
        asyncio.run(send_as(broker, sender, type_name, body))
        headers = asyncio.run(next_dead_letter(broker))
        assert reason in str(headers[topology.REASON_HEADER]), (reason, headers)
        assert headers[topology.ORIGINAL_SENDER_HEADER] == sender

    # The step is intact: A's real delta still goes through, and B cannot have spoiled it.
    report = report_of(
        upload(participant_env(broker, A, tmp_path / "spool"), delta, step=1, weight=10.0)
    )
    assert report["chunks_sent"] == report["chunks_total"]
    assert stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, A) == delta.read_bytes()
    assert ingest.proc.poll() is None, "ingest must survive bad input"


def test_replayed_conflicting_manifest_is_rejected(
    hub, broker: BrokerHandle, tmp_path: Path
) -> None:
    env, _ingest = hub
    delta = make_delta(tmp_path / "delta.safetensors", 2, seed=12)
    report_of(upload(participant_env(broker, A, tmp_path / "spool"), delta, step=1, weight=10.0))
    other = make_delta(tmp_path / "other.safetensors", 2, seed=13)
    asyncio.run(send_as(broker, A, "foldfed.v1.DeltaManifest", encode(manifest_for(other, A))[1]))
    headers = asyncio.run(next_dead_letter(broker))
    assert "conflicting manifest" in str(headers[topology.REASON_HEADER])
    assert stored_payload(Path(env["FOLDFED_STATE_DIR"]), 1, A) == delta.read_bytes()


def test_participant_cannot_read_another_participants_queue(broker: BrokerHandle) -> None:
    async def attempt() -> None:
        connection = await aio_pika.connect(broker.url_for(B))
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(topology.participant_queue(A), ensure=False)
            await queue.get(fail=False)
        finally:
            await connection.close()

    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        asyncio.run(attempt())


def test_the_broker_refuses_a_participants_forged_hub_event(broker: BrokerHandle) -> None:
    """Topic authorisation: a participant may publish its model reports and uploader
    events, never a delivery receipt or a finalize result (the barrier's inputs)."""

    async def publish(routing_key: str) -> None:
        connection = await aio_pika.connect(broker.url_for(A))
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
            await exchange.publish(
                aio_pika.Message(b"", type="foldfed.v1.DeliveryReceipt", user_id=A),
                routing_key,
                mandatory=False,
            )
        finally:
            await connection.close()

    async def declare() -> None:
        settings = BusSettings(broker.admin_url, publish_timeout_s=10.0, inflight_window=8)
        bus = await Bus.connect(settings, name="topology")
        try:
            await bus.declare_hub_topology(PARTICIPANTS)
        finally:
            await bus.close()

    asyncio.run(declare())
    asyncio.run(publish(topology.MODEL_REPORT_KEY))  # allowed
    for forged in (topology.RECEIPT_KEY, topology.FINALIZED_KEY):
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            asyncio.run(publish(forged))

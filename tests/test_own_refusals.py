"""A refusal names the message it refused (Event.subject = its AMQP message_id), and an
upload ends only on a refusal of its own process's messages: another process under the
same broker identity (a hand-run `foldfed upload`, a hostile holder of the credentials)
cannot end it by getting its own messages refused (found by tests/test_hostile_services.py).
"""

from __future__ import annotations

import asyncio

import aio_pika

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.messages import Event, decode
from foldfed.uploader.upload import own_refusals

from conftest import PARTICIPANTS, BrokerHandle

A = PARTICIPANTS[0]


def _refusal(subject: str) -> Event:
    return Event("rejected", "ingest", A, 0, "malformed Chunk", subject=subject)


def test_only_refusals_of_own_messages_or_unnamed_ones_count() -> None:
    mine, other = _refusal("m-1"), _refusal("m-2")
    unnamed = _refusal("")
    assert own_refusals([other], {"m-1"}.__contains__) == []
    assert own_refusals([other, mine], {"m-1"}.__contains__) == [mine]
    assert own_refusals([unnamed], {"m-1"}.__contains__) == [unnamed]


async def _refusal_on_own_queue(handle: BrokerHandle, timeout: float = 20.0) -> Event:
    connection = await aio_pika.connect(handle.url_for(A))
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.participant_queue(A), ensure=False)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None and message.type == "foldfed.v1.Event":
                event = decode(message.type, message.body)
                assert isinstance(event, Event)
                if event.kind == "rejected":
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError("no refusal on the participant's queue within timeout")
    finally:
        await connection.close()


async def _send_bad_chunk(handle: BrokerHandle) -> tuple[str, Event, bool]:
    """Publish an undecodable chunk as A through a Bus; the refusal A hears, and whether a
    second Bus of the same identity (another process) would call the message its own."""
    settings = BusSettings(handle.url_for(A), 10.0, 8)
    mine = await Bus.connect(settings, name="uploader-a")
    other = await Bus.connect(settings, name="by-hand")
    try:
        sent = await mine.publish_bytes(
            topology.HUB_EXCHANGE,
            topology.INGEST_ROUTING_KEY,
            b"\xff\xff\xff garbage",
            type_name="foldfed.v1.Chunk",
        )
        assert mine.sent(sent)
        event = await _refusal_on_own_queue(handle)
        return sent, event, other.sent(event.subject)
    finally:
        await mine.close()
        await other.close()


def test_the_hubs_refusal_names_the_refused_message(hub, broker: BrokerHandle) -> None:
    sent, event, other_claims_it = asyncio.run(_send_bad_chunk(broker))
    assert "malformed" in event.detail
    assert event.subject == sent
    assert not other_claims_it
    assert own_refusals([event], lambda _: False) == []

"""A RabbitMQ resource alarm blocks publishers without any error: foldfed must say
"broker blocked", and which alarm, within its publish timeout instead of hanging."""

from __future__ import annotations

import asyncio

import pytest

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.domain import Event
from foldfed.errors import BrokerBlocked

from conftest import BrokerHandle

pytestmark = pytest.mark.broker


def test_a_disk_alarm_is_reported_as_broker_blocked(broker: BrokerHandle) -> None:
    async def publish_under_alarm() -> None:
        settings = BusSettings(broker.admin_url, publish_timeout_s=2.0, inflight_window=8)
        bus = await Bus.connect(settings, name="blocked-test")
        await bus.declare_hub_topology(())
        try:
            # A free-disk limit no disk can meet raises the alarm at once.
            broker.broker.rabbitmqctl("set_disk_free_limit", "100000GB")
            await asyncio.sleep(1.0)
            event = Event("rejected", "test", "", 0, "probe", {}, 0)
            with pytest.raises(BrokerBlocked, match="broker blocked") as raised:
                await bus.publish(topology.EVENTS_EXCHANGE, "test.blocked", event, mandatory=False)
            # The cause is named, in RabbitMQ's own words (connection.blocked's reason).
            assert bus.blocked_reason is not None and "disk" in bus.blocked_reason
            assert "disk alarm" in str(raised.value)
        finally:
            broker.broker.rabbitmqctl("set_disk_free_limit", "1GB")  # the local default
            await asyncio.sleep(1.0)
            assert bus.blocked_reason is None, "the alarm cleared: unblocked"
            await bus.close()

    async def publish_after_alarm() -> None:
        settings = BusSettings(broker.admin_url, publish_timeout_s=10.0, inflight_window=8)
        bus = await Bus.connect(settings, name="unblocked-test")
        try:
            event = Event("rejected", "test", "", 0, "probe", {}, 0)
            await bus.publish(topology.EVENTS_EXCHANGE, "test.unblocked", event, mandatory=False)
        finally:
            await bus.close()

    asyncio.run(publish_under_alarm())
    # Once the alarm clears, the same broker confirms publishes again.
    asyncio.run(publish_after_alarm())

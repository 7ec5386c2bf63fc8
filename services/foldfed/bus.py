"""The AMQP layer: one robust connection per process, confirmed publishes bounded by a
timeout, manual acks, and the hub's idempotent topology declaration.

Everything that crosses the broker goes through here; the services above see domain
messages (foldfed.messages), never aio-pika objects except the delivery handle they ack.
One concept, foldfed's AMQP client, in one module of over 400 lines: publishing (with its
window of unconfirmed publishes), consuming and declaring share one connection's life and
one set of reconnect rules. The RabbitMQ behaviour it relies on (confirm window vs
throughput, quorum queues, silent alarms, heartbeats) is in docs/amqp_client.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueueIterator,
    AbstractRobustConnection,
)

from foldfed import topology, tracing
from foldfed.config import BusSettings, amqp_user
from foldfed.errors import BrokerBlocked, BrokerError, DecodeError, Reject
from foldfed.messages import AnyMessage, decode, encode
from foldfed.rejections import RejectionCounts

log = structlog.get_logger(__name__)
# How many of its own message_ids a Bus remembers: more than one upload's chunks, manifest
# and have-requests (1.5 GB in 4 MiB chunks is ~350), at ~100 B each.
SENT_IDS_KEPT = 1 << 16
T = TypeVar("T")

# Errors after which the robust connection reconnects by itself: a publish is retried
# once the channel is back (the receiver deduplicates, so a repeat is harmless).
_RECONNECTING = (
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    RuntimeError,
)

# Chunks are 1-4 MiB: a few in flight per consumer keep the pipe full without the broker
# pushing hundreds of MiB into a slow consumer's socket.
DEFAULT_PREFETCH = 8
# How long a batch consumer waits for one more message before it hands over what it has:
# long enough to catch a window of chunks arriving back to back, short enough that a lone
# message (a have-request, the last chunk) is not noticeably delayed.
BATCH_LINGER_S = 0.005
# A close that the broker does not answer (it is gone, blocked by an alarm, or restarting)
# must not hold a service's stop up: docs/shutdown.md.
CLOSE_S = 1.0
_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
_TRANSIENT = aio_pika.DeliveryMode.NOT_PERSISTENT


@dataclass(frozen=True)
class Incoming:
    """One delivery as a handler sees it."""

    type: str
    body: bytes
    user_id: str | None
    redelivered: bool
    headers: dict[str, Any]
    raw: AbstractIncomingMessage

    def message(self) -> AnyMessage:
        """The domain message it carries; a body that is not one is the sender's fault
        (Reject with the reason, for the dead-letter queue)."""
        try:
            return decode(self.type, self.body)
        except DecodeError as exc:
            raise Reject(str(exc)) from None


class PublishWindow:
    """At most `size` confirmed publishes in flight: awaiting each confirm one by one
    halves small-chunk throughput (docs/amqp_client.md §1), an unbounded number costs memory.

        async with PublishWindow(8) as window:
            for ...:
                await window.submit(bus.publish(...), on_confirm=...)
    """

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: list[BaseException] = []

    async def submit(
        self, publish: Awaitable[None], on_confirm: Callable[[], None] | None = None
    ) -> None:
        """Wait for a free slot, then start `publish`; raises an earlier publish's error."""
        await self._slots.acquire()
        if self._failures:
            self._slots.release()
            _close_awaitable(publish)
            raise self._failures[0]
        task = asyncio.create_task(self._run(publish, on_confirm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, publish: Awaitable[None], on_confirm: Callable[[], None] | None) -> None:
        try:
            await publish
            if on_confirm is not None:
                on_confirm()
        except BaseException as exc:
            self._failures.append(exc)
        finally:
            self._slots.release()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._failures:
            raise self._failures[0]

    async def __aenter__(self) -> PublishWindow:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            await self.drain()
        else:
            for task in self._tasks:
                task.cancel()


def _close_awaitable(aw: Awaitable[None]) -> None:
    close = getattr(aw, "close", None)
    if close is not None:
        close()


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None if `stop` is set first (`work` is then cancelled): for
    waits that may last long when the broker is gone (a connect, an upload's receipt) and
    that a stop abandons rather than drains (docs/shutdown.md)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Its finally-blocks run now, within the caller's stop (each close is bounded).
    await asyncio.wait({task}, timeout=CLOSE_S)
    return None


async def close_connection(connection: AbstractConnection, name: str) -> None:
    """Close `connection`, waiting at most CLOSE_S: aio-pika's close waits for the broker's
    close-ok, which a broker that is gone or blocked never sends. Errors are logged."""
    await _bounded(connection.close(), name)


async def _bounded(closing: Awaitable[object], name: str) -> None:
    try:
        await asyncio.wait_for(closing, CLOSE_S)
    except TimeoutError:
        log.warning("the broker did not answer a close in time", connection=name)
    except Exception as exc:
        log.debug("close failed", connection=name, error=repr(exc))


def alarm_cause(reason: str) -> str:
    """RabbitMQ's connection.blocked reason ("low on disk", "low on memory") in words."""
    lowered = reason.lower()
    if "disk" in lowered:
        return "disk alarm"
    if "memory" in lowered:
        return "memory alarm"
    return "resource alarm"


def watch_blocked(
    connection: object, on_blocked: Callable[[str], None], on_unblocked: Callable[[], None]
) -> bool:
    """Call `on_blocked(reason)` / `on_unblocked()` when the broker sends connection.blocked
    / unblocked. aiormq handles those frames only in private methods (it logs a warning and
    holds its writer), so they are wrapped on this connection object; False, with a
    warning, if this aiormq has no such methods (tests/test_broker_blocked.py notices)."""
    names = ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked")
    blocked, unblocked = (getattr(connection, name, None) for name in names)
    if blocked is None or unblocked is None:
        log.warning("cannot watch for broker alarms: unknown aiormq connection")
        return False

    async def on_blocked_frame(frame: Any) -> None:
        on_blocked(str(getattr(frame, "reason", "") or ""))
        await blocked(frame)

    async def on_unblocked_frame(frame: Any) -> None:
        on_unblocked()
        await unblocked(frame)

    setattr(connection, names[0], on_blocked_frame)
    setattr(connection, names[1], on_unblocked_frame)
    return True


def _incoming(raw: AbstractIncomingMessage) -> Incoming:
    return Incoming(
        type=raw.type or "",
        body=raw.body,
        user_id=raw.user_id,
        redelivered=bool(raw.redelivered),
        headers=dict(raw.headers or {}),
        raw=raw,
    )


class Bus:
    """One process's connection to the broker."""

    def __init__(
        self,
        settings: BusSettings,
        name: str,
        connection: AbstractRobustConnection,
        publish_channel: AbstractChannel,
    ) -> None:
        self.settings = settings
        self.name = name
        self.user = amqp_user(settings.amqp_url)
        self._connection = connection
        self._channel = publish_channel
        self._exchanges: dict[str, AbstractExchange] = {}
        # The broker's own reason while it blocks our publishes ("low on disk"), else None.
        self.blocked_reason: str | None = None
        # Every message this process dead-lettered, per reason class: logged at close.
        self.rejections = RejectionCounts()
        # The message_ids of this process's latest publishes (bounded): a refusal names the
        # message it refused (Event.subject), so a sender can tell its own from another's.
        self._sent: dict[str, None] = {}
        self._watch_alarms()
        connection.reconnect_callbacks.add(lambda *_: self._watch_alarms())

    def _watch_alarms(self) -> None:
        """Say when the broker blocks this connection (connection.blocked: a disk or memory
        alarm), and why, instead of stalling silently (docs/amqp_client.md §3)."""
        transport = self._connection.transport
        if transport is None:
            return
        watch_blocked(transport.connection, self._on_blocked, self._on_unblocked)

    def _on_blocked(self, reason: str) -> None:
        self.blocked_reason = reason or "no reason given"
        log.error(
            "broker blocked: publishes stall until the alarm clears",
            cause=alarm_cause(self.blocked_reason),
            broker_reason=self.blocked_reason,
            connection=self.name,
        )

    def _on_unblocked(self) -> None:
        log.warning("broker unblocked: publishes resume", was=self.blocked_reason)
        self.blocked_reason = None

    @classmethod
    async def connect(cls, settings: BusSettings, name: str, timeout: float = 30.0) -> Bus:
        """Connect (outbound only) and open the publishing channel with confirms on."""
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect_robust(
                    settings.amqp_url,
                    client_properties={"connection_name": name},
                    # Deltas are big: keep the heartbeat generous but present, so a dead
                    # peer is noticed; the loop never blocks long (hashing runs in threads):
                    # a loop blocked for ~2 heartbeats loses the connection (docs/amqp_client.md).
                    heartbeat=30,
                ),
                timeout,
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"cannot connect to the broker: {exc!r}") from exc
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(settings, name, connection, channel)

    async def close(self) -> None:
        """Safe to call twice; returns within CLOSE_S whatever the broker does."""
        if not self._connection.is_closed:
            if self.rejections.total:
                log.info(
                    "rejections",
                    total=self.rejections.total,
                    by_reason=self.rejections.as_dict(),
                    connection=self.name,
                )
            await close_connection(self._connection, self.name)

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            # No passive declare: participants have no configure permission, and the
            # hub declared the exchange at start-up; a missing one surfaces on publish.
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    # ---------------------------------------------------------------- publishing

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        msg: AnyMessage,
        *,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> str:
        """Publish `msg` (see publish_bytes); returns its AMQP message_id."""
        type_name, body = encode(msg)
        return await self.publish_bytes(
            exchange,
            routing_key,
            body,
            type_name=type_name,
            headers=headers,
            persistent=persistent,
            mandatory=mandatory,
        )

    async def publish_bytes(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        type_name: str,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        attempts: int = 5,
    ) -> str:
        """Publish and wait for the broker's confirm; returns the message's AMQP message_id
        (a fresh uuid: a refusal names it, so a sender can tell its own messages' refusals).

        A confirm that does not come within publish_timeout_s raises BrokerBlocked: a
        RabbitMQ memory or disk alarm blocks publishers without any error
        (docs/amqp_client.md §3). A lost connection is retried after the robust connection
        is back. `mandatory=False` is for events, which may have no listener yet;
        everything else must be routable.
        """
        message_id = uuid.uuid4().hex
        self._remember(message_id)
        message = aio_pika.Message(
            body,
            type=type_name,
            # W3C trace context of the current span: the receiver's spans join its trace.
            headers=tracing.inject(dict(headers or {})),
            # RabbitMQ refuses a user_id that is not the connection's user, so the
            # receiver can trust it as the sender's identity.
            user_id=self.user,
            message_id=message_id,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        timeout = self.settings.publish_timeout_s
        for attempt in range(1, attempts + 1):
            try:
                target = await self._exchange(exchange)
                await target.publish(message, routing_key, timeout=timeout, mandatory=mandatory)
                return message_id
            except TimeoutError:
                cause = (
                    "memory or disk alarm? check `rabbitmqctl status`"
                    if self.blocked_reason is None
                    else f"{alarm_cause(self.blocked_reason)}: {self.blocked_reason!r}"
                )
                raise BrokerBlocked(
                    f"broker blocked: no confirm for {type_name} to {exchange!r} within "
                    f"{timeout:g} s ({cause})"
                ) from None
            except aio_pika.exceptions.DeliveryError as exc:
                raise BrokerError(f"broker refused {type_name} to {exchange!r}: {exc}") from exc
            except aio_pika.exceptions.PublishError as exc:
                raise BrokerError(f"{type_name} to {exchange!r} is unroutable: {exc}") from exc
            except _RECONNECTING as exc:
                if attempt == attempts:
                    raise BrokerError(f"publish failed after {attempts} tries: {exc!r}") from exc
                log.warning("publish interrupted, retrying", error=repr(exc), attempt=attempt)
                await self._wait_ready(timeout)
        raise BrokerError(f"publish of {type_name} to {exchange!r}: no attempt left")

    def _remember(self, message_id: str) -> None:
        self._sent[message_id] = None
        if len(self._sent) > SENT_IDS_KEPT:
            del self._sent[next(iter(self._sent))]  # dicts keep insertion order: the oldest

    def sent(self, message_id: str) -> bool:
        """Whether this process published `message_id` (among its last SENT_IDS_KEPT)."""
        return message_id in self._sent

    async def _wait_ready(self, timeout: float) -> None:
        self._exchanges.clear()
        try:
            await asyncio.wait_for(self._channel.ready(), timeout)  # type: ignore[attr-defined]
        except TimeoutError:
            raise BrokerError(f"broker unreachable for {timeout:g} s") from None

    async def dead_letter(self, incoming: Incoming, reason: str) -> None:
        """Park a bad message with its reason in headers, then ack the original.

        Done by hand rather than by basic.reject, because a broker dead-letter cannot
        carry our reason. Counted in `rejections` by the reason's class once parked."""
        headers = {
            topology.REASON_HEADER: reason,
            topology.ORIGINAL_TYPE_HEADER: incoming.type,
            topology.ORIGINAL_SENDER_HEADER: incoming.user_id or "",
        }
        await self.publish_bytes(
            topology.DEAD_EXCHANGE,
            "",
            incoming.body,
            type_name=incoming.type or "unknown",
            headers=headers,
        )
        self.rejections.count(reason)
        await incoming.raw.ack()

    # ---------------------------------------------------------------- consuming

    async def consume(
        self,
        queue: str,
        handler: Callable[[Incoming], Awaitable[None]],
        *,
        stop: asyncio.Event,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        """Deliver messages of `queue` one at a time to `handler` until `stop` is set.

        The handler acks (or dead-letters) each message itself, after its effects are
        durable: a crash before the ack means a redelivery, never a loss. One message at
        a time keeps the hub's order (a have-request is answered after the chunks the
        sender published before it). When the broker goes away (restart, network), the
        consumer waits for the robust connection to come back and resumes on a fresh
        channel; unacked messages are redelivered by the broker meanwhile.
        """

        async def one(batch: list[Incoming]) -> None:
            (incoming,) = batch
            # The handler runs as a child of the sender's span (traceparent).
            with tracing.consuming(incoming.headers):
                await handler(incoming)

        await self.consume_batches(queue, one, stop=stop, prefetch=prefetch, batch=1)

    async def consume_batches(
        self,
        queue: str,
        handler: Callable[[list[Incoming]], Awaitable[None]],
        *,
        stop: asyncio.Event,
        prefetch: int = DEFAULT_PREFETCH,
        batch: int = 1,
        linger_s: float = BATCH_LINGER_S,
    ) -> None:
        """As `consume`, but `handler` gets the messages in delivery order in batches of
        up to `batch`: a batch is handed over when it is full or when no further message
        came within `linger_s` (a lone message is not held back). The handler settles
        every message of a batch before it returns (acks, e.g. one `ack(multiple=True)`,
        rejects, dead-letters); the next batch's messages are gathered only after that.
        A batch gathered when `stop` comes is left unacked: the broker redelivers it.
        """
        while not stop.is_set():
            try:
                await self._consume_until_lost(queue, handler, stop, prefetch, batch, linger_s)
            except (*_RECONNECTING, StopAsyncIteration, aiormq.exceptions.AMQPError) as exc:
                if stop.is_set():
                    break
                log.warning("consumer lost the broker; resuming", queue=queue, error=repr(exc))
                await self._pause(stop, 1.0)

    async def _consume_until_lost(
        self,
        queue: str,
        handler: Callable[[list[Incoming]], Awaitable[None]],
        stop: asyncio.Event,
        prefetch: int,
        batch: int,
        linger_s: float,
    ) -> None:
        # Consumers get a plain connection of their own, renewed by the loop in consume():
        # a robust one would restore the old consumer beside the new one after a
        # reconnect, and messages prefetched by that ghost would wait forever.
        connection = await unless_stopped(
            aio_pika.connect(
                self.settings.amqp_url,
                client_properties={"connection_name": f"{self.name}-consumer"},
                heartbeat=30,
                timeout=30,
            ),
            stop,
        )
        if connection is None:
            return  # stopped while the broker was away: nothing to drain
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            amqp_queue = await channel.get_queue(queue, ensure=False)
            # An idle iterator does not notice a dead connection: watch the connection.
            lost = asyncio.ensure_future(connection.closed())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                it = amqp_queue.iterator()
                try:
                    await it.consume()
                    await self._deliver(it, handler, stopping, lost, batch, linger_s)
                finally:
                    # basic.cancel waits for the broker's cancel-ok, which a blocked broker
                    # never sends; the connection's close cancels the consumer anyway.
                    await _bounded(it.close(), f"{self.name}-consumer iterator")
            finally:
                stopping.cancel()
                lost.cancel()
        finally:
            await close_connection(connection, f"{self.name}-consumer")

    async def _deliver(
        self,
        it: AbstractQueueIterator,
        handler: Callable[[list[Incoming]], Awaitable[None]],
        stopping: asyncio.Future[Any],
        lost: asyncio.Future[Any],
        batch: int,
        linger_s: float,
    ) -> None:
        """Gather batches from the iterator and hand them over until stop or loss."""
        gathered: list[Incoming] = []
        # One pending get, kept across batches: cancelling aio-pika's __anext__ closes the
        # whole iterator, so a linger that runs out leaves the get waiting for the next.
        getting: asyncio.Future[Any] | None = None
        try:
            while not stopping.done():
                if getting is None:
                    getting = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait(
                    {getting, stopping, lost},
                    timeout=linger_s if gathered else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if lost in done:
                    raise ConnectionError("the consuming connection closed")
                if stopping in done:
                    return
                if getting in done:
                    gathered.append(_incoming(getting.result()))
                    getting = None
                    if len(gathered) < batch:
                        continue
                await handler(gathered)
                gathered = []
        finally:
            if getting is not None:
                getting.cancel()

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    # ---------------------------------------------------------------- topology

    async def declare_hub_topology(self, participants: Sequence[str]) -> None:
        """Declare every exchange, queue and binding. Idempotent: run at each hub start.

        Classic durable queues by default; quorum queues (replicated over a cluster) with
        FOLDFED_QUEUE_TYPE=quorum (`topology.queue_arguments`; the traps of quorum queues on
        RabbitMQ 3.10 are in docs/rabbitmq.md, "A local cluster").
        """
        queue_type = self.settings.queue_type
        ch = await self._connection.channel()
        try:
            dead = await ch.declare_exchange(
                topology.DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            dlq = await ch.declare_queue(
                topology.DEAD_QUEUE,
                durable=True,
                arguments=topology.queue_arguments(queue_type, dead_letter=False) or None,
            )
            await dlq.bind(dead)
            dead_letter_args = topology.queue_arguments(queue_type)
            hub = await ch.declare_exchange(
                topology.HUB_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            control = await ch.declare_exchange(
                topology.CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            ingest = await ch.declare_queue(
                topology.INGEST_QUEUE, durable=True, arguments=dead_letter_args
            )
            await ingest.bind(hub, topology.INGEST_ROUTING_KEY)
            await ingest.bind(control)
            direct = await ch.declare_exchange(
                topology.PARTICIPANT_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            broadcast = await ch.declare_exchange(
                topology.BROADCAST_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            events = await ch.declare_exchange(
                topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            barrier = await ch.declare_queue(
                topology.BARRIER_QUEUE, durable=True, arguments=dead_letter_args
            )
            for key in topology.BARRIER_KEYS:
                await barrier.bind(events, key)
            for participant in participants:
                queue = await ch.declare_queue(
                    topology.participant_queue(participant),
                    durable=True,
                    arguments=dead_letter_args,
                )
                await queue.bind(direct, participant)
                await queue.bind(broadcast)
        finally:
            await ch.close()

"""A participant's own queue, turned into awaitable answers.

The participant consumes exactly one queue. Replies, receipts and rejections arrive there
in any order, possibly stale (from before a restart): the inbox matches them to whoever
waits and keeps receipts, which are facts, for later askers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from foldfed import topology
from foldfed.bus import CLOSE_S, Bus, Incoming
from foldfed.errors import DecodeError
from foldfed.messages import AnyMessage, DeliveryReceipt, Event, decode

log = structlog.get_logger(__name__)

Match = Callable[[AnyMessage], bool]
# Called for each message before it is acked: the work it does is durable by then.
Handler = Callable[[AnyMessage], Awaitable[None]]


class Inbox:
    def __init__(self, bus: Bus, participant: str, handler: Handler | None = None) -> None:
        self.bus = bus
        self.participant = participant
        self._handler = handler
        self.receipts: dict[tuple[int, bytes], DeliveryReceipt] = {}
        self.rejections: list[Event] = []
        self._waiters: list[tuple[Match, asyncio.Future[AnyMessage]]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            self.bus.consume(
                topology.participant_queue(self.participant), self._on_message, stop=self._stop
            ),
            name=f"inbox-{self.participant}",
        )

    async def close(self) -> None:
        """Stop consuming: the message at hand is finished (it is acked after its work is
        durable), for at most CLOSE_S; then the consumer is cancelled (the broker redelivers
        what was not acked). Bounded whatever the broker does (docs/shutdown.md)."""
        self._stop.set()
        if self._task is None:
            return
        await asyncio.wait({self._task}, timeout=CLOSE_S)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_S)

    def expect(self, match: Match) -> asyncio.Future[AnyMessage]:
        """A future for the next message that `match` accepts (register before asking)."""
        future: asyncio.Future[AnyMessage] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, future))
        return future

    def forget(self, future: asyncio.Future[AnyMessage]) -> None:
        self._waiters = [(m, f) for (m, f) in self._waiters if f is not future]

    async def _on_message(self, incoming: Incoming) -> None:
        try:
            msg = decode(incoming.type, incoming.body)
        except DecodeError as exc:
            # Only the hub can write to this queue; a bad message here is a hub bug.
            log.error("undecodable message on own queue", error=str(exc), type=incoming.type)
            await incoming.raw.reject(requeue=False)
            return
        if isinstance(msg, DeliveryReceipt):
            self.receipts[(msg.step, msg.manifest_id)] = msg
        if isinstance(msg, Event) and msg.kind == "rejected":
            log.warning("hub rejected a message of ours", reason=msg.detail)
            self.rejections.append(msg)
        if self._handler is not None:
            try:
                await self._handler(msg)
            except Exception as exc:
                # Loud and retried, never silent: the message comes back after a pause.
                log.error("cannot handle message; will retry", type=incoming.type, error=repr(exc))
                await asyncio.sleep(1.0)
                await incoming.raw.reject(requeue=True)
                return
        for match, future in list(self._waiters):
            if not future.done() and match(msg):
                future.set_result(msg)
                self.forget(future)
        await incoming.raw.ack()

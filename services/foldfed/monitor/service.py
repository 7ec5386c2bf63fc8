"""The monitor service: a thin async shell around MonitorModel.

It consumes every message on foldfed.events from its own durable queue
(`foldfed.hub.monitor`, bound with "#"), believes only what the right identity says
(`senders.check_sender`), keeps every believed message in SQLite before acking it, and folds
it into the model. Alerts (STRAGGLER, SILENT) go out as events on foldfed.events
(`monitor.straggler`, `monitor.silent`) and as log lines. HTTP: `/` the dashboard,
`/metrics` for Prometheus, `/api/state` the snapshot as JSON. On start it replays its store,
so a restarted monitor shows the numbers it had, then catches up on what queued meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aio_pika
import structlog
from aiohttp import web

from foldfed import topology
from foldfed.bus import Bus, Incoming
from foldfed.domain import Event, Heartbeat
from foldfed.errors import DecodeError
from foldfed.messages import decode, now_ms
from foldfed.monitor import metrics, render
from foldfed.monitor.model import MonitorModel
from foldfed.monitor.senders import check_sender
from foldfed.monitor.settings import MonitorSettings
from foldfed.monitor.state import Alert
from foldfed.monitor.store import MonitorStore

log = structlog.get_logger(__name__)
SERVICE = "monitor"
# A monitor that is down must not let the broker fill up: past this many waiting messages
# the oldest are dropped (events are small; this is hours of a large federation). The queue
# has no dead-letter exchange on purpose: with one, overflow would move to foldfed.dead-letter,
# which has no limit, and fill the broker all the same. Bad messages are still parked with
# their reason, by Bus.dead_letter, which publishes them explicitly.
QUEUE_MAX_LENGTH = 200_000


async def declare_monitor_queue(amqp_url: str) -> None:
    """The events exchange (as the hub declares it) and the monitor's queue, bound to all."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        events = await channel.declare_exchange(
            topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            topology.MONITOR_QUEUE,
            durable=True,
            arguments={"x-max-length": QUEUE_MAX_LENGTH},
        )
        await queue.bind(events, topology.MONITOR_BINDING)
    finally:
        await connection.close()


class MonitorService:
    def __init__(self, settings: MonitorSettings, bus: Bus, store: MonitorStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.model = MonitorModel(settings.model, started_ms=now_ms())
        self.dropped = 0
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        await declare_monitor_queue(self.settings.bus.amqp_url)
        alerts = await asyncio.to_thread(self._replay)
        await self._publish_alerts(alerts)
        runner = await self._start_http()
        ticker = asyncio.create_task(self._tick(stop))
        log.info("monitor ready", url=self.url, steps=len(self.model.steps))
        try:
            await self.bus.consume(topology.MONITOR_QUEUE, self.handle, stop=stop, prefetch=64)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await runner.cleanup()

    def _replay(self) -> list[Alert]:
        """Fold the stored messages into the model; the alerts that replay raises (the
        service publishes those not published before)."""
        alerts: list[Alert] = []
        count = 0
        for received_ms, type_name, body in self.store.messages():
            alerts += self.model.apply(decode(type_name, body), received_ms)
            count += 1
        for received_ms, body in self.store.heartbeats():
            self.model.apply(decode("foldfed.v1.Heartbeat", body), received_ms)
        if count:
            log.info("state rebuilt from the store", messages=count)
        return alerts

    # ------------------------------------------------------------------ messages

    async def handle(self, incoming: Incoming) -> None:
        try:
            msg = decode(incoming.type, incoming.body)
        except DecodeError as exc:
            await self._drop(incoming, str(exc))
            return
        reason = check_sender(msg, incoming.user_id, self.bus.user)
        if reason is not None:
            await self._drop(incoming, reason)
            return
        received = now_ms()
        if isinstance(msg, Heartbeat):
            await asyncio.to_thread(
                self.store.put_heartbeat, msg.service, msg.participant, received, incoming.body
            )
            self.model.apply(msg, received)
        else:
            message_id = incoming.raw.message_id
            new = await asyncio.to_thread(
                self.store.add_message, message_id, received, incoming.type, incoming.body
            )
            if new:
                await self._publish_alerts(self.model.apply(msg, received))
        await incoming.raw.ack()

    async def _drop(self, incoming: Incoming, reason: str) -> None:
        self.dropped += 1
        log.warning("event not believed", reason=reason, type=incoming.type, user=incoming.user_id)
        await self.bus.dead_letter(incoming, reason)

    async def _publish_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if await asyncio.to_thread(self.store.published, alert.key):
                continue
            if alert.kind == "straggler":
                log.warning("STRAGGLER", participant=alert.participant, detail=alert.detail)
            else:
                log.warning("SILENT", participant=alert.participant, detail=alert.detail)
            event = Event(
                alert.kind,
                SERVICE,
                alert.participant,
                alert.step,
                alert.detail,
                dict(alert.metrics),
                now_ms(),
            )
            await self.bus.publish(
                topology.EVENTS_EXCHANGE, f"{SERVICE}.{alert.kind}", event, mandatory=False
            )
            await asyncio.to_thread(self.store.mark_published, alert.key, now_ms())

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.tick_s)
            try:
                await self._publish_alerts(self.model.check_silence(now_ms()))
            except Exception as exc:  # the next tick tries again; the page stays up
                log.warning("silence check failed", error=repr(exc))

    # ------------------------------------------------------------------ HTTP

    def snapshot(self) -> dict:
        snap = self.model.snapshot(now_ms())
        snap["dropped"] = self.dropped
        # What this monitor refused itself (undecodable, not believed), per reason class.
        snap["dropped_by_reason"] = self.bus.rejections.as_dict()
        return snap

    async def _start_http(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/state", self._state)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.settings.port
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        self.url = f"http://{host}:{port}/"
        return runner

    async def _page(self, _request: web.Request) -> web.Response:
        page = render.html_page(self.snapshot(), self.settings.refresh_s)
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = metrics.exposition(self.snapshot)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _state(self, _request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.snapshot()), content_type="application/json")


async def run_monitor(settings: MonitorSettings, stop: asyncio.Event) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = await asyncio.to_thread(MonitorStore, settings.state_dir / "monitor.sqlite3")
    try:
        bus = await Bus.connect(settings.bus, name=SERVICE)
        try:
            await MonitorService(settings, bus, store).run(stop)
        finally:
            await bus.close()
    finally:
        store.close()

"""Liveness and readiness over HTTP for every service (container and Kubernetes probes).

`FOLDFED_HEALTH_PORT` set: the service also serves (aiohttp, in the service's own event
loop; runtime.py starts it), on `FOLDFED_HEALTH_HOST` (default 0.0.0.0) and that port,

- `GET /healthz`: 200 while the process's event loop runs (an answer at all proves it);
- `GET /readyz`: 200 when every check passes, else 503; both with a JSON body
  `{"status": "ok"|"failing", "checks": {name: {"ok": bool, "detail": str}}}`.

What /readyz checks follows the process's environment (12-factor: what the service was
configured with is what is checked), so one server serves every service:

- `broker`, when `FOLDFED_AMQP_URL` is set: an AMQP connection opens with exactly these
  credentials (and TLS options in the URL); the result is cached `FOLDFED_HEALTH_CACHE_S`
  (default 5 s) so probes do not hammer the broker;
- `store:<variable>`, for each of `FOLDFED_STATE_DIR` and `FOLDFED_SPOOL_DIR` that is set:
  the folder exists, a file can be created and removed in it, and every SQLite database
  directly in it (`*.sqlite3`) opens and reads its schema.

A trainer is given no AMQP URL (it has no network), so only its spool is checked. The
checks run off the event loop (worker threads, bounded by timeouts).

`foldfed health` (see `probe`) asks such a server and exits 0 on 200: an exec probe for
images where an HTTP probe is not wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from foldfed.errors import ConfigError
from foldfed.settings import load, variable, was_given

log = structlog.get_logger(__name__)

PORT_VAR = variable("health_port")
# The store folders a service may be configured with (Settings fields).
STORE_FIELDS = ("state_dir", "spool_dir")
# A probe gets its answer within this; a check that takes longer fails with a timeout.
CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class HealthSettings:
    host: str
    port: int
    cache_s: float
    amqp_url: str | None
    # (variable, folder) for each store folder the environment configures.
    stores: tuple[tuple[str, Path], ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HealthSettings | None:
        """None when `FOLDFED_HEALTH_PORT` is unset or empty (health server off)."""
        s = load(env)
        if s.health_port is None:  # 0 is a port: any free one (tests)
            return None
        # Only the folders the environment names: a default folder the service does not
        # use (the hub's state folder in a trainer) is no part of its readiness.
        stores = tuple((variable(f), getattr(s, f)) for f in STORE_FIELDS if was_given(s, f))
        return cls(
            host=s.health_host,
            port=s.health_port,
            cache_s=s.health_cache_s,
            amqp_url=s.amqp_url,
            stores=stores,
        )


# ---------------------------------------------------------------- checks (blocking)


def check_store(folder: Path) -> CheckResult:
    """The folder exists and is writable; every `*.sqlite3` in it opens and reads."""
    if not folder.is_dir():
        return CheckResult(False, f"{folder} is not a folder (not created yet?)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".healthz-", delete=True) as f:
            f.write(b"ok")
            f.flush()
    except OSError as exc:
        return CheckResult(False, f"{folder} is not writable: {exc.strerror or exc}")
    databases = sorted(folder.glob("*.sqlite3"))
    for path in databases:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
            try:
                db.execute("PRAGMA schema_version").fetchone()
            finally:
                db.close()
        except sqlite3.Error as exc:
            return CheckResult(False, f"SQLite {path.name} does not open: {exc}")
    return CheckResult(True, f"{folder} writable, {len(databases)} SQLite database(s) open")


async def check_broker(url: str, timeout: float = CHECK_TIMEOUT_S) -> CheckResult:
    """Open (and close) an AMQP connection with the service's own URL and credentials."""
    import aio_pika  # here, not at import: `foldfed --help` stays fast

    try:
        connection = await asyncio.wait_for(
            aio_pika.connect(url, client_properties={"connection_name": "healthz"}), timeout
        )
    except TimeoutError:
        return CheckResult(False, f"broker did not answer within {timeout:g} s")
    except Exception as exc:  # any failure to connect is the answer, not a crash
        return CheckResult(False, f"broker unreachable: {_redact(str(exc) or repr(exc), url)}")
    with contextlib.suppress(Exception):
        await connection.close()
    return CheckResult(True, "AMQP connection opened")


def _redact(text: str, url: str) -> str:
    """Never put a password into a probe's answer or a log line."""
    from urllib.parse import urlparse

    password = urlparse(url).password
    return text.replace(password, "***") if password else text


# ---------------------------------------------------------------- the checker


class Health:
    """Runs the readiness checks; the broker check's result is cached `cache_s`."""

    def __init__(
        self,
        settings: HealthSettings,
        broker_check: Callable[[str], Awaitable[CheckResult]] = check_broker,
    ) -> None:
        self.settings = settings
        self._broker_check = broker_check
        self._broker_cached: tuple[float, CheckResult] | None = None
        self._broker_lock = asyncio.Lock()
        self.started = time.monotonic()

    async def _broker(self, url: str) -> CheckResult:
        async with self._broker_lock:  # concurrent probes share one connection attempt
            now = time.monotonic()
            cached = self._broker_cached
            if cached is not None and now - cached[0] < self.settings.cache_s:
                return cached[1]
            result = await self._broker_check(url)
            self._broker_cached = (time.monotonic(), result)
            return result

    async def readiness(self) -> dict[str, CheckResult]:
        checks: dict[str, CheckResult] = {}
        if self.settings.amqp_url:
            checks["broker"] = await self._broker(self.settings.amqp_url)
        for var, folder in self.settings.stores:
            try:
                result = await asyncio.wait_for(
                    asyncio.to_thread(check_store, folder), CHECK_TIMEOUT_S
                )
            except TimeoutError:
                result = CheckResult(False, f"{folder}: no answer within {CHECK_TIMEOUT_S:g} s")
            checks[f"store:{var}"] = result
        return checks

    async def respond(self, path: str) -> tuple[int, dict[str, object]]:
        """(HTTP status, JSON body) for a GET of `path`."""
        if path == "/healthz":
            uptime = round(time.monotonic() - self.started, 3)
            return 200, {"status": "ok", "uptime_s": uptime}
        if path == "/readyz":
            checks = await self.readiness()
            ok = all(c.ok for c in checks.values())
            body: dict[str, object] = {
                "status": "ok" if ok else "failing",
                "checks": {name: c.as_dict() for name, c in checks.items()},
            }
            if not ok:
                body["reasons"] = [f"{n}: {c.detail}" for n, c in checks.items() if not c.ok]
            return (200 if ok else 503), body
        return 404, {"status": "not found", "paths": ["/healthz", "/readyz"]}


# ---------------------------------------------------------------- the HTTP server


class HealthServer:
    """/healthz and /readyz on an aiohttp server; any other path is 404, any method but
    GET and HEAD 405, each with a JSON body. One request per connection (probes do not
    reuse connections, and an idle keep-alive would only hold a socket)."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        return self._port

    async def start(self) -> None:
        settings = self.health.settings
        app = web.Application()
        # One catch-all route: the refusals (404, 405) answer in JSON like the checks do.
        app.router.add_route("*", "/{path:.*}", self._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        self._runner = runner
        self._port = _bound_port(runner, settings.port)
        log.info("health server listening", host=settings.host, port=self._port)

    async def close(self) -> None:
        """Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            status, body = 405, {"status": f"method {request.method} not allowed"}
        else:
            status, body = await self.health.respond(request.path)
        response = web.Response(
            status=status,
            body=json.dumps(body, sort_keys=True).encode() + b"\n",
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
        response.force_close()
        return response


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    """The port actually bound (port 0 asks for any free one)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


async def serve_health(settings: HealthSettings | None) -> HealthServer | None:
    """Start the health server if configured; the caller closes it."""
    if settings is None:
        return None
    server = HealthServer(Health(settings))
    await server.start()
    return server


# ---------------------------------------------------------------- the probe command


def probe(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """GET `url`; (HTTP status, body). Status 0 with the reason when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, json.dumps({"status": "unreachable", "detail": str(reason)})


def probe_url(url: str | None, port: int | None, ready: bool, env: Mapping[str, str]) -> str:
    """The URL `foldfed health` asks: --url, else localhost and --port or the env's port."""
    if url:
        return url
    if port is None:
        port = load(env).health_port
        if port is None:
            raise ConfigError(f"foldfed health needs --url, --port or {PORT_VAR}")
    return f"http://127.0.0.1:{port}/{'readyz' if ready else 'healthz'}"

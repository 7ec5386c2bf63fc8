"""Shared fixtures: one real private RabbitMQ per test session, participant identities,
and helpers that run foldfed services as real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

from foldfed import hubctl
from foldfed.credentials import new_password
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
from foldfed.settings import env_for

PARTICIPANTS = ("org-a", "org-b", "org-c")
# A real broker user that is *not* a participant of the federation.
OUTSIDER = "org-x"
FOLDFED = [sys.executable, "-m", "foldfed.cli"]


@dataclass
class BrokerHandle:
    broker: LocalBroker
    admin_url: str
    passwords: dict[str, str]

    def url_for(self, user: str) -> str:
        parsed = urlparse(self.admin_url)
        return (
            f"amqp://{quote(user)}:{quote(self.passwords[user])}@{parsed.hostname}:{parsed.port}/"
        )


@pytest.fixture(scope="session", autouse=True)
def _trace_files_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Services started by tests inherit this environment: their span files land in the
    # session's temp folder, not the working tree (a test may still set its own).
    os.environ.setdefault("FOLDFED_TRACE_DIR", str(tmp_path_factory.mktemp("traces")))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    ensure_rabbitmq_installed()
    local = LocalBroker(tmp_path_factory.mktemp("broker"))
    admin_url = local.start()
    passwords = {}
    for user in (*PARTICIPANTS, OUTSIDER):
        passwords[user] = new_password()
        local.add_participant(user, passwords[user])
    try:
        yield BrokerHandle(local, admin_url, passwords)
    finally:
        local.stop()


async def reset_topology(admin_url: str) -> None:
    """Delete every foldfed queue so each test starts from an empty broker state."""
    await hubctl.delete_queues(admin_url, (*PARTICIPANTS, OUTSIDER))


def hub_env(handle: BrokerHandle, state_dir: Path, **extra: str) -> dict[str, str]:
    """The process environment of a hub service; `extra`: variables by name, as strings."""
    settings = env_for(
        amqp_url=handle.admin_url,
        participants=PARTICIPANTS,
        state_dir=state_dir,
        first_step=1,
    )
    return {**os.environ, **settings, **extra}


def participant_env(
    handle: BrokerHandle, participant: str, spool: Path, **extra: str
) -> dict[str, str]:
    """The process environment of a participant's service; `extra` as in `hub_env`."""
    settings = env_for(
        amqp_url=handle.url_for(participant), participant=participant, spool_dir=spool
    )
    return {**os.environ, **settings, **extra}


class Service:
    """A foldfed service running as a real child process, its stderr in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [*FOLDFED, *args], env=env, stdout=subprocess.PIPE, stderr=self._log
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL, for real
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start_ingest(env: dict[str, str], log_path: Path) -> Service:
    service = Service(["ingest"], env, log_path)
    service.wait_for_log("ingest ready")
    return service


def release(env: dict[str, str], step: int, model_digest: str = "", participants: str = "") -> None:
    args = [*FOLDFED, "release", str(step)]
    if model_digest:
        args += ["--model-digest", model_digest]
    if participants:
        args += ["--participants", participants]
    subprocess.run(args, env=env, check=True, timeout=60)


@pytest.fixture
def hub(broker: BrokerHandle, tmp_path: Path) -> Iterator[tuple[dict[str, str], Service]]:
    """A fresh topology and a running ingest service with step 1 open (released by hand:
    deltas for it may name any base model)."""
    asyncio.run(reset_topology(broker.admin_url))
    env = hub_env(broker, tmp_path / "hub")
    service = start_ingest(env, tmp_path / "ingest.log")
    release(env, 1)
    try:
        yield env, service
    finally:
        service.stop()


class _DateOnly(BaseHTTPRequestHandler):
    """Stands in for a hub page: the gate's clock reference is the Date header every
    answer has (foldfed gate check --hub-clock)."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_clock() -> Iterator[str]:
    """A local hub page's URL for the gate's clock check (tests of `foldfed gate`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DateOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()

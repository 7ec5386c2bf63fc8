"""Real-broker tests of foldfed.localbroker: a private RabbitMQ in tmp_path.

These start the actual `rabbitmq-server` (about 5-7 s per start), so brokers are shared where
a test does not need its own. The permission tests pin RabbitMQ behaviour that foldfed's
topology relies on: a participant with configure "^$" cannot declare anything, but may
passively declare (check) queues and exchanges, and consume from queues it may read.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from foldfed.errors import BrokerError, ConfigError
from foldfed.localbroker import ADMIN_USER, LocalBroker, ensure_rabbitmq_installed

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _broker_processes(data_dir: Path) -> list[int]:
    """Live processes whose environment names this broker's database: the server, its helpers
    and epmd. Independent of how localbroker tracks its own processes."""
    entry = f"RABBITMQ_MNESIA_BASE={data_dir.resolve() / 'mnesia'}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                found.append(int(name))
        except OSError:
            continue
    return found


def _gone(pid: int) -> bool:
    """Dead or a zombie (some container inits never reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _assert_nothing_running(broker: LocalBroker, pid: int | None) -> None:
    status = broker.status()
    assert not status.running
    assert status.pid is None
    assert status.amqp_url is None
    if pid is not None:
        assert _gone(pid)
    assert _broker_processes(broker.data_dir) == []
    assert status.port is not None and not _listening(status.port)


@pytest.fixture(scope="module")
def rabbitmq_installed() -> None:
    try:
        ensure_rabbitmq_installed()
    except BrokerError as exc:  # not root and not installed: say so rather than fail
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_installed: None
) -> Iterator[LocalBroker]:
    b = LocalBroker(tmp_path_factory.mktemp("shared-broker"))
    b.start()
    yield b
    b.stop()


async def _connect(url: str) -> AbstractConnection:
    return await aio_pika.connect(url, timeout=10)


async def _publish_persistent(url: str, queue: str, body: bytes) -> None:
    conn = await _connect(url)
    async with conn:
        channel = await conn.channel()  # publisher confirms on: publish returns after the ack
        await channel.declare_queue(queue, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), queue
        )


async def _get_one(url: str, queue: str) -> bytes:
    conn = await _connect(url)
    async with conn:
        channel = await conn.channel()
        q = await channel.get_queue(queue, ensure=True)
        message = await q.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        return message.body


def test_status_of_a_broker_never_started(tmp_path: Path) -> None:
    b = LocalBroker(tmp_path / "never")
    status = b.status()
    assert (status.running, status.pid, status.port, status.amqp_url) == (False, None, None, None)
    assert status.data_dir == (tmp_path / "never").resolve()
    with pytest.raises(BrokerError):
        _ = b.amqp_url
    with pytest.raises(BrokerError, match="not running"):
        b.rabbitmqctl("status")
    b.stop()  # idempotent, even when nothing ever ran
    b.kill()


async def test_stop_start_keeps_durable_queue_and_persistent_message(
    tmp_path: Path, rabbitmq_installed: None
) -> None:
    b = LocalBroker(tmp_path)
    t0 = time.monotonic()
    url = await asyncio.to_thread(b.start)
    print(f"broker start took {time.monotonic() - t0:.1f} s")
    status = b.status()
    assert status.running and status.pid is not None and status.port is not None
    assert status.amqp_url == url == b.amqp_url
    assert url.startswith(f"amqp://{ADMIN_USER}:") and url.endswith(f"@127.0.0.1:{status.port}/")
    # Idempotent: a second start finds the running broker.
    assert await asyncio.to_thread(b.start) == url
    assert b.status().pid == status.pid

    await _publish_persistent(url, "restart.q", b"survives a restart")

    t0 = time.monotonic()
    await asyncio.to_thread(b.stop)
    print(f"broker stop took {time.monotonic() - t0:.1f} s")
    _assert_nothing_running(b, status.pid)
    b.stop()  # idempotent

    # A new object on the same directory: everything it needs is in data_dir.
    b2 = LocalBroker(tmp_path)
    url2 = await asyncio.to_thread(b2.start)
    assert url2 == url
    assert b2.status().port == status.port
    assert await _get_one(url2, "restart.q") == b"survives a restart"
    await asyncio.to_thread(b2.stop)
    _assert_nothing_running(b2, None)


async def test_kill_leaves_nothing_and_restart_recovers(
    tmp_path: Path, rabbitmq_installed: None
) -> None:
    b = LocalBroker(tmp_path)
    url = await asyncio.to_thread(b.start)
    await _publish_persistent(url, "crash.q", b"confirmed before the crash")
    pid = b.status().pid
    assert pid is not None

    b.kill()
    _assert_nothing_running(b, pid)
    b.kill()  # idempotent

    assert await asyncio.to_thread(b.start) == url
    assert await _get_one(url, "crash.q") == b"confirmed before the crash"
    await asyncio.to_thread(b.stop)


def test_start_times_out_and_cleans_up(tmp_path: Path, rabbitmq_installed: None) -> None:
    b = LocalBroker(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match="did not start") as info:
        b.start(timeout=1.0)
    assert time.monotonic() - t0 < 15
    assert "server.out" in str(info.value)  # the log tail comes with the error
    assert _broker_processes(tmp_path) == []
    assert not b.status().running


def test_busy_port_is_reported(tmp_path: Path, rabbitmq_installed: None) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match="in use"):
            LocalBroker(tmp_path, port=port).start(timeout=10)
    assert _broker_processes(tmp_path) == []


def test_bad_disk_free_limit_is_refused(
    tmp_path: Path, rabbitmq_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RabbitMQ itself would only log it and fall back to 50MB.
    monkeypatch.setenv("FOLDFED_BROKER_DISK_FREE_LIMIT", "1XB")
    with pytest.raises(ConfigError, match="FOLDFED_BROKER_DISK_FREE_LIMIT='1XB'"):
        LocalBroker(tmp_path).start(timeout=10)
    assert _broker_processes(tmp_path) == []


def test_files_and_users(broker: LocalBroker) -> None:
    d = broker.data_dir
    for secret in ("admin-password", ".erlang.cookie", "rabbitmq.conf"):
        assert (d / secret).stat().st_mode & 0o777 == 0o600, secret
    conf = (d / "rabbitmq.conf").read_text()
    assert "listeners.tcp.default = 127.0.0.1:" in conf
    assert "disk_free_limit.absolute = 1GB" in conf
    users = broker.rabbitmqctl("list_users", "--quiet")
    assert ADMIN_USER in users
    assert "guest" not in users  # default_user replaces guest: it is never created
    assert broker.rabbitmqctl("status").strip()


async def test_restricted_user_permissions(broker: LocalBroker) -> None:
    admin = await _connect(broker.amqp_url)
    port = broker.status().port
    async with admin:
        ch = await admin.channel()
        ex = await ch.declare_exchange("fed.ex", aio_pika.ExchangeType.DIRECT, durable=True)
        q = await ch.declare_queue("fed.q", durable=True)
        await q.bind(ex, "k")
        await ch.declare_queue("other.q", durable=True)

        perms = {"configure": "^$", "write": r"^fed\.ex$", "read": r"^fed\.q$"}
        broker.add_user("limited", "first-pw", **perms)
        broker.add_user("limited", "second-pw", **perms)  # idempotent: updates the password
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await _connect(f"amqp://limited:first-pw@127.0.0.1:{port}/")

        user = await _connect(f"amqp://limited:second-pw@127.0.0.1:{port}/")
        async with user:

            async def refused(action: Callable[[AbstractChannel], Awaitable[object]]) -> str:
                channel = await user.channel()
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as info:
                    await action(channel)
                return str(info.value)

            # Publishing to the exchange it may write to works (confirmed).
            channel = await user.channel()
            allowed = await channel.get_exchange("fed.ex", ensure=False)
            await allowed.publish(aio_pika.Message(b"one"), "k")

            # configure "^$": no declaring, not even a server-named queue, and not even
            # re-declaring an existing queue with identical arguments.
            assert "newq" in await refused(lambda c: c.declare_queue("newq"))
            await refused(lambda c: c.declare_queue(exclusive=True))
            await refused(lambda c: c.declare_queue("fed.q", durable=True))
            # The default exchange is "amq.default" for permissions: not writable here.
            msg = await refused(lambda c: c.default_exchange.publish(aio_pika.Message(b"x"), "q"))
            assert "amq.default" in msg

            # Passive declares need no permission at all: on the readable queue, on a queue
            # it cannot read, and on the exchange.
            channel = await user.channel()
            readable = await channel.get_queue("fed.q", ensure=True)
            await channel.declare_queue("other.q", passive=True)
            await channel.get_exchange("fed.ex", ensure=True)
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue("missing.q", passive=True)

            # Reading works with read permission: basic.get and a consumer.
            channel = await user.channel()
            readable = await channel.get_queue("fed.q", ensure=True)
            message = await readable.get(timeout=5)
            assert message is not None and message.body == b"one"
            await message.ack()
            await allowed.publish(aio_pika.Message(b"two"), "k")
            async with readable.iterator() as it:
                async for message in it:
                    assert message.body == b"two"
                    await message.ack()
                    break
            # ...but not from a queue outside its read regex, and binding needs write on the
            # queue.
            await refused(lambda c: _consume(c, "other.q"))
            await refused(lambda c: _bind(c, "fed.q", "fed.ex"))


async def test_option_like_names_and_passwords_log_in(broker: LocalBroker) -> None:
    """Issue 18: a password (or a name) that begins with '-' is no option to rabbitmqctl.
    Created, changed, and used over AMQP on a real broker."""
    port = broker.status().port
    perms = {"configure": "^$", "write": "^$", "read": "^$"}

    def url(name: str, password: str) -> str:
        return f"amqp://{quote(name, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/"

    broker.add_user("dash-pw", "-first-starts-with-a-dash", **perms)
    broker.add_user("dash-pw", "--help", **perms)  # an existing user: change_password
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await _connect(url("dash-pw", "-first-starts-with-a-dash"))
    async with await _connect(url("dash-pw", "--help")):
        pass

    broker.add_user("-dash-name", "-n", **perms)
    async with await _connect(url("-dash-name", "-n")):
        pass

    # The demo's path: a participant's user with its grants.
    broker.add_participant("org-dash", "-p-a-participant-password")
    async with await _connect(url("org-dash", "-p-a-participant-password")):
        pass

    # What rabbitmqctl cannot read unchanged is refused, naming the reason.
    with pytest.raises(BrokerError, match="whitespace"):
        broker.add_user("spaced", " padded ", **perms)
    assert "spaced" not in broker.rabbitmqctl("list_users", "--quiet")


async def _consume(channel: AbstractChannel, queue: str) -> None:
    q = await channel.get_queue(queue, ensure=False)
    await q.consume(_ignore)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def _bind(channel: AbstractChannel, queue: str, exchange: str) -> None:
    q = await channel.get_queue(queue, ensure=False)
    await q.bind(exchange, "k2")

"""Health endpoints: /healthz and /readyz of a real service process, against a real broker
that is then stopped (its own LocalBroker, not the session's), and `foldfed health`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from foldfed.errors import ConfigError
from foldfed.health import Health, HealthServer, HealthSettings, check_store, probe_url
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed

FOLDFED = [sys.executable, "-m", "foldfed.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---------------------------------------------------------------- unit


def test_settings_off_unless_port_set() -> None:
    assert HealthSettings.from_env({}) is None
    assert HealthSettings.from_env({"FOLDFED_HEALTH_PORT": ""}) is None
    s = HealthSettings.from_env(
        {
            "FOLDFED_HEALTH_PORT": "8081",
            "FOLDFED_AMQP_URL": "amqp://u:p@h:5672/",
            "FOLDFED_SPOOL_DIR": "/spool",
        }
    )
    assert s is not None
    assert (s.port, s.host, s.amqp_url) == (8081, "0.0.0.0", "amqp://u:p@h:5672/")
    assert s.stores == (("FOLDFED_SPOOL_DIR", Path("/spool")),)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FOLDFED_HEALTH_PORT": "http"}, "FOLDFED_HEALTH_PORT='http' is not an integer"),
        ({"FOLDFED_HEALTH_PORT": "70000"}, "FOLDFED_HEALTH_PORT='70000' must be <= 65535"),
        ({"FOLDFED_HEALTH_PORT": "-1"}, "FOLDFED_HEALTH_PORT='-1' must be >= 0"),
        (
            {"FOLDFED_HEALTH_PORT": "1", "FOLDFED_HEALTH_CACHE_S": "-1"},
            "FOLDFED_HEALTH_CACHE_S='-1' must be >= 0",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        HealthSettings.from_env(env)


def test_store_check(tmp_path: Path) -> None:
    missing = check_store(tmp_path / "nope")
    assert not missing.ok and "is not a folder" in missing.detail
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    good = check_store(tmp_path)
    assert good.ok, good.detail
    assert "1 SQLite database(s)" in good.detail
    assert not list(tmp_path.glob(".healthz-*"))  # the probe file is gone
    (tmp_path / "broken.sqlite3").write_bytes(b"this is not a database" * 100)
    bad = check_store(tmp_path)
    assert not bad.ok and "SQLite broken.sqlite3 does not open" in bad.detail


def test_probe_url() -> None:
    assert probe_url(None, 9, True, {}) == "http://127.0.0.1:9/readyz"
    assert probe_url(None, None, False, {"FOLDFED_HEALTH_PORT": "7"}).endswith(":7/healthz")
    assert probe_url("http://x/readyz", None, True, {}) == "http://x/readyz"
    with pytest.raises(ConfigError, match="FOLDFED_HEALTH_PORT"):
        probe_url(None, None, True, {})
    with pytest.raises(ConfigError, match="FOLDFED_HEALTH_PORT='x' is not an integer"):
        probe_url(None, None, True, {"FOLDFED_HEALTH_PORT": "x"})


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_http_server_answers_and_refuses(tmp_path: Path) -> None:
    """The server alone (a store check, no broker configured): answers, HEAD, refusals."""
    state = tmp_path / "state"
    settings = HealthSettings("127.0.0.1", 0, 5.0, None, (("FOLDFED_STATE_DIR", state),))

    async def scenario() -> None:
        server = HealthServer(Health(settings))
        await server.start()
        try:
            status, body = await _raw(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 503
            assert json.loads(body)["reasons"] == [
                f"store:FOLDFED_STATE_DIR: {state} is not a folder (not created yet?)"
            ]
            state.mkdir()
            status, body = await _raw(server.port, b"GET /readyz?x=1 HTTP/1.0\r\n\r\n")
            assert status == 200 and json.loads(body)["status"] == "ok"
            assert "broker" not in json.loads(body)["checks"]  # none configured
            status, body = await _raw(server.port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
            assert (status, body) == (200, b"")
            status, _ = await _raw(server.port, b"POST /readyz HTTP/1.0\r\n\r\n")
            assert status == 405
            status, _ = await _raw(server.port, b"nonsense\r\n\r\n")
            assert status == 400
            status, _ = await _raw(server.port, b"GET /x HTTP/1.0\r\n\r\n")
            assert status == 404
        finally:
            await server.close()
            await server.close()  # safe twice

    asyncio.run(scenario())


# ---------------------------------------------------------------- integration


@pytest.mark.broker
@pytest.mark.slow
def test_readyz_follows_the_broker(tmp_path: Path) -> None:
    """A real barrier process: ready with the broker up; 503 naming the broker once it
    stops, while /healthz still answers; `foldfed health` exits accordingly."""
    ensure_rabbitmq_installed()
    broker = LocalBroker(tmp_path / "broker")
    url = broker.start()
    port = free_port()
    state = tmp_path / "hub"
    model = tmp_path / "initial.safetensors"
    base = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    subprocess.run(
        [*FOLDFED, "initial-model", "--out", str(model), "--seed", "3"],
        env=base,
        check=True,
        timeout=120,
    )
    env = {
        **base,
        "FOLDFED_AMQP_URL": url,
        "FOLDFED_PARTICIPANTS": "org-a",
        "FOLDFED_STATE_DIR": str(state),
        "FOLDFED_INITIAL_MODEL": str(model),
        "FOLDFED_HEALTH_PORT": str(port),
        "FOLDFED_HEALTH_HOST": "127.0.0.1",
        "FOLDFED_HEALTH_CACHE_S": "0",
    }
    log_path = tmp_path / "barrier.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*FOLDFED, "barrier"], env=env, stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "barrier ready" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        status, body = get(f"{base_url}/healthz")
        assert status == 200 and body["status"] == "ok"
        status, body = get(f"{base_url}/readyz")
        assert status == 200, body
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["broker"]["ok"] is True
        assert checks["store:FOLDFED_STATE_DIR"]["ok"] is True
        assert "1 SQLite database(s)" in checks["store:FOLDFED_STATE_DIR"]["detail"]
        ok = subprocess.run(
            [*FOLDFED, "health", "--port", str(port)], env=base, capture_output=True, timeout=60
        )
        assert ok.returncode == 0, ok.stderr

        broker.stop()
        status, body = get(f"{base_url}/readyz")
        assert status == 503, body
        assert body["status"] == "failing"
        assert checks["store:FOLDFED_STATE_DIR"]["ok"] is True
        reasons = body["reasons"]
        assert isinstance(reasons, list) and len(reasons) == 1
        assert reasons[0].startswith("broker: broker unreachable"), reasons
        password = url.split(":")[2].split("@")[0]
        assert password not in json.dumps(body)  # never leaks the credentials
        status, _ = get(f"{base_url}/healthz")
        assert status == 200  # alive, just not ready
        failing = subprocess.run(
            [*FOLDFED, "health", "--port", str(port)], env=base, capture_output=True, timeout=60
        )
        assert failing.returncode == 1
        assert b"broker unreachable" in failing.stdout
        status, body = get(f"{base_url}/nothing")
        assert status == 404
    finally:
        proc.terminate()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        broker.stop()
    assert code == 0, log_path.read_text()[-3000:]

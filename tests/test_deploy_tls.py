"""TLS as the Kubernetes gateway uses it: an amqps:// URL whose `cafile` names the CA from
a mounted Secret. No code beyond the URL: aio-pika/aiormq read cafile, certfile and keyfile
from the URL's query. Checked against a real RabbitMQ with a TLS listener (its own
LocalBroker) and certificates made here with openssl."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.errors import BrokerError
from foldfed.health import check_broker
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt)),
    )
    return key, crt


def make_server_cert(folder: Path, ca_key: Path, ca_crt: Path) -> tuple[Path, Path]:
    key, csr, crt = folder / "tls.key", folder / "tls.csr", folder / "tls.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"),
        *("-keyout", str(key), "-out", str(csr)),
    )
    openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt)),
    )
    return key, crt


def test_amqps_url_with_cafile(tmp_path: Path) -> None:
    ensure_rabbitmq_installed()
    certs = tmp_path / "tls"
    certs.mkdir()
    ca_key, ca_crt = make_ca(certs, "foldfed-test-ca")
    _, other_ca = make_ca(certs, "some-other-ca")
    key, crt = make_server_cert(certs, ca_key, ca_crt)
    tls_port = free_port()
    broker_dir = tmp_path / "broker"
    (broker_dir / "conf.d").mkdir(parents=True)
    # As deploy/k8s/hub/rabbitmq.conf, on a loopback port of ours.
    (broker_dir / "conf.d" / "30-tls.conf").write_text(
        f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca_crt}\n"
        f"ssl_options.certfile = {crt}\n"
        f"ssl_options.keyfile = {key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    broker = LocalBroker(broker_dir)
    admin = urlparse(broker.start())
    try:
        creds = f"{admin.username}:{admin.password}"
        good = f"amqps://{creds}@localhost:{tls_port}/?cafile={ca_crt}"
        wrong_ca = f"amqps://{creds}@localhost:{tls_port}/?cafile={other_ca}"

        async def scenario() -> None:
            bus = await Bus.connect(BusSettings(good, 10.0, 8), name="tls-test", timeout=20)
            await bus.close()
            with pytest.raises(BrokerError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
                await Bus.connect(BusSettings(wrong_ca, 10.0, 8), name="tls-test", timeout=20)
            ok = await check_broker(good)
            assert ok.ok, ok.detail
            refused = await check_broker(wrong_ca)
            assert not refused.ok and "certificate" in refused.detail.lower()

        asyncio.run(scenario())
    finally:
        broker.stop()

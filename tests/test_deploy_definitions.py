"""Broker definitions for compose/Kubernetes: the same least-privilege identities the demo
and the test broker create, as a file RabbitMQ loads; checked by a real broker."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest

from foldfed import topology
from foldfed.deploy.definitions import (
    BrokerUser,
    check_password,
    definitions,
    merge_users,
    parse_env_file,
    password_hash,
    url_of_env,
    user_of_url,
)
from foldfed.errors import ConfigError

from conftest import BrokerHandle

FOLDFED = [sys.executable, "-m", "foldfed.cli"]


def test_password_hash_is_rabbitmq_sha256() -> None:
    encoded = password_hash("secret", b"\x01\x02\x03\x04")
    raw = base64.b64decode(encoded)
    assert len(raw) == 36 and raw[:4] == b"\x01\x02\x03\x04"
    assert check_password("secret", encoded)
    assert not check_password("Secret", encoded)
    assert password_hash("secret", b"\x01\x02\x03\x05") != encoded
    with pytest.raises(ValueError):
        password_hash("secret", b"\x00")


def test_roles_follow_the_user_name() -> None:
    hub = user_of_url("amqps://foldfed-hub:p%40ss@broker:5671/?cafile=/ca.crt")
    assert hub == BrokerUser("foldfed-hub", "p@ss", hub=True)
    org = user_of_url("amqp://org-a:pw@broker:5672/")
    assert not org.hub and org.permissions == topology.participant_permissions("org-a")
    assert user_of_url("amqp://ops:pw@h/", hub_user="ops").hub


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://org-a:pw@h/", "not an AMQP URL"),
        ("amqp://h:5672/", "carries no user and password"),
        ("amqp://org-a:@h/", "empty password"),
        ("amqp://Org_A!:pw@h/", "neither the hub user"),
        ("amqp://hub:pw@h/", "neither the hub user"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        user_of_url(url)


def test_document_shape() -> None:
    users = [
        user_of_url("amqp://org-b:pw-b@h/"),
        user_of_url("amqp://foldfed-hub:pw-h@h/"),
        user_of_url("amqp://org-b:pw-b@other/"),  # the same identity twice is fine
    ]
    doc = definitions(users, salt=lambda n: b"\x00" * n)
    assert [u["name"] for u in doc["users"]] == ["foldfed-hub", "org-b"]  # type: ignore[index]
    hashes = [u["password_hash"] for u in doc["users"]]  # type: ignore[union-attr]
    assert check_password("pw-h", hashes[0]) and check_password("pw-b", hashes[1])
    assert "pw-b" not in json.dumps(doc)
    perms = {p["user"]: p for p in doc["permissions"]}  # type: ignore[union-attr]
    org = topology.participant_permissions("org-b")
    assert (perms["org-b"]["configure"], perms["org-b"]["write"], perms["org-b"]["read"]) == (
        org.configure,
        org.write,
        org.read,
    )
    assert perms["foldfed-hub"]["read"] == r"^foldfed\."
    (topic,) = doc["topic_permissions"]  # type: ignore[misc]
    assert topic["user"] == "org-b" and topic["exchange"] == topology.EVENTS_EXCHANGE
    assert topic["write"] == org.events_write_keys
    with pytest.raises(ConfigError, match="two different passwords"):
        merge_users([user_of_url("amqp://org-b:x@h/"), user_of_url("amqp://org-b:y@h/")])


def test_env_file_parsing() -> None:
    env = parse_env_file("# c\n\nA=1\nexport B = 'two words'\nC=\"x=y\"\nD=\n")
    assert env == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    with pytest.raises(ConfigError, match=r"f\.env:2: expected KEY=VALUE"):
        parse_env_file("A=1\nnot a pair\n", "f.env")


def test_an_env_files_url_is_read_and_checked_through_the_settings_registry() -> None:
    url = "amqp://org-a:pw@hub:5672/"
    assert url_of_env({"FOLDFED_AMQP_URL": url, "OTHER": "x"}, "a.env") == url
    with pytest.raises(ConfigError, match=r"^a\.env: FOLDFED_AMQP_URL is not set$"):
        url_of_env({"FOLDFED_AMQP_URL": ""}, "a.env")
    # The file configures a service: a bad value elsewhere in it is named, not passed on.
    with pytest.raises(ConfigError, match=r"a\.env: FOLDFED_STEPS='two' is not an integer"):
        url_of_env({"FOLDFED_AMQP_URL": url, "FOLDFED_STEPS": "two"}, "a.env")


@pytest.mark.broker
def test_a_real_broker_loads_them(broker: BrokerHandle, tmp_path: Path) -> None:
    """Written by the command, imported by RabbitMQ: the users log in with their passwords
    and hold exactly the permissions the demo's users hold."""
    admin = broker.admin_url
    host = admin.split("@", 1)[1]
    env_file = tmp_path / "deftest-a.env"
    env_file.write_text(f"# placeholder\nFOLDFED_AMQP_URL=amqp://deftest-a:pw-a@{host}\n")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "deftest-b").write_text(f"amqp://deftest-b:pw-b@{host}\n")
    (secret_dir / "..data").mkdir()  # as in a mounted Kubernetes Secret
    out = tmp_path / "defs" / "definitions.json"
    done = subprocess.run(
        [
            *FOLDFED,
            "broker-definitions",
            "--out",
            str(out),
            "--env-file",
            str(env_file),
            "--url-dir",
            str(secret_dir),
            "--url",
            f"amqp://deftest-hub:pw-h@{host}",
            "--hub-user",
            "deftest-hub",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "users deftest-a, deftest-b, deftest-hub" in done.stdout
    broker.broker.rabbitmqctl("import_definitions", str(out))

    for user, password in (("deftest-a", "pw-a"), ("deftest-b", "pw-b"), ("deftest-hub", "pw-h")):
        asyncio_login(f"amqp://{user}:{password}@{host}")
    with pytest.raises(Exception, match=r"ACCESS_REFUSED|auth"):
        asyncio_login(f"amqp://deftest-a:wrong@{host}")
    listed = broker.broker.rabbitmqctl("list_user_permissions", "deftest-a")
    perms = topology.participant_permissions("deftest-a")
    assert f"/\t{perms.configure}\t{perms.write}\t{perms.read}" in listed
    topics = broker.broker.rabbitmqctl("list_user_topic_permissions", "deftest-b")
    assert topology.participant_permissions("deftest-b").events_write_keys in topics


def asyncio_login(url: str) -> None:
    import asyncio

    async def login() -> None:
        connection = await aio_pika.connect(url, timeout=15)
        await connection.close()

    asyncio.run(login())

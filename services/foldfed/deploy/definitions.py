"""RabbitMQ definitions (users, vhost, permissions, topic permissions) for a deployment.

The broker of compose and of the Kubernetes hub loads this file at boot
(`load_definitions`), so every identity exists before any service connects. Input: the
AMQP URLs the services themselves are given (env files or Secret files), so a password is
written down once, where the service reads it. Output: RabbitMQ's definitions JSON with
salted SHA-256 password hashes (`rabbit_password_hashing_sha256`: base64(salt ‖
sha256(salt ‖ password)), 4-byte salt), never the passwords.

Roles are fixed by user name: the hub user (default `foldfed-hub`; aggregator, barrier,
monitor and `foldfed release` connect as it, docs/format.md section 7) gets `^foldfed\\.`
for configure, write and read; every other user must be a valid participant id and gets
`topology.participant_permissions` plus its topic permissions on `foldfed.events`, exactly
as the local test broker and `foldfed demo` grant them.

Pure functions; the command in deploy/commands.py does the file I/O.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from foldfed import topology
from foldfed.errors import ConfigError
from foldfed.settings import load, required

DEFAULT_HUB_USER = "foldfed-hub"
# The hub is confined to foldfed's own names (docs/format.md section 7, "SHOULD").
HUB_PERMISSIONS = topology.Permissions(
    configure=r"^foldfed\.", write=r"^foldfed\.", read=r"^foldfed\."
)
HASHING = "rabbit_password_hashing_sha256"
VHOST = "/"


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str
    hub: bool

    @property
    def permissions(self) -> topology.Permissions:
        if self.hub:
            return HUB_PERMISSIONS
        return topology.participant_permissions(self.name)


def user_of_url(url: str, hub_user: str = DEFAULT_HUB_USER) -> BrokerUser:
    """The broker identity an AMQP URL authenticates as (its role from the name)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"not an AMQP URL (scheme {parsed.scheme!r}): expected amqp or amqps")
    if not parsed.username or parsed.password is None:
        raise ConfigError(f"AMQP URL for host {parsed.hostname!r} carries no user and password")
    name, password = unquote(parsed.username), unquote(parsed.password)
    if not password:
        raise ConfigError(f"user {name!r}: empty password")
    if name == hub_user:
        return BrokerUser(name, password, hub=True)
    if not topology.is_valid_participant_id(name):
        raise ConfigError(
            f"user {name!r} is neither the hub user {hub_user!r} nor a valid participant id"
        )
    return BrokerUser(name, password, hub=False)


def merge_users(users: Iterable[BrokerUser]) -> tuple[BrokerUser, ...]:
    """One entry per name, sorted; the same name with two passwords is an error."""
    by_name: dict[str, BrokerUser] = {}
    for user in users:
        known = by_name.setdefault(user.name, user)
        if known != user:
            raise ConfigError(f"user {user.name!r} is given two different passwords")
    if not by_name:
        raise ConfigError("no broker user given")
    return tuple(by_name[name] for name in sorted(by_name))


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256 hash of `password` with a 4-byte salt."""
    if len(salt) != 4:
        raise ValueError("RabbitMQ salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(password: str, encoded: str) -> bool:
    raw = base64.b64decode(encoded)
    return len(raw) == 36 and password_hash(password, raw[:4]) == encoded


def definitions(
    users: Iterable[BrokerUser], salt: Callable[[int], bytes] = os.urandom
) -> dict[str, object]:
    """RabbitMQ's definitions document for `users` on vhost "/"."""
    merged = merge_users(users)
    return {
        "users": [
            {
                "name": u.name,
                "password_hash": password_hash(u.password, salt(4)),
                "hashing_algorithm": HASHING,
                "tags": [],
            }
            for u in merged
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {
                "user": u.name,
                "vhost": VHOST,
                "configure": u.permissions.configure,
                "write": u.permissions.write,
                "read": u.permissions.read,
            }
            for u in merged
        ],
        "topic_permissions": [
            {
                "user": u.name,
                "vhost": VHOST,
                "exchange": topology.EVENTS_EXCHANGE,
                "write": u.permissions.events_write_keys,
                "read": "^$",
            }
            for u in merged
            if not u.hub
        ],
    }


def parse_env_file(text: str, source: str = "env file") -> dict[str, str]:
    """A compose-style env file: `KEY=VALUE` lines, `#` comments and blank lines ignored,
    one pair of matching surrounding quotes removed from a value. No interpolation."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"{source}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def url_of_env(env: Mapping[str, str], source: str) -> str:
    """FOLDFED_AMQP_URL of an env file's variables, read through the settings registry: the
    file's other variables are checked too, as the service it configures would check them.
    (The file is parsed by `parse_env_file`, not by pydantic-settings' dotenv source, which
    skips a malformed line with a warning where compose would refuse the file.)"""
    try:
        return required(load(env).amqp_url, "amqp_url")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None

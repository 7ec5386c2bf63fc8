"""Broker passwords that foldfed makes up, and the check that a secret can travel anywhere.

A generated password goes through more hands than the broker: `rabbitmqctl`'s command line,
the AMQP URL each service is given (`amqp://user:password@host/`), `rabbitmq.conf`
(`default_pass = ...`), env files and shells. Each of them misreads some characters:

- a leading '-' makes a command-line tool read the value as an option. Issue 18:
  `secrets.token_urlsafe` draws from [A-Za-z0-9_-], so one token in 64 starts with '-',
  and `foldfed demo` with 3 participants failed about one run in twenty;
- '@', ':', '/', '%', '#', '?' and friends must be percent-escaped in a URL's user info,
  and whoever forgets it gets a wrong host or a wrong password, not an error;
- whitespace is trimmed by config readers and by `rabbitmqctl`'s password prompt.

So generated passwords are lower-case hex: never option-like (a hex digit is never '-'),
never in need of escaping in a URL, a config line or a shell word, and no less random per
byte drawn (24 bytes: 192 bits, 48 characters). Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from urllib.parse import quote

__all__ = [
    "PASSWORD_BYTES",
    "is_option_like",
    "is_portable_secret",
    "needs_url_escaping",
    "new_password",
]

# 192 bits: far beyond guessing over AMQP, and the size the local broker's admin always had.
PASSWORD_BYTES = 24


def new_password(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh broker password: `PASSWORD_BYTES` random bytes as lower-case hex.

    `random_bytes` is there for tests (a seeded `random.Random(seed).randbytes`); real
    callers keep the default, the operating system's CSPRNG.
    """
    return random_bytes(PASSWORD_BYTES).hex()


def is_option_like(value: str) -> bool:
    """Whether a command-line tool would read `value`, as a positional argument, as an
    option (`-x`, `--x`, and a lone `-` that many tools take for stdin)."""
    return value.startswith("-")


def needs_url_escaping(value: str) -> bool:
    """Whether `value` changes when percent-escaped as one URL component (RFC 3986
    unreserved characters, A-Z a-z 0-9 - . _ ~, are the only ones that pass unchanged)."""
    return quote(value, safe="") != value


def is_portable_secret(value: str) -> bool:
    """Non-empty, not option-like and in no need of URL escaping: safe unquoted on a
    command line, in an AMQP URL and in rabbitmq.conf."""
    return bool(value) and not is_option_like(value) and not needs_url_escaping(value)

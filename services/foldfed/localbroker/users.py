"""Broker users through `rabbitmqctl`, passed so that no name, password or regex can be read
as an option.

Issue 18: with the password as a positional argument, one that begins with '-' is parsed by
rabbitmqctl as options and the call fails. RabbitMQ 3.10.8, checked against the real binary:

- `rabbitmqctl add_user NAME` and `change_password NAME` without a password read it from
  stdin, as one line with surrounding whitespace trimmed. So passwords go there: they can
  start with '-', and they no longer show in `ps` while rabbitmqctl runs. What that line
  cannot carry is refused before anything runs (`stdin_password_problem`): an empty password
  (RabbitMQ would disable password login), line breaks, NUL, surrounding whitespace.
- `--` ends rabbitmqctl's options, so every positional argument (names, tags, permission
  regexes) follows one.
"""

from __future__ import annotations

from typing import Protocol

from foldfed import topology
from foldfed.credentials import is_option_like
from foldfed.errors import BrokerError

__all__ = ["Rabbitmqctl", "add_participant", "add_user", "stdin_password_problem"]

VHOST = "/"


class Rabbitmqctl(Protocol):
    """`LocalBroker.rabbitmqctl`: run one rabbitmqctl command on our node, return stdout,
    raise BrokerError on failure; `stdin` is written to its standard input."""

    def __call__(self, *args: str, stdin: str | None = None) -> str: ...


def stdin_password_problem(password: str) -> str | None:
    """Why rabbitmqctl could not read `password` from stdin unchanged, or None if it can."""
    if not password:
        return "a password must not be empty (RabbitMQ disables password login for it)"
    if any(c in password for c in "\r\n\0"):
        return "a password must not contain line breaks or NUL (rabbitmqctl reads one line)"
    if password != password.strip():
        return "a password must not begin or end with whitespace (rabbitmqctl trims it)"
    return None


def add_user(
    ctl: Rabbitmqctl,
    name: str,
    password: str,
    *,
    configure: str,
    write: str,
    read: str,
    tags: str = "",
) -> None:
    """Create or update a user on vhost "/" with the given permission regexes (idempotent:
    an existing user gets the new password, tags and permissions)."""
    problem = stdin_password_problem(password)
    if problem is not None:
        raise BrokerError(f"user {name!r}: {problem}")
    if not name:
        raise BrokerError("a broker user needs a name")
    line = password + "\n"
    try:
        ctl("add_user", "--", name, stdin=line)
    except BrokerError as exc:
        if "already exists" not in str(exc):
            raise
        ctl("change_password", "--", name, stdin=line)
    ctl("set_user_tags", "--", name, *tags.split())
    ctl("set_permissions", "-p", VHOST, "--", name, configure, write, read)


def add_participant(ctl: Rabbitmqctl, name: str, password: str) -> None:
    """A participant's broker user with exactly its least-privilege permissions and
    event-topic grants (`topology`), as every deployment must give it."""
    if is_option_like(name):
        # topology.grant_event_topics passes the name as a plain positional argument. Valid
        # participant ids never start with '-' (topology.is_valid_participant_id).
        raise BrokerError(f"participant {name!r}: a participant id must not start with '-'")
    perms = topology.participant_permissions(name)
    add_user(ctl, name, password, configure=perms.configure, write=perms.write, read=perms.read)
    topology.grant_event_topics(ctl, name, perms)

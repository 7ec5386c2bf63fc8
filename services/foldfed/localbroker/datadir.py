"""The files of a private broker's `data_dir` (layout in the package docstring): what
persists between starts (ports and node name, the admin password, the Erlang cookie), how any
file there is written (a crash never leaves half a secret, no secret is ever readable by
others), and the lock that serializes start, stop and kill on one data_dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from foldfed.credentials import new_password
from foldfed.errors import BrokerError
from foldfed.localbroker.netprobe import free_ports

__all__ = [
    "Ports",
    "admin_password",
    "ensure_cookie",
    "load_ports",
    "locked",
    "prepare_ports",
    "tail",
    "write_private",
    "write_text",
]


@dataclass(frozen=True)
class Ports:
    """What a restart must reuse, persisted in data_dir/ports.json. The node name is also the
    name of the mnesia directory, so it never changes for a data_dir (a new name would mean an
    empty database), even when the AMQP port is changed by the caller."""

    port: int
    dist_port: int
    epmd_port: int
    nodename: str


def load_ports(data_dir: Path) -> Ports | None:
    try:
        raw = json.loads((data_dir / "ports.json").read_text())
        return Ports(
            port=int(raw["port"]),
            dist_port=int(raw["dist_port"]),
            epmd_port=int(raw["epmd_port"]),
            nodename=str(raw["nodename"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_ports(
    data_dir: Path, requested_port: int | None, shared_epmd_port: int | None = None
) -> Ports:
    """Ports and node name for this start: the stored ones, or fresh free ones; written back.
    `shared_epmd_port`: the epmd of the cluster this node belongs to, used instead of ours."""
    state = load_ports(data_dir)
    if state is None:
        port, dist_port, epmd_port = free_ports(3)
        if requested_port is not None:
            port = requested_port
        # With a private epmd the name need only be unique per broker; the port makes it
        # recognisable in `ps` and logs.
        state = Ports(port, dist_port, epmd_port, f"foldfed-{port}@localhost")
    elif requested_port is not None:
        state = replace(state, port=requested_port)
    if shared_epmd_port is not None:
        state = replace(state, epmd_port=shared_epmd_port)
    if len({state.port, state.dist_port, state.epmd_port}) != 3:
        # An explicit port that clashes with our stored helper ports: move the helpers.
        dist_port, epmd_port = [p for p in free_ports(3) if p != state.port][:2]
        state = replace(state, dist_port=dist_port, epmd_port=epmd_port)
    write_text(data_dir / "ports.json", json.dumps(asdict(state), indent=2) + "\n")
    return state


def admin_password(data_dir: Path, *, create: bool) -> tuple[str | None, bool]:
    """(password, created_now). A created one is hex (`credentials.new_password`): it goes
    unescaped into rabbitmq.conf and the admin's AMQP URL."""
    path = data_dir / "admin-password"
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if password:
        return password, False
    if not create:
        return None, False
    password = new_password()
    write_private(path, password)
    return password, True


def ensure_cookie(data_dir: Path) -> None:
    """Erlang refuses a cookie file readable by others, and creates one itself if missing;
    we write it first so that server and rabbitmqctl (both HOME=data_dir) agree."""
    path = data_dir / ".erlang.cookie"
    if not path.is_file():
        # Hex, upper case: a cookie is an Erlang atom, and this needs no quoting anywhere.
        write_private(path, secrets.token_hex(20).upper())
    os.chmod(path, 0o600)


@contextlib.contextmanager
def locked(data_dir: Path, timeout: float) -> Iterator[None]:
    """Serialize start/stop/kill on one data_dir across threads and processes (flock is
    released by the kernel if the holder dies). Bounded: never wait forever."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"{data_dir} is locked by another start/stop") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # also releases the lock


def write_private(path: Path, text: str) -> None:
    """Write a secret with mode 0600 from the first byte (no window where it is readable), and
    atomically so a crash never leaves half a password or cookie."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o600)  # in case tmp pre-existed with other bits
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log (read from its last 64 KiB), or why it is unreadable."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(data.splitlines()[-lines:])

"""A private, real RabbitMQ for tests and the demo, with no root-owned state.

Why a real broker: no usable embedded AMQP 0-9-1 broker exists on PyPI (see FIELD_NOTES), and
the behaviours foldfed depends on (durability across restarts, permissions, alarms, frame
limits) are exactly what fakes get wrong. So we run the distribution's `rabbitmq-server`, but
point every path it would otherwise take from /etc or /var/lib at one `data_dir` of ours:

    data_dir/
      ports.json          AMQP port, Erlang distribution port, epmd port, node name: a restart
                          reuses them, so durable queues (stored per node name) come back.
      rabbitmq.conf       rewritten on every start (see `_render_config`).
      rabbitmq-env.conf   empty: shadows /etc/rabbitmq/rabbitmq-env.conf, which would otherwise
                          be sourced by the start script and could rename the node.
      conf.d/             empty: shadows /etc/rabbitmq/conf.d.
      enabled_plugins     `[].`: no management plugin, faster start, fewer ports.
      admin-password      0600; the password of `foldfed-admin`.
      .erlang.cookie      0600; HOME=data_dir so the server and our rabbitmqctl share it.
      mnesia/  log/       the node's database and logs.
      broker.pid          written by RabbitMQ itself: the beam.smp PID (removed on clean exit).
      launcher.pid        the `rabbitmq-server` shell script that parents beam.smp.
      epmd.pid            our private epmd.
      server.out          stdout/stderr of the launcher (config errors show up only here).

epmd: every Erlang node registers with an epmd. The shared one on port 4369 would outlive us
(nobody stops it) and would mix our nodes with any other project's. So each LocalBroker starts
its own epmd on a free port (ERL_EPMD_PORT, bound to 127.0.0.1), and stop()/kill() end it.
rabbitmqctl gets the same ERL_EPMD_PORT. Beware: rabbitmqctl, when it finds no epmd on that
port, starts a *daemonised* one that would leak; that is why `rabbitmqctl()` refuses to run
when our broker is down.

Knowing what is ours: every process we start carries FOLDFED_LOCALBROKER_DIR=<data_dir> in its
environment, and their children (beam.smp, erl_child_setup, inet_gethost, the disk monitor,
epmd) inherit it. stop() and kill() find leftovers by that mark in /proc, which survives the
death of the Python process that started the broker and guards against PID reuse.

Zombies: in some containers PID 1 never reaps orphans, so a dead process can linger as a
zombie and `os.kill(pid, 0)` still succeeds. Liveness checks here treat zombies as dead, and
we reap the processes we spawned ourselves.

Linux only (reads /proc). Works as root: the Debian wrappers in /usr/sbin would `su rabbitmq`,
so we run the real scripts under /usr/lib/rabbitmq/bin, which do not care who runs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from foldfed import topology
from foldfed.errors import BrokerError

__all__ = [
    "ADMIN_USER",
    "DISK_FREE_LIMIT_ENV",
    "BrokerStatus",
    "LocalBroker",
    "ensure_rabbitmq_installed",
]

ADMIN_USER = "foldfed-admin"
# Free disk below which RabbitMQ blocks all publishers. RabbitMQ's own default (50 MB) is far
# too low when single payloads are GBs: the disk would fill before the alarm fires. 1GB is
# enough headroom for our transfers yet does not alarm on a small dev disk; raise it for big
# runs (e.g. "5GB"). Units as RabbitMQ accepts them: 1GB, 500MB, 2GiB, 1G, or plain bytes.
DISK_FREE_LIMIT_ENV = "FOLDFED_BROKER_DISK_FREE_LIMIT"
DEFAULT_DISK_FREE_LIMIT = "1GB"
# RabbitMQ's default, written out so the limit the code relies on is visible: a larger message
# is refused with PRECONDITION_FAILED and the channel is closed (see FIELD_NOTES). Chunking
# keeps every message far below it.
MAX_MESSAGE_SIZE = 134_217_728

_MARK_ENV = "FOLDFED_LOCALBROKER_DIR"
_HOST = "127.0.0.1"
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
# RabbitMQ 3.10's own parser (rabbit_resource_monitor_misc). A value it cannot parse is only
# logged, and the limit silently falls back to 50MB, so we refuse it before starting.
_DISK_LIMIT_RE = re.compile(
    r"^[0-9]+(kB|KB|MB|GB|kb|mb|gb|Kb|Mb|Gb|kiB|KiB|MiB|GiB|kib|mib|gib|KIB|MIB|GIB|k|K|m|M|g|G)?$"
)

# Where distributions put the *real* scripts (the ones next to `rabbitmq-env`).
_RABBITMQ_BIN_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/lib/rabbitmq/sbin"))
_RABBITMQ_SEARCH = (Path("/usr/sbin"), Path("/usr/lib/rabbitmq/bin"))

_KILL_WAIT = 10.0  # after SIGKILL a process is gone in milliseconds; this only bounds the wait
_CTL_TIMEOUT = 60.0
_APT_TIMEOUT = 900.0


@dataclass(frozen=True)
class BrokerStatus:
    """A snapshot. `port` is the configured AMQP port (known once started, even when stopped);
    `pid` and `amqp_url` are set only while the broker runs."""

    running: bool
    pid: int | None
    port: int | None
    amqp_url: str | None
    data_dir: Path


@dataclass(frozen=True)
class _Ports:
    """What a restart must reuse, persisted in data_dir/ports.json. The node name is also the
    name of the mnesia directory, so it never changes for a data_dir (a new name would mean an
    empty database), even when the AMQP port is changed by the caller."""

    port: int
    dist_port: int
    epmd_port: int
    nodename: str


# --------------------------------------------------------------------------- installation


def _find_rabbitmq_bin_dir() -> Path | None:
    """The directory of the real `rabbitmq-server` script, or None if not installed.

    The real script sits next to `rabbitmq-env` (after resolving symlinks), which is how we tell
    it from Debian's /usr/sbin wrapper that would `su rabbitmq` and write to /var/lib.
    """
    candidates: list[Path] = [d / "rabbitmq-server" for d in _RABBITMQ_BIN_DIRS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found))
    candidates += [d / "rabbitmq-server" for d in _RABBITMQ_SEARCH]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        # Keep the unresolved directory when it has the tools (the scripts resolve their own
        # symlinks to find rabbitmq-env); otherwise try the resolved one.
        for directory in (candidate.parent, candidate.resolve().parent):
            if (directory / "rabbitmq-env").is_file() and (directory / "rabbitmqctl").is_file():
                return directory
    return None


def _rabbitmq_present() -> bool:
    """True if a `rabbitmq-server` exists where the brief says to look (PATH, /usr/sbin,
    /usr/lib/rabbitmq/bin) *and* we can find the real scripts behind it."""
    return _find_rabbitmq_bin_dir() is not None


def _find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    for pattern in ("/usr/lib/erlang/bin/epmd", "/usr/lib/erlang/erts-*/bin/epmd"):
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            if os.access(path, os.X_OK):
                return str(path)
    return None


def ensure_rabbitmq_installed() -> None:
    """Install Debian's rabbitmq-server when it is missing and we are root; else explain.

    apt does not start the service in a container without systemd, so installing leaves no
    system broker behind (FIELD_NOTES: ~12 s, 35 MB).
    """
    if _rabbitmq_present():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrokerError(
            "RabbitMQ is not installed: no `rabbitmq-server` in PATH, /usr/sbin or "
            "/usr/lib/rabbitmq/bin. Install it, e.g. as root on Debian/Ubuntu: "
            "`apt-get update && apt-get install -y rabbitmq-server` (RabbitMQ >= 3.10 with "
            "its Erlang; the service need not run: foldfed starts its own private broker)."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "rabbitmq-server"],
    ):
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"`{' '.join(cmd)}` took longer than {_APT_TIMEOUT:.0f} s") from exc
        if proc.returncode != 0:
            raise BrokerError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
    if not _rabbitmq_present():
        raise BrokerError("apt-get installed rabbitmq-server but its scripts were not found")


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name is in parentheses and may itself contain spaces or ')'.
    return stat.rsplit(")", 1)[-1].split()[0]


def _reap(pid: int) -> None:
    """Collect the exit status of our own child if it has exited. Only for PIDs we spawned with
    posix_spawn: reaping a subprocess.Popen child would steal its exit status."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int | None) -> bool:
    """Running (zombies count as dead: some container init processes never reap them)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _proc_state(pid) not in (None, "Z", "X")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_server_beam(cmdline: list[bytes]) -> bool:
    """The broker's VM, not a rabbitmqctl VM: only the server boots with `-s rabbit boot`."""
    if not cmdline or not cmdline[0].endswith(b"beam.smp"):
        return False
    return any(cmdline[i : i + 3] == [b"-s", b"rabbit", b"boot"] for i in range(len(cmdline)))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- small helpers


def _free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now. All sockets are held open together so the ports
    differ; another process may still take one before we bind it (start() then fails with the
    port named, rather than hanging)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((_HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_free(port: int) -> bool:
    """Whether nobody listens on 127.0.0.1:port. SO_REUSEADDR, as the servers use, so that
    connections of the previous run in TIME_WAIT do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _can_connect(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _amqp_handshake(port: int, timeout: float) -> bool:
    """A real AMQP 0-9-1 greeting: send the protocol header and expect Connection.Start
    (method frame on channel 0, class 10, method 10). A bare TCP connect is not enough: the
    port can accept while the reader is not up. Blocking on purpose: start() may be called from
    inside a running event loop, where asyncio.run is not allowed."""
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_AMQP_HEADER)
            data = b""
            while len(data) < 11:
                chunk = sock.recv(11 - len(data))
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    frame_type, channel = data[0], int.from_bytes(data[1:3], "big")
    class_id, method_id = int.from_bytes(data[7:9], "big"), int.from_bytes(data[9:11], "big")
    return (frame_type, channel, class_id, method_id) == (1, 0, 10, 10)


def _write_private(path: Path, text: str) -> None:
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(data.splitlines()[-lines:])


def _disk_free_limit() -> str:
    value = os.environ.get(DISK_FREE_LIMIT_ENV, "").strip() or DEFAULT_DISK_FREE_LIMIT
    # Also guards the config file against injection (a newline would add settings).
    if not _DISK_LIMIT_RE.fullmatch(value):
        raise BrokerError(f"{DISK_FREE_LIMIT_ENV}={value!r}: expected e.g. 1GB, 500MB, 2GiB")
    return value


# --------------------------------------------------------------------------- the broker


class LocalBroker:
    """One private RabbitMQ node whose whole state lives in `data_dir`.

    `port=None` picks a free AMQP port on first start and reuses it afterwards; an explicit
    port overrides the stored one (the node name, hence the data, stays). Methods are blocking;
    from async code call start/stop via `asyncio.to_thread` if the loop must keep running.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        # Absolute: every path goes into env vars read by processes with another cwd.
        # Resolved, so that two spellings of one directory mark the same processes.
        self._dir = Path(data_dir).expanduser().resolve()
        self._requested_port = port
        self._mark = f"{_MARK_ENV}={self._dir}".encode()
        # PIDs we spawned (epmd, launcher): our children, which only we can reap.
        self._children: set[int] = set()

    # ---------------------------------------------------------------- paths and state

    def _path(self, name: str) -> Path:
        return self._dir / name

    @property
    def data_dir(self) -> Path:
        return self._dir

    def _load_state(self) -> _Ports | None:
        try:
            raw = json.loads(self._path("ports.json").read_text())
            state = _Ports(
                port=int(raw["port"]),
                dist_port=int(raw["dist_port"]),
                epmd_port=int(raw["epmd_port"]),
                nodename=str(raw["nodename"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state

    def _prepare_state(self) -> _Ports:
        """Ports and node name for this start: the stored ones, or fresh free ones."""
        state = self._load_state()
        if state is None:
            port, dist_port, epmd_port = _free_ports(3)
            if self._requested_port is not None:
                port = self._requested_port
            # With a private epmd the name need only be unique per broker; the port makes it
            # recognisable in `ps` and logs.
            state = _Ports(port, dist_port, epmd_port, f"foldfed-{port}@localhost")
        elif self._requested_port is not None:
            state = replace(state, port=self._requested_port)
        if len({state.port, state.dist_port, state.epmd_port}) != 3:
            # An explicit port that clashes with our stored helper ports: move the helpers.
            dist_port, epmd_port = [p for p in _free_ports(3) if p != state.port][:2]
            state = replace(state, dist_port=dist_port, epmd_port=epmd_port)
        _write_text(self._path("ports.json"), json.dumps(asdict(state), indent=2) + "\n")
        return state

    def _admin_password(self, *, create: bool) -> tuple[str | None, bool]:
        """(password, created_now)."""
        path = self._path("admin-password")
        try:
            password = path.read_text().strip()
        except FileNotFoundError:
            password = ""
        if password:
            return password, False
        if not create:
            return None, False
        # Hex: safe unescaped both in rabbitmq.conf and in the AMQP URL.
        password = secrets.token_hex(24)
        _write_private(path, password)
        return password, True

    def _ensure_cookie(self) -> None:
        """Erlang refuses a cookie file readable by others, and creates one itself if missing;
        we write it first so that server and rabbitmqctl (both HOME=data_dir) agree."""
        path = self._path(".erlang.cookie")
        if not path.is_file():
            _write_private(path, secrets.token_hex(20).upper())
        os.chmod(path, 0o600)

    def _render_config(self, port: int, password: str) -> str:
        # default_user/default_pass take effect only when the database is created; a restart
        # keeps the users it has. Because default_user is set, RabbitMQ never creates `guest`.
        # loopback_users = none: no user is restricted to loopback connections; harmless since
        # the only listener is on 127.0.0.1, and it keeps working when a test reaches the
        # broker through a forwarded port.
        return "\n".join(
            [
                "# Written by foldfed.localbroker on every start: edits are overwritten.",
                f"listeners.tcp.default = {_HOST}:{port}",
                "loopback_users = none",
                "default_vhost = /",
                f"default_user = {ADMIN_USER}",
                f"default_pass = {password}",
                "default_user_tags.administrator = true",
                "default_permissions.configure = .*",
                "default_permissions.read = .*",
                "default_permissions.write = .*",
                f"disk_free_limit.absolute = {_disk_free_limit()}",
                "vm_memory_high_watermark.relative = 0.4",
                f"max_message_size = {MAX_MESSAGE_SIZE}",
                "",
            ]
        )

    def _env(self, state: _Ports) -> dict[str, str]:
        """The environment for epmd, the server and rabbitmqctl. Inherited RABBITMQ_* and ERL_*
        variables are dropped so a developer's shell settings cannot redirect the node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        d = self._dir
        env.update(
            {
                _MARK_ENV: str(d),
                "HOME": str(d),
                # rabbitmqctl (Elixir) warns and mangles non-ASCII output under a non-UTF-8
                # locale.
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "ERL_EPMD_PORT": str(state.epmd_port),
                "ERL_EPMD_ADDRESS": _HOST,
                "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
                "RABBITMQ_NODENAME": state.nodename,
                "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_NODE_IP_ADDRESS": _HOST,
                "RABBITMQ_NODE_PORT": str(state.port),
                "RABBITMQ_DIST_PORT": str(state.dist_port),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "broker.pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_MOTD_FILE": str(d / "motd"),
                # The distribution listener on loopback only (default: all interfaces).
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface "
                "{127,0,0,1}",
                # rabbitmqctl's own distribution port: any free one, instead of the fixed
                # 35672-35682 range shared by every CLI call on the machine.
                "RABBITMQ_CTL_DIST_PORT_MIN": "0",
                "RABBITMQ_CTL_DIST_PORT_MAX": "0",
            }
        )
        return env

    @contextlib.contextmanager
    def _locked(self, timeout: float) -> Iterator[None]:
        """Serialize start/stop/kill on one data_dir across threads and processes (flock is
        released by the kernel if the holder dies). Bounded: never wait forever."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BrokerError(f"{self._dir} is locked by another start/stop") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # also releases the lock

    # ---------------------------------------------------------------- our processes

    def _our_pids(self) -> list[int]:
        """Live processes carrying our mark (see module docstring), other than ourselves."""
        me = os.getpid()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            if _environ_has(pid, self._mark) and _alive(pid):
                pids.append(pid)
        return pids

    def _beam_pid(self) -> int | None:
        """The server's beam.smp PID: from the pid file RabbitMQ writes, checked against /proc
        (the PID may be stale or reused), else found by our mark."""
        pid = _read_pid(self._path("broker.pid"))
        if pid and _alive(pid) and _environ_has(pid, self._mark):
            if _is_server_beam(_cmdline(pid)):
                return pid
        for pid in self._our_pids():
            if _is_server_beam(_cmdline(pid)):
                return pid
        return None

    def _epmd_alive(self) -> bool:
        pid = _read_pid(self._path("epmd.pid"))
        return bool(pid and _alive(pid) and _environ_has(pid, self._mark))

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._live(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _kill_all(self) -> None:
        """SIGKILL every process of ours and wait (bounded) until none is left."""
        deadline = time.monotonic() + _KILL_WAIT
        while pids := self._our_pids():
            if time.monotonic() > deadline:
                raise BrokerError(f"processes of the broker in {self._dir} survive SIGKILL: {pids}")
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        for name in ("broker.pid", "launcher.pid", "epmd.pid"):
            self._path(name).unlink(missing_ok=True)
        self._reap_children()

    def _live(self, pid: int | None) -> bool:
        """`_alive`, reaping the PID first if it is our child (else it stays a zombie)."""
        if pid is not None and pid in self._children:
            _reap(pid)
        return _alive(pid)

    def _reap_children(self) -> None:
        """Leave no zombie of ours behind (their environ is empty, so `_our_pids` cannot see
        them)."""
        for pid in list(self._children):
            _reap(pid)
            if _proc_state(pid) is None:
                self._children.discard(pid)

    def _spawn(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        """Start a detached process in its own session (a Ctrl-C in the terminal or the end of
        pytest's process group does not reach it), stdin from /dev/null, output appended to
        `log`, cwd data_dir (erl_crash.dump and the like land there).

        os.posix_spawn rather than subprocess.Popen: the broker outlives this object by design,
        and a Popen dropped while its child runs warns (ResourceWarning). We reap our children
        in `_live` instead."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        wrapper = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(self._dir), *argv]
        pid = os.posix_spawn(
            wrapper[0],
            wrapper,
            env,
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), flags, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
        )
        self._children.add(pid)
        return pid

    def _log_tail(self, lines: int = 40) -> str:
        state = self._load_state()
        parts = []
        if state is not None:
            node_log = self._path("log") / f"{state.nodename}.log"
            parts.append(f"--- last {lines} lines of {node_log}:\n{_tail(node_log, lines)}")
        out = self._path("server.out")
        parts.append(f"--- last {lines} lines of {out}:\n{_tail(out, lines)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- public API

    @property
    def amqp_url(self) -> str:
        """The admin's URL. Known once the broker has been started (port and password are
        chosen then), whether or not it is running now."""
        state = self._load_state()
        password, _ = self._admin_password(create=False)
        if state is None or password is None:
            raise BrokerError(f"broker in {self._dir} was never started: no port or password")
        return f"amqp://{ADMIN_USER}:{password}@{_HOST}:{state.port}/"

    def status(self) -> BrokerStatus:
        pid = self._beam_pid()
        state = self._load_state()
        port = state.port if state else None
        url = None
        if pid is not None:
            with contextlib.suppress(BrokerError):  # password file deleted under us
                url = self.amqp_url
        return BrokerStatus(
            running=pid is not None, pid=pid, port=port, amqp_url=url, data_dir=self._dir
        )

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker (or find it running) and return the admin's AMQP URL.

        Returns once AMQP answers a handshake *and* `rabbitmqctl await_startup` succeeded, so
        users can be added right away. On failure everything started is killed and the
        BrokerError carries the end of the logs.
        """
        ensure_rabbitmq_installed()
        bin_dir = _find_rabbitmq_bin_dir()
        epmd = _find_epmd()
        if bin_dir is None or epmd is None:
            raise BrokerError("rabbitmq-server or epmd not found although installed")
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            if self._beam_pid() is not None:
                return self.amqp_url
            # A previous owner may have died half-way (an epmd or a launcher left over).
            self._kill_all()
            state = self._prepare_state()
            for key, value in asdict(state).items():
                if key.endswith("port") and not _port_free(value):
                    raise BrokerError(
                        f"{key} {value} on {_HOST} is in use; the broker in {self._dir} "
                        "cannot start (stop whatever holds it; for dist_port/epmd_port, "
                        "deleting ports.json picks new ones and keeps the data)"
                    )
            mnesia_existed = (self._path("mnesia") / state.nodename).is_dir()
            password, created = self._admin_password(create=True)
            assert password is not None
            self._ensure_cookie()
            self._path("conf.d").mkdir(exist_ok=True)
            _write_text(self._path("rabbitmq-env.conf"), "# empty: shadows /etc/rabbitmq\n")
            _write_text(self._path("enabled_plugins"), "[].\n")
            _write_private(self._path("rabbitmq.conf"), self._render_config(state.port, password))
            env = self._env(state)
            try:
                self._boot(bin_dir, epmd, env, state, deadline)
                if created and mnesia_existed:
                    # The password file was lost but the database kept the old password
                    # (default_pass applies only to a new database): reset it.
                    self.add_user(
                        ADMIN_USER,
                        password,
                        configure=".*",
                        write=".*",
                        read=".*",
                        tags="administrator",
                    )
            except BaseException as exc:
                tail = self._log_tail()
                with contextlib.suppress(BrokerError):
                    self._kill_all()
                if isinstance(exc, BrokerError | OSError | subprocess.SubprocessError):
                    raise BrokerError(
                        f"RabbitMQ in {self._dir} did not start: {exc}\n{tail}"
                    ) from exc
                raise
        return self.amqp_url

    def _boot(
        self,
        bin_dir: Path,
        epmd: str,
        env: dict[str, str],
        state: _Ports,
        deadline: float,
    ) -> None:
        out = self._path("server.out")
        with out.open("a") as fh:
            fh.write(f"\n=== foldfed.localbroker start {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

        # 1. Our epmd, and wait until it accepts: the node registers with it while booting.
        epmd_port = state.epmd_port
        epmd_pid = self._spawn([epmd, "-port", str(epmd_port), "-address", _HOST], env, out)
        _write_text(self._path("epmd.pid"), f"{epmd_pid}\n")
        while not _can_connect(epmd_port, 0.5):
            if not self._live(epmd_pid):
                raise BrokerError(f"epmd on port {epmd_port} exited at once")
            if time.monotonic() > deadline:
                raise BrokerError(f"epmd on port {epmd_port} did not come up")
            time.sleep(0.02)

        # 2. The real start script, in the foreground (not -detached): it stays the parent of
        #    beam.smp and forwards SIGTERM, and RabbitMQ writes beam's PID to broker.pid.
        launcher = self._spawn([str(bin_dir / "rabbitmq-server")], env, out)
        _write_text(self._path("launcher.pid"), f"{launcher}\n")

        # 3. AMQP answers (cheap to poll, no Erlang VM per try).
        port = state.port
        while not _amqp_handshake(port, 1.0):
            if not self._live(launcher):
                raise BrokerError("rabbitmq-server exited during start-up")
            if time.monotonic() > deadline:
                raise BrokerError(f"no AMQP on {_HOST}:{port} in time")
            time.sleep(0.1)

        # 4. The rabbit application has finished booting (users, vhosts usable).
        remaining = max(1.0, deadline - time.monotonic())
        self._ctl(env, state, ["await_startup", "--timeout", str(int(remaining))], remaining + 5)

        # 5. beam.smp's PID, for stop().
        while self._beam_pid() is None:
            if time.monotonic() > deadline:
                raise BrokerError("broker answers but its beam.smp process was not found")
            time.sleep(0.05)

    def _ctl(self, env: dict[str, str], state: _Ports, args: list[str], timeout: float) -> str:
        bin_dir = _find_rabbitmq_bin_dir()
        if bin_dir is None:
            raise BrokerError("rabbitmqctl not found")
        cmd = [str(bin_dir / "rabbitmqctl"), "-n", state.nodename, *args]
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"rabbitmqctl {args[0]} took longer than {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {args[0]} failed ({proc.returncode}): "
                f"{(proc.stderr.strip() or proc.stdout.strip())[-4000:]}"
            )
        return proc.stdout

    def rabbitmqctl(self, *args: str, timeout: float = _CTL_TIMEOUT) -> str:
        """Run `rabbitmqctl -n <our node> *args` with our HOME (cookie) and epmd port; return
        stdout. Refuses while the broker is down: rabbitmqctl would then start a daemonised
        epmd on our port that nobody stops."""
        if not args:
            raise BrokerError("rabbitmqctl needs a command")
        state = self._load_state()
        if state is None or self._beam_pid() is None or not self._epmd_alive():
            raise BrokerError(f"broker in {self._dir} is not running")
        return self._ctl(self._env(state), state, list(args), timeout)

    def add_participant(self, name: str, password: str) -> None:
        """A participant's broker user with exactly its least-privilege permissions and
        event-topic grants (`topology`), as every deployment must give it."""
        perms = topology.participant_permissions(name)
        self.add_user(name, password, configure=perms.configure, write=perms.write, read=perms.read)
        topology.grant_event_topics(self.rabbitmqctl, name, perms)

    def add_user(
        self,
        name: str,
        password: str,
        *,
        configure: str,
        write: str,
        read: str,
        tags: str = "",
    ) -> None:
        """Create or update a user on vhost "/" with the given permission regexes (idempotent:
        an existing user gets the new password, tags and permissions).

        Note: the password is on rabbitmqctl's command line, visible in `ps` for a moment; fine
        for a private test broker, not for production credentials.
        """
        if name.startswith("-") or password.startswith("-"):
            raise BrokerError("user names and passwords must not start with '-' (CLI options)")
        try:
            self.rabbitmqctl("add_user", name, password)
        except BrokerError as exc:
            if "already exists" not in str(exc):
                raise
            self.rabbitmqctl("change_password", name, password)
        self.rabbitmqctl("set_user_tags", name, *tags.split())
        self.rabbitmqctl("set_permissions", "-p", "/", name, configure, write, read)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: SIGTERM to beam.smp (RabbitMQ shuts down cleanly and flushes queues),
        SIGKILL after `timeout`; then end epmd and anything else of ours. Idempotent. Raises
        BrokerError only if a process survives SIGKILL."""
        with self._locked(timeout + _KILL_WAIT):
            pid = self._beam_pid()
            if pid is not None:
                _signal(pid, signal.SIGTERM)
                if not self._wait_gone(pid, timeout):
                    _signal(pid, signal.SIGKILL)
                    self._wait_gone(pid, _KILL_WAIT)
                # The launcher script exits right after beam; give it a moment before SIGKILL.
                launcher = _read_pid(self._path("launcher.pid"))
                if launcher is not None and _environ_has(launcher, self._mark):
                    self._wait_gone(launcher, 2.0)
            self._kill_all()

    def kill(self) -> None:
        """Crash the broker: SIGKILL beam.smp first (no clean shutdown, as in a real crash),
        then everything else of ours, epmd included. Idempotent."""
        with self._locked(_KILL_WAIT):
            pid = self._beam_pid()
            if pid is not None:
                _signal(pid, signal.SIGKILL)
                self._wait_gone(pid, _KILL_WAIT)
            self._kill_all()

"""One private RabbitMQ node's lifecycle: `LocalBroker` starts it (epmd, then the server,
then waits for AMQP and the rabbit application), reports its status, stops or kills it, and
runs rabbitmqctl against it. Its files are described in the package docstring, its processes
in `processes`.

epmd: every Erlang node registers with an epmd. The shared one on port 4369 would outlive us
(nobody stops it) and would mix our nodes with any other project's. So each LocalBroker starts
its own epmd on a free port (ERL_EPMD_PORT, bound to 127.0.0.1), and stop()/kill() end it.
rabbitmqctl gets the same ERL_EPMD_PORT. Beware: rabbitmqctl, when it finds no epmd on that
port, starts a *daemonised* one that would leak; that is why `rabbitmqctl()` refuses to run
when our broker is down.

A node of a local cluster (`cluster`) shares the cluster's one epmd instead: Erlang nodes
find each other through the epmd of their host, so nodes registered with different epmds
could never join. Such a node is given `epmd_port` and neither starts nor stops an epmd.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from foldfed.errors import BrokerError
from foldfed.localbroker.datadir import (
    Ports,
    admin_password,
    ensure_cookie,
    load_ports,
    locked,
    prepare_ports,
    tail,
    write_private,
    write_text,
)
from foldfed.localbroker.install import (
    ensure_rabbitmq_installed,
    find_epmd,
    find_rabbitmq_bin_dir,
)
from foldfed.localbroker.netprobe import HOST, amqp_handshake, can_connect, port_free
from foldfed.localbroker.nodeconfig import ADMIN_USER, node_env, render_config
from foldfed.localbroker.processes import KILL_WAIT, BrokerProcesses
from foldfed.localbroker.procfs import environ_has, read_pid, send_signal
from foldfed.localbroker.users import add_participant, add_user

__all__ = ["BrokerStatus", "LocalBroker"]

_CTL_TIMEOUT = 60.0


@dataclass(frozen=True)
class BrokerStatus:
    """A snapshot. `port` is the configured AMQP port (known once started, even when stopped);
    `pid` and `amqp_url` are set only while the broker runs."""

    running: bool
    pid: int | None
    port: int | None
    amqp_url: str | None
    data_dir: Path


class LocalBroker:
    """One private RabbitMQ node whose whole state lives in `data_dir`.

    `port=None` picks a free AMQP port on first start and reuses it afterwards; an explicit
    port overrides the stored one (the node name, hence the data, stays). Methods are blocking;
    from async code call start/stop via `asyncio.to_thread` if the loop must keep running.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        epmd_port: int | None = None,
        cluster_node: bool = False,
    ) -> None:
        """`epmd_port`: an epmd that someone else runs (a cluster's); None: our own.
        `cluster_node`: configure the node for quorum queues with large messages
        (`nodeconfig.render_config`)."""
        # Absolute: every path goes into env vars read by processes with another cwd.
        # Resolved, so that two spellings of one directory mark the same processes.
        self._dir = Path(data_dir).expanduser().resolve()
        self._requested_port = port
        self._shared_epmd = epmd_port
        self._cluster_node = cluster_node
        self._procs = BrokerProcesses(self._dir)

    def _path(self, name: str) -> Path:
        return self._dir / name

    @property
    def data_dir(self) -> Path:
        return self._dir

    def _log_tail(self, lines: int = 40) -> str:
        state = load_ports(self._dir)
        parts = []
        if state is not None:
            node_log = self._path("log") / f"{state.nodename}.log"
            parts.append(f"--- last {lines} lines of {node_log}:\n{tail(node_log, lines)}")
        out = self._path("server.out")
        parts.append(f"--- last {lines} lines of {out}:\n{tail(out, lines)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- public API

    @property
    def amqp_url(self) -> str:
        """The admin's URL. Known once the broker has been started (port and password are
        chosen then), whether or not it is running now."""
        state = load_ports(self._dir)
        password, _ = admin_password(self._dir, create=False)
        if state is None or password is None:
            raise BrokerError(f"broker in {self._dir} was never started: no port or password")
        return f"amqp://{ADMIN_USER}:{quote(password, safe='')}@{HOST}:{state.port}/"

    def status(self) -> BrokerStatus:
        pid = self._procs.beam_pid()
        state = load_ports(self._dir)
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
        bin_dir = find_rabbitmq_bin_dir()
        epmd = find_epmd()
        if bin_dir is None or epmd is None:
            raise BrokerError("rabbitmq-server or epmd not found although installed")
        deadline = time.monotonic() + timeout
        with locked(self._dir, timeout):
            if self._procs.beam_pid() is not None:
                return self.amqp_url
            # A previous owner may have died half-way (an epmd or a launcher left over).
            self._procs.kill_all()
            state = prepare_ports(self._dir, self._requested_port, self._shared_epmd)
            for key, value in asdict(state).items():
                if key == "epmd_port" and self._shared_epmd is not None:
                    continue  # the cluster's epmd: in use by design
                if key.endswith("port") and not port_free(value):
                    raise BrokerError(
                        f"{key} {value} on {HOST} is in use; the broker in {self._dir} "
                        "cannot start (stop whatever holds it; for dist_port/epmd_port, "
                        "deleting ports.json picks new ones and keeps the data)"
                    )
            mnesia_existed = (self._path("mnesia") / state.nodename).is_dir()
            password, created = admin_password(self._dir, create=True)
            assert password is not None
            ensure_cookie(self._dir)
            self._path("conf.d").mkdir(exist_ok=True)
            write_text(self._path("rabbitmq-env.conf"), "# empty: shadows /etc/rabbitmq\n")
            write_text(self._path("enabled_plugins"), "[].\n")
            config = render_config(state.port, password, cluster_node=self._cluster_node)
            write_private(self._path("rabbitmq.conf"), config)
            env = node_env(self._dir, state)
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
                logs = self._log_tail()
                with contextlib.suppress(BrokerError):
                    self._procs.kill_all()
                if isinstance(exc, BrokerError | OSError | subprocess.SubprocessError):
                    raise BrokerError(
                        f"RabbitMQ in {self._dir} did not start: {exc}\n{logs}"
                    ) from exc
                raise
        return self.amqp_url

    def _boot(
        self,
        bin_dir: Path,
        epmd: str,
        env: dict[str, str],
        state: Ports,
        deadline: float,
    ) -> None:
        out = self._path("server.out")
        with out.open("a") as fh:
            fh.write(f"\n=== foldfed.localbroker start {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

        # 1. Our epmd (or the cluster's), and wait until it accepts: the node registers with
        #    it while booting.
        epmd_port = state.epmd_port
        epmd_pid = None
        if self._shared_epmd is None:
            argv = [epmd, "-port", str(epmd_port), "-address", HOST]
            epmd_pid = self._procs.spawn(argv, env, out)
            write_text(self._path("epmd.pid"), f"{epmd_pid}\n")
        while not can_connect(epmd_port, 0.5):
            if epmd_pid is not None and not self._procs.live(epmd_pid):
                raise BrokerError(f"epmd on port {epmd_port} exited at once")
            if time.monotonic() > deadline:
                raise BrokerError(f"epmd on port {epmd_port} did not come up")
            time.sleep(0.02)

        # 2. The real start script, in the foreground (not -detached): it stays the parent of
        #    beam.smp and forwards SIGTERM, and RabbitMQ writes beam's PID to broker.pid.
        launcher = self._procs.spawn([str(bin_dir / "rabbitmq-server")], env, out)
        write_text(self._path("launcher.pid"), f"{launcher}\n")

        # 3. AMQP answers (cheap to poll, no Erlang VM per try).
        port = state.port
        while not amqp_handshake(port, 1.0):
            if not self._procs.live(launcher):
                raise BrokerError("rabbitmq-server exited during start-up")
            if time.monotonic() > deadline:
                raise BrokerError(f"no AMQP on {HOST}:{port} in time")
            time.sleep(0.1)

        # 4. The rabbit application has finished booting (users, vhosts usable).
        remaining = max(1.0, deadline - time.monotonic())
        self._ctl(env, state, ["await_startup", "--timeout", str(int(remaining))], remaining + 5)

        # 5. beam.smp's PID, for stop().
        while self._procs.beam_pid() is None:
            if time.monotonic() > deadline:
                raise BrokerError("broker answers but its beam.smp process was not found")
            time.sleep(0.05)

    def _ctl(
        self,
        env: dict[str, str],
        state: Ports,
        args: list[str],
        timeout: float,
        stdin: str | None = None,
    ) -> str:
        bin_dir = find_rabbitmq_bin_dir()
        if bin_dir is None:
            raise BrokerError("rabbitmqctl not found")
        cmd = [str(bin_dir / "rabbitmqctl"), "-n", state.nodename, *args]
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                cwd=self._dir,
                # `stdin` (a password) is what the command reads; else /dev/null, so that
                # nothing ever waits for a terminal.
                input=stdin,
                stdin=subprocess.DEVNULL if stdin is None else None,
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

    def rabbitmqctl(
        self, *args: str, timeout: float = _CTL_TIMEOUT, stdin: str | None = None
    ) -> str:
        """Run `rabbitmqctl -n <our node> *args` with our HOME (cookie) and epmd port; return
        stdout. `stdin` is written to its standard input (a password: `users`). Refuses while
        the broker is down: rabbitmqctl would then start a daemonised epmd on our port that
        nobody stops."""
        if not args:
            raise BrokerError("rabbitmqctl needs a command")
        state = load_ports(self._dir)
        if state is None or self._procs.beam_pid() is None or not self._epmd_alive(state):
            raise BrokerError(f"broker in {self._dir} is not running")
        return self._ctl(node_env(self._dir, state), state, list(args), timeout, stdin)

    def _epmd_alive(self, state: Ports) -> bool:
        if self._shared_epmd is None:
            return self._procs.epmd_alive()
        return can_connect(state.epmd_port, 0.5)

    def add_participant(self, name: str, password: str) -> None:
        """A participant's broker user with exactly its least-privilege permissions and
        event-topic grants (`topology`), as every deployment must give it."""
        add_participant(self.rabbitmqctl, name, password)

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
        an existing user gets the new password, tags and permissions). The password reaches
        rabbitmqctl on stdin, never its command line (`users`)."""
        add_user(
            self.rabbitmqctl,
            name,
            password,
            configure=configure,
            write=write,
            read=read,
            tags=tags,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: SIGTERM to beam.smp (RabbitMQ shuts down cleanly and flushes queues),
        SIGKILL after `timeout`; then end epmd and anything else of ours. Idempotent. Raises
        BrokerError only if a process survives SIGKILL."""
        with locked(self._dir, timeout + KILL_WAIT):
            pid = self._procs.beam_pid()
            if pid is not None:
                send_signal(pid, signal.SIGTERM)
                if not self._procs.wait_gone(pid, timeout):
                    send_signal(pid, signal.SIGKILL)
                    self._procs.wait_gone(pid, KILL_WAIT)
                # The launcher script exits right after beam; give it a moment before SIGKILL.
                launcher = read_pid(self._path("launcher.pid"))
                if launcher is not None and environ_has(launcher, self._procs.mark):
                    self._procs.wait_gone(launcher, 2.0)
            self._procs.kill_all()

    def kill(self) -> None:
        """Crash the broker: SIGKILL beam.smp first (no clean shutdown, as in a real crash),
        then everything else of ours, epmd included. Idempotent."""
        with locked(self._dir, KILL_WAIT):
            pid = self._procs.beam_pid()
            if pid is not None:
                send_signal(pid, signal.SIGKILL)
                self._procs.wait_gone(pid, KILL_WAIT)
            self._procs.kill_all()

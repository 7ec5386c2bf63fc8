"""The processes of one private broker: spawning them detached, knowing which live ones are
ours, and ending them all.

Knowing what is ours: every process we start carries FOLDFED_LOCALBROKER_DIR=<data_dir> in its
environment (`nodeconfig.MARK_ENV`), and their children (beam.smp, erl_child_setup,
inet_gethost, the disk monitor, epmd) inherit it. Leftovers are found by that mark in /proc,
which survives the death of the Python process that started the broker and guards against
PID reuse. Zombies count as dead (`procfs`), and we reap the processes we spawned ourselves.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from foldfed.errors import BrokerError
from foldfed.localbroker.nodeconfig import MARK_ENV
from foldfed.localbroker.procfs import (
    alive,
    cmdline,
    environ_has,
    is_server_beam,
    proc_state,
    read_pid,
    reap,
    send_signal,
)

__all__ = ["KILL_WAIT", "BrokerProcesses"]

KILL_WAIT = 10.0  # after SIGKILL a process is gone in milliseconds; this only bounds the wait
PID_FILES = ("broker.pid", "launcher.pid", "epmd.pid")


class BrokerProcesses:
    """The processes marked with one `data_dir` (absolute and resolved, so two spellings of
    one directory mark the same processes)."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self.mark = f"{MARK_ENV}={data_dir}".encode()
        # PIDs we spawned (epmd, launcher): our children, which only we can reap.
        self._children: set[int] = set()

    def ours(self, pid: int) -> bool:
        """Alive and carrying our mark."""
        return alive(pid) and environ_has(pid, self.mark)

    def pids(self) -> list[int]:
        """Live processes carrying our mark, other than ourselves."""
        me = os.getpid()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            if environ_has(pid, self.mark) and alive(pid):
                pids.append(pid)
        return pids

    def beam_pid(self) -> int | None:
        """The server's beam.smp PID: from the pid file RabbitMQ writes, checked against /proc
        (the PID may be stale or reused), else found by our mark."""
        pid = read_pid(self._dir / "broker.pid")
        if pid and self.ours(pid) and is_server_beam(cmdline(pid)):
            return pid
        for pid in self.pids():
            if is_server_beam(cmdline(pid)):
                return pid
        return None

    def epmd_alive(self) -> bool:
        pid = read_pid(self._dir / "epmd.pid")
        return bool(pid and self.ours(pid))

    def live(self, pid: int | None) -> bool:
        """`procfs.alive`, reaping the PID first if it is our child (else it stays a zombie)."""
        if pid is not None and pid in self._children:
            reap(pid)
        return alive(pid)

    def wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.live(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill_all(self) -> None:
        """SIGKILL every process of ours and wait (bounded) until none is left."""
        deadline = time.monotonic() + KILL_WAIT
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise BrokerError(f"processes of the broker in {self._dir} survive SIGKILL: {pids}")
            for pid in pids:
                send_signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        for name in PID_FILES:
            (self._dir / name).unlink(missing_ok=True)
        self._reap_children()

    def _reap_children(self) -> None:
        """Leave no zombie of ours behind (their environ is empty, so `pids` cannot see
        them)."""
        for pid in list(self._children):
            reap(pid)
            if proc_state(pid) is None:
                self._children.discard(pid)

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        """Start a detached process in its own session (a Ctrl-C in the terminal or the end of
        pytest's process group does not reach it), stdin from /dev/null, output appended to
        `log`, cwd data_dir (erl_crash.dump and the like land there). `env` must carry our
        mark (`nodeconfig.node_env` does).

        os.posix_spawn rather than subprocess.Popen: the broker outlives this object by design,
        and a Popen dropped while its child runs warns (ResourceWarning). We reap our children
        in `live` instead."""
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

"""What Linux's /proc says about a process: whether it lives (a zombie does not), its
environment and its command line, and the PID files that name our processes.

Zombies: in some containers PID 1 never reaps orphans, so a dead process can linger as a
zombie and `os.kill(pid, 0)` still succeeds. Liveness here treats zombies as dead, and
`reap` collects the processes we spawned ourselves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
    "alive",
    "cmdline",
    "environ_has",
    "is_server_beam",
    "proc_state",
    "read_pid",
    "reap",
    "send_signal",
]


def proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name is in parentheses and may itself contain spaces or ')'.
    return stat.rsplit(")", 1)[-1].split()[0]


def reap(pid: int) -> None:
    """Collect the exit status of our own child if it has exited. Only for PIDs we spawned with
    posix_spawn: reaping a subprocess.Popen child would steal its exit status."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int | None) -> bool:
    """Running (zombies count as dead: some container init processes never reap them)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return proc_state(pid) not in (None, "Z", "X")


def send_signal(pid: int, sig: int) -> None:
    """`os.kill`, where a process that is already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_server_beam(argv: list[bytes]) -> bool:
    """The broker's VM, not a rabbitmqctl VM: only the server boots with `-s rabbit boot`."""
    if not argv or not argv[0].endswith(b"beam.smp"):
        return False
    return any(argv[i : i + 3] == [b"-s", b"rabbit", b"boot"] for i in range(len(argv)))


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None

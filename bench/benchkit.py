"""Shared plumbing of the benchmarks: process status, signal handling, result files.

The scripts run as `python bench/<name>.py`, which puts bench/ on sys.path, so they import
this module as `benchkit`. Standard library only: the bare roles of transfer.py import it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

A = TypeVar("A")


class BenchError(Exception):
    """A run failed; the message says where, with the log of the process at fault."""


def read_status_kib(pid: int | str, key: str) -> int:
    """A `kB` field of /proc/<pid>/status, pid "self" for this process (0 once the process
    is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def clean_env(**defaults: str) -> dict[str, str]:
    """Our environment without FOLDFED_* settings, so a developer's shell cannot change what
    is measured (a window, a rate limit); `defaults` fill in variables the shell lacks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Let clean-up (bounded by its own timeouts) finish despite a second Ctrl-C."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so that clean-up runs."""
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # respect nohup and the like
            signal.signal(sig, _interrupt)


def code_version() -> str:
    """The commit measured, "+dirty" when services/ has uncommitted changes."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        dirty = "+dirty" if git("status", "--porcelain", "--", "services") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save(result: dict[str, Any], name: str) -> Path:
    """Write `result` to bench/results/<name>-<UTC timestamp>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run_bench(
    args: A,
    bench: Callable[[A], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    name: str,
    *,
    interrupted: str,
    failed: str,
) -> int:
    """main()'s common part: run `bench` with signals turned into KeyboardInterrupt, print
    its table and save its result as `name`; the exit status (130 interrupted, 1 failed)."""
    interrupt_on_signals()
    try:
        result = bench(args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"{failed}{exc}", file=sys.stderr)
        return 1
    print()
    print(render(result))
    print(f"\nresults: {save(result, name)}")
    return 0

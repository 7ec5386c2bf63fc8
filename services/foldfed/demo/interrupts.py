"""Stopping an orchestrating command on a signal: `foldfed demo` and `foldfed loadtest`
start a broker and many services, and SIGTERM, SIGINT or SIGHUP must leave none of them
behind, whatever the command was doing when the signal came (docs/shutdown.md).

`StopOnSignals` turns the first of those signals into `Interrupted` (a KeyboardInterrupt,
so the `finally` blocks that stop things run, and code that already handles Ctrl-C handles
it) raised in the main thread, after two kinds of callbacks the command registered:

- `terminate` callbacks run inside the signal handler. They must be quick and never block
  or take a lock (the main thread may hold it): they send SIGTERM to what was started, so
  that threads waiting on those processes (start-up waits in worker threads) return.
- `stop` callbacks run when the `with` block ends after a signal, in reverse order of
  registration, whatever the unwinding skipped: each must be safe to call twice (the
  command's own `finally` usually called it already).

Later signals are ignored: the stop they would interrupt is what ends everything, and it
is bounded (services stop within 10 s of SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal reached the command; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process ended by this signal."""
        return 128 + self.signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """A command's exit status after `exc`: 128 + the signal, as a shell reports it (130
    for a Ctrl-C that did not come through StopOnSignals)."""
    return exc.exit_status if isinstance(exc, Interrupted) else 128 + signal.SIGINT


class StopOnSignals:
    """Within `with StopOnSignals() as signals:`, the first SIGTERM, SIGINT or SIGHUP runs
    the terminate callbacks and raises Interrupted; the `with` block's end runs the stop
    callbacks if a signal came. Outside the main thread (where Python cannot handle
    signals) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._terminates: list[Callable[[], None]] = []
        self._stops: list[Callable[[], None]] = []
        self._previous: dict[int, Any] = {}
        # Set once the block ends: a signal then is only recorded (the stop runs anyway).
        self._closing = False

    def track(self, stop: Callable[[], None], terminate: Callable[[], None] | None = None) -> None:
        """`stop`: blocking, idempotent, run at the end after a signal. `terminate`:
        signal-safe and quick, run in the handler."""
        self._stops.append(stop)
        if terminate is not None:
            self._terminates.append(terminate)

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            if self.signum is not None:
                for stop in reversed(self._stops):
                    _quietly(stop)
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping everything this command started",
            file=sys.stderr,
            flush=True,
        )
        for terminate in self._terminates:
            _quietly(terminate)
        if not self._closing:
            raise Interrupted(signum)


def _quietly(callback: Callable[[], None]) -> None:
    """A failing callback must not keep the others from running; it says why."""
    try:
        callback()
    except Exception as exc:
        with contextlib.suppress(Exception):
            print(f"while stopping: {exc!r}", file=sys.stderr, flush=True)

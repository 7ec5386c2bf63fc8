"""A whole federation as local processes: a private broker, the hub services and, per
participant, a trainer and an uploader, each its own process with its own identity.

The environment each process gets is exactly what compose or Kubernetes would give it:
the same FOLDFED_* variables, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlparse

from foldfed.credentials import new_password
from foldfed.errors import FoldfedError
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
from foldfed.settings import env_for

FOLDFED = [sys.executable, "-m", "foldfed.cli"]


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class FederationSpec:
    participants: tuple[str, ...]
    steps: int
    workdir: Path
    # FOLDFED_* settings every process gets (K, G, optimizer, chunk size, ...), as
    # settings.env_for writes them.
    common_env: Mapping[str, str] = field(default_factory=dict)
    # Extra settings per participant (e.g. a rate limit to emulate a slow link).
    participant_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Start the monitor (a hub process) on this HTTP port (0: a free one); None: no monitor.
    monitor_port: int | None = None


class LocalFederation:
    """Starts and stops everything of one federated run; `stop()` is safe to call twice."""

    def __init__(
        self,
        spec: FederationSpec,
        broker: LocalBroker | None = None,
        passwords: Mapping[str, str] | None = None,
    ) -> None:
        """`broker`: an already provisioned one (tests); `passwords`: its participant
        users' passwords, so no user is created or changed."""
        self.spec = spec
        self.workdir = spec.workdir
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._own_broker = broker is None
        self.broker = broker or LocalBroker(self.workdir / "broker")
        self.processes: dict[str, Process] = {}
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        # Extra settings for a process's first start only (crash points in crash tests).
        self.crash_env: dict[str, dict[str, str]] = {}
        self.restarted: set[str] = set()
        self.passwords: dict[str, str] = dict(passwords or {})
        self.admin_url = ""
        self.monitor_url = ""

    # ---------------------------------------------------------------- set-up

    def start_broker(self) -> str:
        if self._own_broker:
            ensure_rabbitmq_installed()
        self.admin_url = self.broker.start()
        for participant in self.spec.participants:
            if participant in self.passwords:
                continue
            self.passwords[participant] = new_password()
            self.broker.add_participant(participant, self.passwords[participant])
        return self.admin_url

    def url_for(self, participant: str) -> str:
        parsed = urlparse(self.admin_url)
        password = quote(self.passwords[participant])
        return f"amqp://{quote(participant)}:{password}@{parsed.hostname}:{parsed.port}/"

    @property
    def initial_model(self) -> Path:
        return self.workdir / "initial-model.safetensors"

    @property
    def hub_dir(self) -> Path:
        return self.workdir / "hub"

    @property
    def trace_dir(self) -> Path:
        return self.workdir / "traces"

    def spool_of(self, participant: str) -> Path:
        return self.workdir / "participants" / participant / "spool"

    def hub_env(self) -> dict[str, str]:
        return {
            **self.spec.common_env,
            **env_for(
                amqp_url=self.admin_url,
                participants=self.spec.participants,
                state_dir=self.hub_dir,
                initial_model=self.initial_model,
                steps=self.spec.steps,
            ),
        }

    def participant_env(self, participant: str) -> dict[str, str]:
        return {
            **self.spec.common_env,
            **env_for(
                amqp_url=self.url_for(participant),
                participant=participant,
                participants=self.spec.participants,
                spool_dir=self.spool_of(participant),
                initial_model=self.initial_model,
            ),
            **self.spec.participant_env.get(participant, {}),
        }

    # ---------------------------------------------------------------- processes

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> Process:
        """Start `foldfed <args>` as process `name` (replacing a dead one of that name)."""
        self._commands[name] = (args, dict(env))
        return self._spawn(name, args, {**env, **self.crash_env.get(name, {})})

    def restart(self, name: str) -> Process:
        """Start `name` again with its settings, without any crash point."""
        args, env = self._commands[name]
        return self._spawn(name, args, env)

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Process:
        log_path = self.logs / f"{name}.log"
        # Every process's spans in the run's folder: `foldfed trace STEP --dir <it>`.
        full_env = {**_base_env(), **env_for(trace_dir=self.trace_dir), **env}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*FOLDFED, *args],
                env=full_env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal reaches only the demo
            )
        process = Process(name, proc, log_path)
        self.processes[name] = process
        return process

    def start_hub(self) -> None:
        self.start("aggregator", ["aggregator"], self.hub_env())
        self.wait_for_log("aggregator", "ingest ready")
        if self.spec.monitor_port is not None:
            self.start_monitor()
        self.start("barrier", ["barrier"], self.hub_env())

    def start_monitor(self) -> None:
        """The monitor, before the barrier so that it sees the first release."""
        port = self.spec.monitor_port or _free_port()
        self.monitor_url = f"http://127.0.0.1:{port}/"
        local = env_for(monitor_host="127.0.0.1")  # unless the common settings say otherwise
        env = {**local, **self.hub_env(), **env_for(monitor_port=port)}
        self.start("monitor", ["monitor"], env)
        self.wait_for_log("monitor", "monitor ready")

    def start_participant(self, participant: str) -> None:
        env = self.participant_env(participant)
        self.start(f"{participant}-uploader", ["uploader"], env)
        self.start(f"{participant}-trainer", ["trainer"], env)

    def start_all(self) -> None:
        self.start_hub()
        for participant in self.spec.participants:
            self.start_participant(participant)

    def wait_for_log(self, name: str, needle: str, timeout: float = 60.0) -> None:
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while needle not in process.log():
            if not process.alive():
                raise FoldfedError(f"{name} exited {process.proc.returncode}:\n{process.log()}")
            if time.monotonic() > deadline:
                raise FoldfedError(f"{name} did not log {needle!r} within {timeout:g} s")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL, for real (crash tests)."""
        process = self.processes[name]
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait(10)

    def dead(self) -> list[Process]:
        return [p for p in self.processes.values() if not p.alive()]

    def stop(self, grace: float = 15.0) -> None:
        for process in self.processes.values():
            if process.alive():
                process.proc.terminate()
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait(10)
        if self._own_broker:
            self.broker.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env() -> dict[str, str]:
    """The parent's environment minus anything that would point a child elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    # Logs as JSON lines in files, one process per core is plenty on a laptop.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env

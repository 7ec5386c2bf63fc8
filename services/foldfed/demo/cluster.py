"""A whole federation as local processes: a private broker, the hub services and, per
participant, a trainer and an uploader, each its own process with its own identity.

The environment each process gets is exactly what compose or Kubernetes would give it:
the same FOLDFED_* variables, so the three cannot drift apart.

Stopping leaves nothing behind (docs/shutdown.md). Every process of the federation, and
whatever it starts in turn (torchrun's workers), lives in one process group of its own,
held open by an anchor process that ignores SIGTERM, SIGINT and SIGHUP: a SIGTERM to the
group stops them all, and a SIGKILL to it sweeps anything left, including a process that
was being started at the moment the orchestrating command was signalled and so was never
recorded. Not the terminal's group: a Ctrl-C reaches only the command, which then stops
the federation in order. The private broker is stopped by PID (localbroker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlparse

from foldfed.credentials import new_password
from foldfed.errors import FoldfedError
from foldfed.keyfiles import write_keyring, write_private_key
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
from foldfed.runtime import SHUTDOWN_BOUND_S
from foldfed.settings import env_for
from foldfed.signing import Keyring, SigningKey
from foldfed.topology import HUB_ID

FOLDFED = [sys.executable, "-m", "foldfed.cli"]
# The process that holds the federation's process group open: it ignores the stop signals
# and lives until the final SIGKILL, or until its parent is gone (it cannot be orphaned:
# a signal may interrupt the orchestrator between starting it and recording it).
_ANCHOR = (
    "import os, signal, sys, time\n"
    "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent: time.sleep(0.5)\n"
)
# A stopped federation waits this long for its services (each promises SHUTDOWN_BOUND_S
# after SIGTERM), then SIGKILLs what is left.
STOP_GRACE_S = SHUTDOWN_BOUND_S + 2.0


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
        # Set by terminate()/stop(): no process starts any more, start-up waits give up.
        self._closing = threading.Event()
        # Held while a process starts, so that stop() sees every started process.
        self._spawning = threading.Lock()
        # The anchor of the federation's process group (its PID is the group's ID).
        self._anchor: subprocess.Popen[bytes] | None = None
        self._swept = False

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

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def keyring(self) -> Path:
        """Every member's public key and the hub's: what the hub checks manifests with and
        what `foldfed verify` checks the hub's state with."""
        return self.keys_dir / "consortium.keyring"

    def key_of(self, party: str) -> Path:
        return self.keys_dir / f"{party}.key"

    def provision_keys(self) -> None:
        """An Ed25519 key per participant and one for the hub, and the keyring of their
        public keys, beside the broker users (kept if there already: a restart signs with
        the same keys)."""
        if self.keyring.exists():
            return
        keys = [SigningKey.generate(p) for p in (*self.spec.participants, HUB_ID)]
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            write_private_key(self.key_of(key.name), key)
        write_keyring(self.keyring, Keyring(tuple(k.verify_key() for k in keys), 1))

    def hub_env(self) -> dict[str, str]:
        self.provision_keys()
        return {
            **env_for(signing_key=self.key_of(HUB_ID), member_keys=self.keyring),
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
        self.provision_keys()
        return {
            # The keyring too: under secure aggregation the pairwise mask keys come from it.
            **env_for(signing_key=self.key_of(participant), member_keys=self.keyring),
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
        with self._spawning:
            if self._closing.is_set():
                raise FoldfedError(f"not starting {name}: the federation is stopping")
            group = self._group()
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [*FOLDFED, *args],
                    env=full_env,
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    process_group=group,  # the federation's group, not the terminal's
                )
            process = Process(name, proc, log_path)
            self.processes[name] = process
        return process

    def _group(self) -> int:
        """The federation's process group, its anchor started on first use."""
        if self._anchor is None:
            self._anchor = subprocess.Popen(
                [sys.executable, "-S", "-c", _ANCHOR, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0,  # a new group, whose ID is the anchor's PID
            )
        return self._anchor.pid

    @property
    def process_group(self) -> int | None:
        """The ID of the group every process of the federation is in (None before the
        first start)."""
        return None if self._anchor is None else self._anchor.pid

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
            if self._closing.is_set():
                raise FoldfedError(f"stopped while waiting for {name}")
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

    def terminate(self) -> None:
        """SIGTERM to every process of the federation, and no more starts; returns at once.
        Safe in a signal handler (no lock, no wait): `stop()` finishes the job."""
        self._closing.set()
        self._signal_group(signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to every process, up to `grace` s for them to exit, SIGKILL to whatever
        is left in the group, then the broker if it is ours. Safe to call twice."""
        self._closing.set()
        with self._spawning:  # a start in progress finishes first, and is seen below
            processes = list(self.processes.values())
        self._signal_group(signal.SIGTERM)
        for process in processes:  # started before the group existed? (never, but cheap)
            if process.alive():
                process.proc.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait(10)
        self._sweep()
        if self._own_broker:
            self.broker.stop()

    def _signal_group(self, sig: signal.Signals) -> None:
        group = self.process_group
        if group is None or self._swept:
            return  # after the sweep the ID may belong to someone else
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _sweep(self) -> None:
        """SIGKILL to the whole group (the anchor, and anything that escaped the records),
        then reap the anchor: only then may its PID, the group's ID, be reused."""
        if self._anchor is None or self._swept:
            return
        self._signal_group(signal.SIGKILL)
        self._anchor.wait(10)
        self._swept = True


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

"""Shared machinery for the deployment tests: run the containers that compose.yaml or the
rendered Kubernetes objects describe as local processes, with exactly their command and
environment, against the session's real broker.

Only three things are rewritten, each the way a container runtime would provide it: the
host:port of another service in a URL (the broker becomes the session broker; any other
service, e.g. Jaeger, a local port nothing listens on), paths under a mount target (mapped
to a temporary folder standing for the volume, or to the repository for a bind mount of
its files), and per-container ports (FOLDFED_HEALTH_PORT, FOLDFED_MONITOR_PORT: every
container has its own network namespace, these processes share one).

This module holds no tests itself; test_deploy_compose.py and test_deploy_k8s.py use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from foldfed.demo.observer import Observer, RunRecord

REPO = Path(__file__).resolve().parent.parent
FOLDFED = [sys.executable, "-m", "foldfed.cli"]
# Ports of other containers' services a URL may name.
PER_CONTAINER_PORTS = ("FOLDFED_HEALTH_PORT", "FOLDFED_MONITOR_PORT")


def dockerfile_entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form): a container's argv is this + its command."""
    for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            value = json.loads(line.removeprefix("ENTRYPOINT "))
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("deploy/Dockerfile has no ENTRYPOINT")


def dockerfile_env() -> dict[str, str]:
    """The image's ENV settings (PATH and HOME aside: this machine's interpreter runs)."""
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in line.removeprefix("ENV ").split():
                key, _, value = pair.partition("=")
                env[key] = value
    env.pop("PATH"), env.pop("HOME")
    return env


def variables_the_code_reads() -> set[str]:
    """Every FOLDFED_* name spelled in the package (settings are read by literal name)."""
    names: set[str] = set()
    for path in (REPO / "services" / "foldfed").rglob("*.py"):
        names.update(re.findall(r"FOLDFED_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return names


# The signing keys (issue 14): `foldfed demo` hands them to every process it starts; the
# deployment files give a party's private key and the keyring only to the processes the
# settings registry says read them (least privilege). `expected_env` applies that rule.
KEY_VARIABLES = {"FOLDFED_MEMBER_KEYS", "FOLDFED_SIGNING_KEY"}
# The roles a service's process plays: the aggregator runs the ingest too.
PROCESS_ROLES = {"aggregator": {"aggregator", "ingest"}}


def roles_reading(variable: str) -> set[str]:
    """The roles the settings registry says read `variable`."""
    from foldfed.settings.registry import Settings

    for f in Settings.model_fields.values():
        if f.validation_alias == variable:
            extra = f.json_schema_extra
            assert isinstance(extra, dict) and isinstance(extra["roles"], list)
            return {str(r) for r in extra["roles"]}
    raise AssertionError(f"{variable} is not in the settings registry")


def expected_env(demo: set[str], service: str) -> tuple[set[str], set[str]]:
    """(what a deployed `foldfed <service>` must be given, what it must not): the demo's
    variables, the key variables only where the registry's roles read them."""
    roles = PROCESS_ROLES.get(service, {service})
    kept = {k for k in KEY_VARIABLES if roles & roles_reading(k)}
    return demo - (KEY_VARIABLES - kept), KEY_VARIABLES - kept


def demo_env_keys(tmp: Path) -> tuple[set[str], set[str]]:
    """The variables `foldfed demo` gives (hub process, participant process)."""
    from foldfed.demo.cluster import FederationSpec, LocalFederation

    spec = FederationSpec(("p-a", "p-b"), 2, tmp, common_env={"FOLDFED_SEED": "0"})
    federation = LocalFederation(spec)
    federation.admin_url = "amqp://admin:pw@127.0.0.1:5672/"
    federation.passwords = {"p-a": "x", "p-b": "y"}
    return set(federation.hub_env()), set(federation.participant_env("p-a"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def monitor_available() -> bool:
    """Is `foldfed monitor` (written concurrently by another helper) there yet?"""
    done = subprocess.run(
        [*FOLDFED, "monitor", "--help"], capture_output=True, timeout=120, check=False
    )
    return done.returncode == 0


@dataclass
class Container:
    """One container as a process: argv after the entry point, env, mounts."""

    name: str
    args: list[str]
    env: dict[str, str]
    # (source folder on this machine, target path in the container)
    mounts: list[tuple[Path, str]] = field(default_factory=list)
    health_cmd: list[str] | None = None

    def localize(self, hosts: Mapping[str, tuple[str, int]], service: bool = True) -> Container:
        """The container's view rewritten for this machine (see the module docstring).
        For a `service` (not a one-shot), every path in its settings must be on a volume."""
        env = {k: _rewrite(v, self.mounts, hosts) for k, v in self.env.items()}
        for key, value in env.items() if service else ():
            # A container path left unmapped is on the image's (read-only) root filesystem.
            assert not (value.startswith("/") and value == self.env[key]), (
                f"{self.name}: {key}={value} is on no volume (read-only root filesystem)"
            )
        for key in PER_CONTAINER_PORTS:
            if key in env:
                env[key] = str(free_port())
        if "FOLDFED_HEALTH_PORT" in env:
            env["FOLDFED_HEALTH_HOST"] = "127.0.0.1"
        args = [_rewrite(a, self.mounts, hosts) for a in self.args]
        health = [_rewrite(a, self.mounts, hosts) for a in self.health_cmd or []] or None
        return Container(self.name, args, env, self.mounts, health)


def _rewrite(value: str, mounts: list[tuple[Path, str]], hosts: Mapping[str, tuple[str, int]]):
    for target_host, (host, port) in hosts.items():
        value = re.sub(rf"(?<=[@/]){re.escape(target_host)}:\d+(?=[/?]|$)", f"{host}:{port}", value)
    for source, target in sorted(mounts, key=lambda m: -len(m[1])):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(source) + value[len(target.rstrip("/")) :]
        value = value.replace(f"={target}/", f"={source}/")  # e.g. ?cafile=/etc/...
    return value


def base_env() -> dict[str, str]:
    """What a container starts with besides its own settings: no FOLDFED_* from here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOLDFED_", "OTEL_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


class Processes:
    """Containers running as local processes; `stop()` SIGTERMs them all, safe twice."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, tuple[Container, subprocess.Popen[bytes]]] = {}

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run_once(self, c: Container, timeout: float = 180) -> str:
        done = subprocess.run(
            [*FOLDFED, *c.args],
            env={**base_env(), **c.env},
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        out = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, f"{c.name} {c.args} exited {done.returncode}:\n{out}"
        return out

    def run_together(self, containers: list[Container], timeout: float = 180) -> None:
        """One-shots that wait for each other (the parties' signing-key steps), as the
        runtime starts them: all at once; each must exit 0 (the others are killed if one
        does not)."""
        for c in containers:
            self.start(c)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        try:
            for c in containers:
                proc = self.running[c.name][1]
                try:
                    codes[c.name] = proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    codes[c.name] = None
                    break
        finally:
            for c in containers:
                _, proc = self.running.pop(c.name)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        for c in containers:
            assert codes.get(c.name) == 0, (
                f"{c.name} {c.args} exited {codes.get(c.name)}:\n{self.log(c.name)}"
            )

    def start(self, c: Container) -> None:
        with open(self.logs / f"{c.name}.log", "ab") as log:
            proc = subprocess.Popen(
                [*FOLDFED, *c.args],
                env={**base_env(), **c.env},
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.running[c.name] = (c, proc)

    def check_alive(self) -> None:
        for name, (_, proc) in self.running.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"

    def wait_healthy(self, name: str, timeout: float = 120) -> None:
        """Poll the container's own health command until it exits 0."""
        c, _ = self.running[name]
        assert c.health_cmd, f"{name} has no health check"
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            done = subprocess.run(
                [*FOLDFED, *c.health_cmd],
                env={**base_env(), **c.env},
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"{name} not healthy within {timeout} s: {done.stdout!r}\n{self.log(name)}"
            )
            time.sleep(0.5)

    def readyz(self, name: str) -> tuple[int, dict[str, object]]:
        c, _ = self.running[name]
        url = f"http://127.0.0.1:{c.env['FOLDFED_HEALTH_PORT']}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> dict[str, int]:
        for _, proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()
        codes = {}
        for name, (_, proc) in self.running.items():
            try:
                codes[name] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
        return codes


async def watch_cycle(
    admin_url: str,
    record: RunRecord,
    processes: Processes,
    start: Callable[[], None],
    timeout_s: float = 420,
) -> None:
    """Listen to the events, then `start()` the services (in a thread), then follow the
    events until the cycle is done and every final model is reported."""
    observer = Observer(admin_url, record)
    await observer.start()
    try:
        await asyncio.to_thread(start)
        deadline = time.monotonic() + timeout_s
        while not record.finished():
            processes.check_alive()
            assert time.monotonic() < deadline, f"cycle not done within {timeout_s} s"
            try:
                await asyncio.wait_for(observer.updates.get(), 1.0)
            except TimeoutError:
                continue
    finally:
        await observer.close()


def assert_cycle_complete(record: RunRecord, participants: tuple[str, ...], steps: int) -> None:
    """Every participant delivered every step, every step was finalized, and every
    participant ends on the hub's model."""
    for step in range(1, steps + 1):
        entry = record.step(step)
        assert entry.finalized_at is not None, f"step {step} not finalized"
        for p in participants:
            assert entry.of(p).delivered_at is not None, f"{p} did not deliver step {step}"
    final = {p: record.reports[(steps + 1, p)].model_digest for p in participants}
    assert len(set(final.values())) == 1, final
    assert set(final.values()) == {record.expected_models[steps + 1]}
    assert not record.mismatches, record.mismatches


def import_definitions(broker: object, path: Path) -> None:
    """Load a definitions file into the session broker (the compose/k8s broker loads it
    at boot with load_definitions; import_definitions runs the same importer)."""
    ctl = broker.broker.rabbitmqctl  # type: ignore[attr-defined]
    ctl("import_definitions", str(path))


def assert_hub_state_verifies(processes: Processes, aggregator: Container) -> None:
    """The cycle was signed with the provisioned keys: `foldfed verify` checks the
    aggregator's state folder (member signatures, the hub's step records, the sums) with
    the keyring the aggregator was given."""
    env = aggregator.env
    out = processes.run_once(
        Container(
            "verify",
            ["verify", env["FOLDFED_STATE_DIR"], "--keyring", env["FOLDFED_MEMBER_KEYS"]],
            {},
        )
    )
    print(out)

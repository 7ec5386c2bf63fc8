"""compose.yaml's start-up, gated by its health checks, with podman-compose and podman 4.3.

podman-compose turns each compose service into its podman container (image, command,
env files, volumes, network, read-only root, capabilities, tmpfs, init, restart). What
it cannot do with Debian's podman 4.3 is gate start-up: it ignores `service_healthy`
below podman 4.6 (it needs `podman wait --condition=healthy`), and podman 4.3 runs health
checks from systemd timers, which a machine without systemd does not have. So this script
starts the services one by one in `depends_on` order (`podman-compose up -d --no-deps`),
and before each one waits for what its `depends_on` says, the way compose would:

    service_started                 nothing more
    service_completed_successfully  `podman wait`: the one-shot must exit 0
    service_healthy                 the service's own healthcheck, run by
                                    `podman healthcheck run` until it passes, within
                                    start_period + retries * interval

Names are not looked up in DNS. Debian's aardvark-dns 1.4, podman's DNS server, tears
down and reopens its sockets each time any container on the machine starts or stops
(containers/aardvark-dns#389): a query in flight is lost, and the lookup takes 10 s (the
resolver's 5 s timeout, once for each nameserver), twice the 5 s of a service's /readyz
broker check. So this script makes the project's network itself, before podman-compose
would, with DNS off (`podman network create --disable-dns`), gives every networked
service of the profile a fixed address in its subnet (`--ip`, kept across restarts), and
writes them all into each container's /etc/hosts (`--add-host SERVICE:IP`); both are
passed to podman-compose's `podman create` (`--podman-run-args`). Docker's own DNS is
not affected: compose.yaml does not change.

Services listed with --without are not started and count as satisfied (jaeger and
prometheus, whose images no registry can provide here: the services tolerate a missing
OTLP collector). On podman >= 4.6 with systemd, `podman-compose --profile all up -d`
gates start-up itself and this script is not needed.

    python3 deploy/podman/up.py -p PROJECT [--profile all] [--without S,...] SERVICE...
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
POLL_S = 2.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# The first address given to a service in the project's subnet; below it: the gateway
# (.1) and addresses podman would hand out to a container started by other means.
FIRST_HOST = 10


class StartError(RuntimeError):
    """A service did not start as its depends_on requires; the message holds its logs."""


def seconds(duration: str | None, default: float) -> float:
    """A compose duration ("1m30s", "10s") in seconds."""
    if not duration:
        return default
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(duration))


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of podman and podman-compose: this repository's containers.conf
    unless one is given, plus compose's interpolation variables (`extra`)."""
    env = {**os.environ, **(extra or {})}
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def start_order(services: dict[str, Any], wanted: list[str], without: set[str]) -> list[str]:
    """`wanted` and everything they depend on (but `without`), dependencies first, ties by
    name: the order compose's dependency graph allows."""
    names: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in names or name in without:
            continue
        names.add(name)
        todo.extend(services[name].get("depends_on", {}))
    order: list[str] = []
    while len(order) < len(names):
        ready = sorted(
            n
            for n in names - set(order)
            if all(d in order or d not in names for d in services[n].get("depends_on", {}))
        )
        if not ready:
            raise StartError(f"depends_on cycle among {sorted(names - set(order))}")
        order.extend(ready)
    return order


def networked_services(services: dict[str, Any], profile: str) -> list[str]:
    """The services of `profile` on the project's network (no `network_mode`), by name:
    the same list on every call, so each keeps its address whatever is started."""
    return sorted(
        name
        for name, service in services.items()
        if "network_mode" not in service
        and (not service.get("profiles") or profile in service["profiles"])
    )


def fixed_addresses(subnet: str, names: list[str]) -> dict[str, str]:
    """One address per name in `subnet`, from its FIRST_HOST-th address on, in order."""
    network = ipaddress.ip_network(subnet)
    if FIRST_HOST + len(names) >= network.num_addresses - 1:
        raise StartError(f"{len(names)} services do not fit in {subnet}")
    return {n: str(network.network_address + FIRST_HOST + i) for i, n in enumerate(names)}


def create_args(service: str, addresses: dict[str, str], without: set[str]) -> list[str]:
    """`podman create` options of a service on the project's network: its own address and
    a hosts entry for every other service that runs (not `without`: a name of a service
    that never starts stays unknown, as it would in DNS)."""
    args = ["--ip", addresses[service]]
    for name, address in sorted(addresses.items()):
        if name != service and name not in without:
            args += ["--add-host", f"{name}:{address}"]
    return args


class Project:
    """One podman-compose project: its containers are found by compose's labels."""

    def __init__(
        self,
        name: str,
        profile: str = "all",
        compose: Path = COMPOSE,
        variables: dict[str, str] | None = None,
    ) -> None:
        self.name, self.profile, self.compose = name, profile, compose
        self.env = podman_env(variables)

    def compose_cmd(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "podman_compose", "--in-pod", "false",
            "-f", str(self.compose), "-p", self.name, "--profile", self.profile, *args,
        ]  # fmt: skip

    @property
    def network(self) -> str:
        """podman-compose's name of the project's default network."""
        return f"{self.name}_default"

    def ensure_network(self) -> str:
        """The project's network, made without DNS unless it exists; returns its subnet."""
        exists = subprocess.run(["podman", "network", "exists", self.network], env=self.env)
        if exists.returncode != 0:
            # podman-compose's labels, so the project's clean-up finds it as its own.
            labels = ["--label", f"io.podman.compose.project={self.name}"]
            labels += ["--label", f"com.docker.compose.project={self.name}"]
            create = ["podman", "network", "create", "--disable-dns", *labels, self.network]
            subprocess.run(create, env=self.env, capture_output=True, check=True)
        inspect = "{{.DNSEnabled}} {{json .Subnets}}"
        found = subprocess.run(
            ["podman", "network", "inspect", "--format", inspect, self.network],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split(" ", 1)
        if found[0] == "true":
            raise StartError(f"{self.network} exists with DNS on: remove it (podman network rm)")
        return str(json.loads(found[1])[0]["subnet"])

    def up(self, service: str, create_args: list[str] | None = None) -> None:
        # podman 4.3 logs that it cannot add systemd health timers: expected, and why the
        # health checks are run from here; its output is shown only on failure.
        extra = [f"--podman-run-args={shlex.join(create_args)}"] if create_args else []
        done = subprocess.run(
            [*self.compose_cmd(*extra), "up", "-d", "--no-deps", "--no-build", service],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise StartError(f"{service}: podman-compose up failed:\n{done.stdout}{done.stderr}")

    def container(self, service: str) -> str:
        out = subprocess.run(
            [
                "podman",
                "ps",
                "-a",
                "--format",
                "{{.Names}}",
                "--filter",
                f"label=io.podman.compose.project={self.name}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if len(out) != 1:
            raise StartError(f"{service}: expected one container, found {out}")
        return out[0]

    def wait_completed(self, service: str, timeout_s: float) -> None:
        done = subprocess.run(
            ["podman", "wait", self.container(service)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        code = int(done.stdout.strip() or "-1")
        if code != 0:
            raise StartError(f"{service} exited with {code}: {self.logs(service)}")

    def wait_healthy(self, service: str, check: dict[str, Any]) -> None:
        deadline = time.monotonic() + seconds(check.get("start_period"), 0.0)
        deadline += seconds(check.get("interval"), 30.0) * int(check.get("retries", 3))
        name = self.container(service)
        while True:
            done = subprocess.run(
                ["podman", "healthcheck", "run", name],
                env=self.env,
                capture_output=True,
                timeout=seconds(check.get("timeout"), 30.0) + 10,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise StartError(f"{service} never became healthy: {self.logs(service)}")
            time.sleep(POLL_S)

    def logs(self, service: str) -> str:
        done = subprocess.run(
            ["podman", "logs", "--tail", "40", self.container(service)],
            env=self.env,
            capture_output=True,
            text=True,
        )
        return done.stdout + done.stderr


def up(project: Project, wanted: list[str], without: set[str], timeout_s: float) -> list[str]:
    """Start `wanted` (and their dependencies) gated as compose would; returns the order."""
    services = yaml.safe_load(project.compose.read_text())["services"]
    order = start_order(services, wanted, without)
    subnet = project.ensure_network()
    addresses = fixed_addresses(subnet, networked_services(services, project.profile))
    started: set[str] = set()
    for name in order:
        for dep, rule in services[name].get("depends_on", {}).items():
            if dep in without:
                continue
            if rule["condition"] == "service_completed_successfully":
                project.wait_completed(dep, timeout_s)
            elif rule["condition"] == "service_healthy":
                project.wait_healthy(dep, services[dep]["healthcheck"])
        if name not in started:
            print(f"starting {name}", flush=True)
            networked = name in addresses
            project.up(name, create_args(name, addresses, without) if networked else None)
            started.add(name)
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", "--project", required=True)
    parser.add_argument("--profile", default="all")
    parser.add_argument("--without", default="", help="services not to start, comma-separated")
    parser.add_argument("--timeout", type=float, default=600.0, help="per one-shot, seconds")
    parser.add_argument("services", nargs="+")
    args = parser.parse_args(argv)
    without = {s for s in args.without.split(",") if s}
    up(Project(args.project, args.profile), args.services, without, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A private local RabbitMQ cluster: N `LocalBroker` nodes on this machine, joined into one
cluster, for tests, demos and load tests of replicated (quorum) queues.

    data_dir/
      cluster.json        the number of nodes and the cluster's epmd port (a restart reuses
                          them: each node's mnesia remembers its peers by node name).
      .erlang.cookie      the cluster's cookie, copied into every node's folder (HOME).
      admin-password      the cluster's admin password, copied likewise: after joining, a node
                          has the cluster's users, so every node's admin URL must carry it.
      epmd.pid            the one epmd every node registers with.
      node-1/ ... node-N/ each a `LocalBroker` data_dir (own ports, node name, logs, PIDs).

One epmd for all: an Erlang node finds a peer through the epmd of the peer's host, and every
node here runs on one host, so nodes registered with different private epmds could never
meet. Node 1 is the seed the others join (`rabbitmqctl join_cluster`).

Nodes start concurrently: after a restart a node that was not the last to stop waits for
its peers before it accepts AMQP, so starting them one by one would wait for ever.
Stopping is by PID, as for one node; `stop` also ends the epmd.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from foldfed.errors import BrokerError
from foldfed.localbroker.datadir import (
    admin_password,
    ensure_cookie,
    load_ports,
    locked,
    write_private,
    write_text,
)
from foldfed.localbroker.install import ensure_rabbitmq_installed, find_epmd
from foldfed.localbroker.lifecycle import BrokerStatus, LocalBroker
from foldfed.localbroker.netprobe import HOST, can_connect, free_ports, port_free
from foldfed.localbroker.nodeconfig import MARK_ENV
from foldfed.localbroker.processes import BrokerProcesses

__all__ = [
    "ClusterStatus",
    "LocalCluster",
    "cluster_members",
    "is_cluster_dir",
    "node_name",
    "running_nodes",
]

LAYOUT = "cluster.json"
_SHARED = (".erlang.cookie", "admin-password")


def is_cluster_dir(data_dir: Path) -> bool:
    """Whether `data_dir` holds a local cluster (rather than one node, or nothing yet)."""
    return (Path(data_dir) / LAYOUT).is_file()


@dataclass(frozen=True)
class ClusterStatus:
    """Each node's status, node 1 first; `members`: the node names the seed node sees
    running in its cluster (empty when the seed is down)."""

    nodes: tuple[BrokerStatus, ...]
    members: tuple[str, ...]

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)


class LocalCluster:
    """`nodes` private RabbitMQ nodes, clustered, whose whole state lives in `data_dir`."""

    def __init__(self, data_dir: Path, nodes: int = 3) -> None:
        if nodes < 1:
            raise BrokerError(f"a cluster needs at least one node, not {nodes}")
        self._dir = Path(data_dir).expanduser().resolve()
        stored = self._load_layout()
        if stored is not None and stored[0] != nodes:
            raise BrokerError(
                f"{self._dir} holds a cluster of {stored[0]} nodes, not {nodes}: "
                "use another folder, or delete this one"
            )
        self._count = nodes
        self._procs = BrokerProcesses(self._dir)

    @classmethod
    def open(cls, data_dir: Path) -> LocalCluster:
        """The cluster already laid out in `data_dir` (as many nodes as it was made with)."""
        raw = cls._read_layout(Path(data_dir).expanduser().resolve())
        if raw is None:
            raise BrokerError(f"{data_dir} holds no local cluster")
        return cls(data_dir, raw[0])

    @property
    def data_dir(self) -> Path:
        return self._dir

    def node(self, index: int) -> LocalBroker:
        """Node `index` (1-based; node 1 is the seed)."""
        if not 1 <= index <= self._count:
            raise BrokerError(f"no node {index} in a cluster of {self._count}")
        layout = self._load_layout()
        epmd_port = layout[1] if layout else None
        return LocalBroker(self._node_dir(index), epmd_port=epmd_port, cluster_node=True)

    def nodes(self) -> list[LocalBroker]:
        return [self.node(i) for i in range(1, self._count + 1)]

    @property
    def amqp_urls(self) -> list[str]:
        """Every node's admin URL, node 1 first (one cluster: any of them reaches every
        queue)."""
        return [node.amqp_url for node in self.nodes()]

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 120.0) -> list[str]:
        """Start every node (or find them running), join them into one cluster, and return
        their admin URLs. Bounded by `timeout`; on failure everything is killed and the
        BrokerError names the node and carries the end of its logs."""
        ensure_rabbitmq_installed()
        deadline = time.monotonic() + timeout
        with locked(self._dir, timeout):
            epmd_port = self._prepare()
            try:
                self._start_epmd(epmd_port, deadline)
                nodes = self.nodes()
                self._start_nodes(nodes, deadline)
                self._join(nodes, deadline)
            except BaseException:
                with contextlib.suppress(BrokerError):
                    self._kill_locked()
                raise
        return self.amqp_urls

    def status(self) -> ClusterStatus:
        nodes = tuple(node.status() for node in self.nodes())
        members: tuple[str, ...] = ()
        if nodes[0].running:
            with contextlib.suppress(BrokerError):
                members = tuple(sorted(running_nodes(self.node(1))))
        return ClusterStatus(nodes=nodes, members=members)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node gracefully (the seed last), then the epmd. Idempotent."""
        with locked(self._dir, timeout * (self._count + 1)):
            for node in reversed(self.nodes()):
                node.stop(timeout)
            self._procs.kill_all()

    def kill(self) -> None:
        """SIGKILL every node and the epmd, as in a crash of the whole machine."""
        with locked(self._dir, 30.0):
            self._kill_locked()

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (beam.smp first, then its helpers); the others and the epmd live
        on. `start()` brings it back into the cluster."""
        self.node(index).kill()

    # ---------------------------------------------------------------- internals

    def _node_dir(self, index: int) -> Path:
        return self._dir / f"node-{index}"

    @staticmethod
    def _read_layout(data_dir: Path) -> tuple[int, int] | None:
        try:
            raw = json.loads((data_dir / LAYOUT).read_text())
            return int(raw["nodes"]), int(raw["epmd_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load_layout(self) -> tuple[int, int] | None:
        return self._read_layout(self._dir)

    def _prepare(self) -> int:
        """Write cluster.json, the cookie and the admin password once, and copy the secrets
        into every node's folder; return the epmd port."""
        layout = self._load_layout()
        if layout is None:
            (epmd_port,) = free_ports(1)
            text = json.dumps({"nodes": self._count, "epmd_port": epmd_port}, indent=2)
            write_text(self._dir / LAYOUT, text + "\n")
        else:
            epmd_port = layout[1]
        ensure_cookie(self._dir)
        admin_password(self._dir, create=True)
        for index in range(1, self._count + 1):
            node_dir = self._node_dir(index)
            node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in _SHARED:
                write_private(node_dir / name, (self._dir / name).read_text())
        return epmd_port

    def _start_epmd(self, epmd_port: int, deadline: float) -> None:
        if self._procs.epmd_alive() and can_connect(epmd_port, 0.5):
            return
        self._procs.kill_all()  # a half-dead leftover
        epmd = find_epmd()
        if epmd is None:
            raise BrokerError("epmd not found although RabbitMQ is installed")
        if not port_free(epmd_port):
            raise BrokerError(
                f"epmd_port {epmd_port} on {HOST} is in use; the cluster in {self._dir} "
                f"cannot start (stop whatever holds it, or edit {LAYOUT})"
            )
        env = {MARK_ENV: str(self._dir), "HOME": str(self._dir), "PATH": "/usr/bin:/bin"}
        out = self._dir / "epmd.out"
        pid = self._procs.spawn([epmd, "-port", str(epmd_port), "-address", HOST], env, out)
        write_text(self._dir / "epmd.pid", f"{pid}\n")
        while not can_connect(epmd_port, 0.5):
            if not self._procs.live(pid) or time.monotonic() > deadline:
                raise BrokerError(f"the cluster's epmd on port {epmd_port} did not come up")
            time.sleep(0.02)

    def _start_nodes(self, nodes: list[LocalBroker], deadline: float) -> None:
        remaining = max(1.0, deadline - time.monotonic())
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            futures = [pool.submit(node.start, remaining) for node in nodes]
        errors = [f"node-{i}: {f.exception()}" for i, f in enumerate(futures, 1) if f.exception()]
        if errors:
            raise BrokerError("the cluster did not start:\n" + "\n".join(errors))

    def _join(self, nodes: list[LocalBroker], deadline: float) -> None:
        """Join every node that is not yet a member to the seed, then wait (bounded) until
        the seed sees all of them running."""
        seed = nodes[0]
        seed_name = node_name(seed)
        for node in nodes[1:]:
            if seed_name in cluster_members(node):
                continue
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("reset")
            node.rabbitmqctl("join_cluster", seed_name)
            node.rabbitmqctl("start_app")
        wanted = {node_name(node) for node in nodes}
        while (seen := running_nodes(seed)) != wanted:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the cluster did not form: {sorted(seen)} running, {sorted(wanted)} wanted"
                )
            time.sleep(0.2)

    def _kill_locked(self) -> None:
        for node in self.nodes():
            node.kill()
        self._procs.kill_all()

    def __repr__(self) -> str:
        return f"LocalCluster({str(self._dir)!r}, nodes={self._count})"


def node_name(node: LocalBroker) -> str:
    """The Erlang node name (`foldfed-<port>@localhost`), from the node's ports.json."""
    state = load_ports(node.data_dir)
    if state is None:
        raise BrokerError(f"node in {node.data_dir} was never started")
    return state.nodename


def _cluster_status(node: LocalBroker) -> dict[str, list[str]]:
    return json.loads(node.rabbitmqctl("cluster_status", "--formatter", "json"))


def cluster_members(node: LocalBroker) -> set[str]:
    """The node names `node` counts as members of its cluster (itself included)."""
    return set(_cluster_status(node).get("disk_nodes", []))


def running_nodes(node: LocalBroker) -> set[str]:
    """The members `node` sees running now."""
    return set(_cluster_status(node).get("running_nodes", []))

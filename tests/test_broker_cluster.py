"""A private 3-node RabbitMQ cluster (`foldfed broker start --nodes 3`) with the hub's queues
as quorum queues: the cluster forms, a whole federation on it gives the exact FedAvg model
(the digest a classic single node gives), and SIGKILL of a node mid-upload loses nothing.

The node killed is never the one the clients use (the bus takes one URL): node 3, where the
hub's queue leaders are placed by declaring the topology through it (quorum leaders go to
the declaring client's node), so the kill forces a leader election under load.

All of it is a long scenario (marker `long`, `make test-long`): three nodes take one to two
minutes to form here. `make test` keeps the cluster's configuration tests
(test_broker_cluster_config.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from test_federation import STEPS, direct_fedavg, final_digests

from foldfed import topology
from foldfed.bus import Bus
from foldfed.config import BusSettings
from foldfed.credentials import new_password
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _watch
from foldfed.demo.observer import RunRecord
from foldfed.errors import BrokerError
from foldfed.localbroker import ensure_rabbitmq_installed
from foldfed.localbroker.cluster import LocalCluster, is_cluster_dir, node_name, running_nodes

from conftest import FOLDFED, PARTICIPANTS, reset_topology

# Long scenarios (make test-long): three nodes take 1-2 minutes to form here.
pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.long]

NODES = 3
KILLED = 3  # the node that dies; the clients use node 1
QUORUM = {"FOLDFED_QUEUE_TYPE": "quorum"}


@dataclass
class ClusterHandle:
    cluster: LocalCluster
    passwords: dict[str, str]

    def url(self, node: int) -> str:
        return self.cluster.node(node).amqp_url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    """Started and stopped through the CLI, as a user would."""
    ensure_rabbitmq_installed()
    folder = tmp_path_factory.mktemp("cluster")
    started = subprocess.run(
        [*FOLDFED, "broker", "start", "--nodes", str(NODES), "--dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    local = LocalCluster(folder, NODES)
    if started.returncode != 0:
        with contextlib.suppress(BrokerError):
            local.kill()
        pytest.skip(f"{NODES} RabbitMQ nodes could not start here: {started.stderr[-3000:]}")
    assert started.stdout.split() == local.amqp_urls
    passwords = {p: new_password() for p in PARTICIPANTS}
    for participant, password in passwords.items():
        local.node(1).add_participant(participant, password)
    try:
        yield ClusterHandle(local, passwords)
    finally:
        stopped = subprocess.run(
            [*FOLDFED, "broker", "stop", "--dir", str(folder)], timeout=300, check=False
        )
        assert stopped.returncode == 0
        assert not any(node.status().running for node in local.nodes())


def test_three_nodes_form_one_cluster(cluster: ClusterHandle) -> None:
    status = cluster.cluster.status()
    assert status.running
    names = {node_name(node) for node in cluster.cluster.nodes()}
    assert len(names) == NODES
    assert set(status.members) == names
    # Every node sees the same cluster, not only the seed.
    for node in cluster.cluster.nodes():
        assert running_nodes(node) == names
    assert is_cluster_dir(cluster.cluster.data_dir)


def test_cli_status_reports_every_node(cluster: ClusterHandle) -> None:
    out = subprocess.run(
        [*FOLDFED, "broker", "status", "--dir", str(cluster.cluster.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    status = json.loads(out.stdout)
    assert status["running"] is True
    assert len(status["nodes"]) == NODES
    assert len(status["members"]) == NODES


async def _declare_publish_and_kill(
    cluster: ClusterHandle, queue: str, bodies: list[bytes]
) -> float:
    """Declare a quorum queue through node 3 (its leader lands there), publish `bodies` with
    confirms, SIGKILL node 3 at once; return the seconds from declaration to the kill."""
    connection = await aio_pika.connect(cluster.url(KILLED))
    try:
        channel = await connection.channel(publisher_confirms=True)
        declared = time.monotonic()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue)
        await asyncio.to_thread(cluster.cluster.kill_node, KILLED)
        return time.monotonic() - declared
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)


async def _drain(url: str, queue: str, timeout: float) -> list[bytes]:
    """Every message of `queue` through `url`'s node, retrying while the queue elects a
    new leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url)
            async with connection:
                channel = await connection.channel()
                q = await channel.declare_queue(
                    queue, durable=True, arguments={"x-queue-type": "quorum"}
                )
                bodies = []
                while (message := await q.get(fail=False, timeout=10)) is not None:
                    bodies.append(message.body)
                    await message.ack()
                await q.delete(if_unused=False, if_empty=False)
                return bodies
        except (aio_pika.exceptions.AMQPError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def test_quorum_queue_keeps_confirmed_messages_when_its_leader_dies_after_declaration(
    cluster: ClusterHandle,
) -> None:
    """The 3.10 trap (docs/rabbitmq.md): a quorum queue on a single node lost confirmed
    messages when the node died within ~1 s of declaring it. On a cluster the followers
    hold every confirmed message (a confirm waits for a majority), so none is lost."""
    queue = "foldfed.probe.leader-death"
    # Small ones and one of our chunk size (4 MiB): large messages replicate too.
    bodies = [f"m{i}".encode() * 100 for i in range(200)] + [b"\x01" * (4 << 20)]
    killed_after = asyncio.run(_declare_publish_and_kill(cluster, queue, bodies))
    try:
        got = asyncio.run(_drain(cluster.url(1), queue, timeout=60))
    finally:
        cluster.cluster.start(timeout=180)  # node 3 rejoins
    assert killed_after < 5.0, f"the leader was killed {killed_after:.1f} s after declaration"
    assert got == bodies


async def _declare_hub_topology(url: str) -> None:
    settings = BusSettings(
        amqp_url=url, publish_timeout_s=30.0, inflight_window=8, queue_type="quorum"
    )
    bus = await Bus.connect(settings, "declare-via-node-3")
    try:
        await bus.declare_hub_topology(PARTICIPANTS)
    finally:
        await bus.close()


def _leaders(cluster: ClusterHandle) -> dict[str, str]:
    out = cluster.cluster.node(1).rabbitmqctl(
        "list_queues", "name", "type", "leader", "--formatter", "json"
    )
    return {q["name"]: q["leader"] for q in json.loads(out) if q.get("type") == "quorum"}


def run_on_cluster(
    cluster: ClusterHandle, workdir: Path, *, kill_mid_upload: bool
) -> tuple[LocalFederation, RunRecord, dict[str, object]]:
    """A whole run on quorum queues whose leaders sit on node 3, the clients on node 1.
    `kill_mid_upload`: SIGKILL node 3 once an upload of step 2 has started."""
    admin_url = cluster.url(1)
    asyncio.run(reset_topology(admin_url))
    asyncio.run(_declare_hub_topology(cluster.url(KILLED)))
    killed_name = node_name(cluster.cluster.node(KILLED))
    leaders = _leaders(cluster)
    assert leaders.get(topology.INGEST_QUEUE) == killed_name, leaders
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        common_env={
            "FOLDFED_SEED": "7",
            "FOLDFED_RETAIN_STEPS": "0",
            **QUORUM,
        },
        # The small model's delta (~20 KB) is one chunk: this member sends it slowly, so
        # that the kill lands between its manifest and its chunk, while the others' step-2
        # transfers run too.
        participant_env={PARTICIPANTS[0]: {"FOLDFED_RATE_LIMIT_BPS": "8192"}},
    )
    federation = LocalFederation(spec, broker=cluster.cluster.node(1), passwords=cluster.passwords)
    federation.start_broker()
    from foldfed.trainer.task import initial_model

    initial_model(federation.initial_model, 7)
    record = RunRecord(spec.participants, spec.steps)
    seen: dict[str, object] = {}
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_mid_upload, args=(cluster, federation, seen, stop), daemon=True
    )
    if kill_mid_upload:
        killer.start()
    try:
        asyncio.run(_watch(federation, record, timeout_s=240))
    finally:
        stop.set()
        if killer.is_alive():
            killer.join(30)
        federation.stop()
    return federation, record, seen


def _kill_mid_upload(
    cluster: ClusterHandle,
    federation: LocalFederation,
    seen: dict[str, object],
    stop: threading.Event,
) -> None:
    name = f"{PARTICIPANTS[0]}-uploader"
    while not stop.is_set():
        process = federation.processes.get(name)
        log = process.log() if process else ""
        if log.count("upload start") >= 2:
            seen["uploads_done_before_kill"] = log.count("upload done")
            seen["killed_at"] = time.monotonic()
            cluster.cluster.kill_node(KILLED)
            seen["killed"] = True
            return
        time.sleep(0.05)


def _assert_exact(federation: LocalFederation, record: RunRecord) -> None:
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert len(set(digests.values())) == 1, digests
    (digest,) = set(digests.values())
    assert digest == record.expected_models[STEPS + 1]
    # The model a classic single node gives (test_federation checks it against the same).
    assert digest == direct_fedavg(federation)
    assert not record.mismatches


@pytest.mark.long
def test_federation_on_quorum_queues_gives_the_exact_model(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    federation, record, _ = run_on_cluster(cluster, tmp_path, kill_mid_upload=False)
    _assert_exact(federation, record)


@pytest.mark.long
def test_sigkill_of_a_node_mid_upload_loses_nothing(cluster: ClusterHandle, tmp_path: Path) -> None:
    try:
        federation, record, seen = run_on_cluster(cluster, tmp_path, kill_mid_upload=True)
    finally:
        cluster.cluster.start(timeout=180)  # node 3 rejoins for any later test
    assert seen.get("killed"), "no upload of step 2 started: the node was never killed"
    # Killed while the slow participant's step-2 upload was running (its first was done).
    assert seen["uploads_done_before_kill"] == 1, seen
    _assert_exact(federation, record)

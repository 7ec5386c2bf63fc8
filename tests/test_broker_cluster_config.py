"""The pure parts of the local cluster: the hub's queue arguments per queue type, and the
Raft sizing a cluster node's config gets (docs/rabbitmq.md, section 9)."""

from __future__ import annotations

import pytest

from foldfed import topology
from foldfed.localbroker.nodeconfig import render_config


def test_classic_queue_arguments_are_those_declared_before() -> None:
    assert topology.queue_arguments("classic") == {"x-dead-letter-exchange": topology.DEAD_EXCHANGE}
    assert topology.queue_arguments("classic", dead_letter=False) == {}


def test_quorum_queue_arguments_add_only_the_type() -> None:
    assert topology.queue_arguments("quorum") == {
        "x-dead-letter-exchange": topology.DEAD_EXCHANGE,
        "x-queue-type": "quorum",
    }
    assert topology.queue_arguments("quorum", dead_letter=False) == {"x-queue-type": "quorum"}


def test_an_unknown_queue_type_is_refused() -> None:
    with pytest.raises(ValueError, match="stream"):
        topology.queue_arguments("stream")


def test_only_a_cluster_node_gets_the_raft_sizing() -> None:
    single = render_config(5672, "ab12")
    node = render_config(5672, "ab12", cluster_node=True)
    assert "raft." not in single
    assert "raft.segment_max_entries = 32\n" in node
    assert "raft.wal_max_size_bytes = 67108864\n" in node
    # Everything else is the same config.
    assert [line for line in node.splitlines() if not line.startswith("raft.")] == (
        single.splitlines()
    )

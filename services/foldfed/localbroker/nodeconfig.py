"""How a private node is configured: its `rabbitmq.conf` and the environment every process
of ours (epmd, the server, rabbitmqctl) gets. The limits written here are RabbitMQ facts the
rest of foldfed relies on; docs/rabbitmq.md records them with the numbers measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from foldfed.localbroker.datadir import Ports
from foldfed.localbroker.netprobe import HOST
from foldfed.settings import load, variable

__all__ = [
    "ADMIN_USER",
    "DISK_FREE_LIMIT_ENV",
    "MARK_ENV",
    "MAX_MESSAGE_SIZE",
    "disk_free_limit",
    "node_env",
    "render_config",
]

ADMIN_USER = "foldfed-admin"
# Free disk below which RabbitMQ blocks all publishers: its default, its units and why they
# are checked before RabbitMQ sees them are the settings registry's (foldfed/settings).
DISK_FREE_LIMIT_ENV = variable("broker_disk_free_limit")
# RabbitMQ's default, written out so the limit the code relies on is visible: a larger message
# is refused with PRECONDITION_FAILED and the channel is closed (docs/rabbitmq.md). Chunking
# keeps every message far below it.
MAX_MESSAGE_SIZE = 134_217_728

# Quorum queues keep their messages in a Raft log (Ra). RabbitMQ 3.10 cuts that log into
# segment files of a fixed number of entries (default 4096): with our 4 MiB chunks one
# segment could reach 16 GiB, and it is deleted only once every entry in it is consumed.
# 32 entries bound a segment to 128 MiB of chunks (docs/rabbitmq.md, "A local cluster").
RAFT_SEGMENT_MAX_ENTRIES = 32
# The Raft write-ahead log is rolled over (and its entries flushed to segments, leaving
# memory) at this size; the default 512 MiB per node is a lot of memory for three nodes on a
# laptop, and 64 MiB still holds 16 chunks.
RAFT_WAL_MAX_SIZE_BYTES = 64 << 20

# Every process we start carries MARK_ENV=<data_dir>; see `lifecycle` for why.
MARK_ENV = variable("localbroker_dir")


def disk_free_limit() -> str:
    """FOLDFED_BROKER_DISK_FREE_LIMIT, in RabbitMQ's own units: the registry refuses what
    RabbitMQ would only log (falling back to 50MB), which also keeps a newline, and so a
    setting of its own, out of the config file. A bad value: ConfigError naming it."""
    return load().broker_disk_free_limit


def render_config(port: int, password: str, *, cluster_node: bool = False) -> str:
    """rabbitmq.conf, rewritten on every start. `password` is the admin's, hex (no quoting).

    default_user/default_pass take effect only when the database is created; a restart keeps
    the users it has. Because default_user is set, RabbitMQ never creates `guest`.
    loopback_users = none: no user is restricted to loopback connections; harmless since the
    only listener is on 127.0.0.1, and it keeps working when a test reaches the broker through
    a forwarded port.

    `cluster_node`: a node of a local cluster, whose replicated (quorum) queues carry our
    chunks: the Raft log is sized for 4 MiB messages (RAFT_* above). A single node's config
    stays as it always was.
    """
    raft = [
        f"raft.segment_max_entries = {RAFT_SEGMENT_MAX_ENTRIES}",
        f"raft.wal_max_size_bytes = {RAFT_WAL_MAX_SIZE_BYTES}",
    ]
    return "\n".join(
        [
            "# Written by foldfed.localbroker on every start: edits are overwritten.",
            f"listeners.tcp.default = {HOST}:{port}",
            "loopback_users = none",
            "default_vhost = /",
            f"default_user = {ADMIN_USER}",
            f"default_pass = {password}",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            f"disk_free_limit.absolute = {disk_free_limit()}",
            "vm_memory_high_watermark.relative = 0.4",
            f"max_message_size = {MAX_MESSAGE_SIZE}",
            *(raft if cluster_node else []),
            "",
        ]
    )


def node_env(data_dir: Path, state: Ports) -> dict[str, str]:
    """The environment for epmd, the server and rabbitmqctl. Inherited RABBITMQ_* and ERL_*
    variables are dropped so a developer's shell settings cannot redirect the node.
    (docs/rabbitmq.md lists the variables that make a broker private.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    d = data_dir
    env.update(
        {
            MARK_ENV: str(d),
            "HOME": str(d),
            # rabbitmqctl (Elixir) warns and mangles non-ASCII output under a non-UTF-8 locale.
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_PORT": str(state.epmd_port),
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
            "RABBITMQ_NODENAME": state.nodename,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(state.port),
            "RABBITMQ_DIST_PORT": str(state.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "broker.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_MOTD_FILE": str(d / "motd"),
            # The distribution listener on loopback only (default: all interfaces).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # rabbitmqctl's own distribution port: any free one, instead of the fixed
            # 35672-35682 range shared by every CLI call on the machine.
            "RABBITMQ_CTL_DIST_PORT_MIN": "0",
            "RABBITMQ_CTL_DIST_PORT_MAX": "0",
        }
    )
    return env

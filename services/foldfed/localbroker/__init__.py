"""A private, real RabbitMQ for tests and the demo, with no root-owned state.

Why a real broker: no usable embedded AMQP 0-9-1 broker exists on PyPI (docs/rabbitmq.md),
and the behaviours foldfed depends on (durability across restarts, permissions, alarms, frame
limits) are exactly what fakes get wrong. So we run the distribution's `rabbitmq-server`, but
point every path it would otherwise take from /etc or /var/lib at one `data_dir` of ours:

    data_dir/
      ports.json          AMQP port, Erlang distribution port, epmd port, node name: a restart
                          reuses them, so durable queues (stored per node name) come back.
      rabbitmq.conf       rewritten on every start (see `nodeconfig.render_config`).
      rabbitmq-env.conf   empty: shadows /etc/rabbitmq/rabbitmq-env.conf, which would otherwise
                          be sourced by the start script and could rename the node.
      conf.d/             empty: shadows /etc/rabbitmq/conf.d.
      enabled_plugins     `[].`: no management plugin, faster start, fewer ports.
      admin-password      0600; the password of `foldfed-admin`.
      .erlang.cookie      0600; HOME=data_dir so the server and our rabbitmqctl share it.
      mnesia/  log/       the node's database and logs.
      broker.pid          written by RabbitMQ itself: the beam.smp PID (removed on clean exit).
      launcher.pid        the `rabbitmq-server` shell script that parents beam.smp.
      epmd.pid            our private epmd.
      server.out          stdout/stderr of the launcher (config errors show up only here).

The package, one concept per module:

    install      finding the real RabbitMQ scripts and epmd; apt-installing them when missing
    procfs       what Linux's /proc says about a process (alive, zombie, environment, argv)
    netprobe     loopback ports: free ones, busy ones, and an AMQP greeting
    datadir      what persists in data_dir between starts (ports, admin password, cookie)
    nodeconfig   how our node is configured: rabbitmq.conf and the environment of every process
    users        broker users through rabbitmqctl, with secrets that cannot be read as options
    lifecycle    `LocalBroker`: start, stop, kill, status and rabbitmqctl of one node
    cluster      `LocalCluster`: N nodes sharing one epmd, joined into one cluster

Linux only (reads /proc). Works as root: the Debian wrappers in /usr/sbin would `su rabbitmq`,
so we run the real scripts under /usr/lib/rabbitmq/bin, which do not care who runs them.
"""

from __future__ import annotations

from foldfed.localbroker.install import ensure_rabbitmq_installed
from foldfed.localbroker.lifecycle import BrokerStatus, LocalBroker
from foldfed.localbroker.nodeconfig import ADMIN_USER, DISK_FREE_LIMIT_ENV, MAX_MESSAGE_SIZE

__all__ = [
    "ADMIN_USER",
    "DISK_FREE_LIMIT_ENV",
    "MAX_MESSAGE_SIZE",
    "BrokerStatus",
    "LocalBroker",
    "ensure_rabbitmq_installed",
]

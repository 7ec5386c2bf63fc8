"""Names of every exchange and queue, and who may touch what.

Pure functions and constants: the single place a queue name is spelled. The table in
docs/format.md ("Queue topology") mirrors this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# Participants publish manifests, have-requests and chunks here (routing key "ingest").
HUB_EXCHANGE = "foldfed.hub"
INGEST_ROUTING_KEY = "ingest"
INGEST_QUEUE = "foldfed.hub.ingest"
# Hub-only control messages (StepReleased, FinalizeRequest) reach the aggregator here;
# participants have no write permission on it, so they cannot open or close steps.
CONTROL_EXCHANGE = "foldfed.control"
# The hub addresses one participant: routing key = participant id.
PARTICIPANT_EXCHANGE = "foldfed.participant"
# The hub addresses every participant with one publish (fan-out: one publish, N queues).
BROADCAST_EXCHANGE = "foldfed.broadcast"
# Events and heartbeats from every service (topic: "<service>.<kind>").
EVENTS_EXCHANGE = "foldfed.events"
# The barrier's queue: delivery receipts, finalize results and participants' model
# reports, from the events exchange under these routing keys.
BARRIER_QUEUE = "foldfed.hub.barrier"
RECEIPT_KEY = "ingest.receipt"
FINALIZED_KEY = "aggregator.finalized"
MODEL_REPORT_KEY = "participant.model"
BARRIER_KEYS = (RECEIPT_KEY, FINALIZED_KEY, MODEL_REPORT_KEY)
# Participants' signed readiness records (`foldfed gate check`); the barrier binds it to its
# queue only when cycles are gated (FOLDFED_GATED_CYCLES).
READINESS_KEY = "uploader.readiness"
# The monitor's queue: every message on the events exchange (events, receipts,
# finalizations, model reports, heartbeats). Hub-side: only the hub's user consumes it.
MONITOR_QUEUE = "foldfed.hub.monitor"
MONITOR_BINDING = "#"
# Heartbeats travel on the events exchange as "<service>.heartbeat": a participant's
# uploader publishes "uploader.heartbeat", which its topic permission already allows.
HEARTBEAT_KIND = "heartbeat"
# The hub's own name where a participant id is expected (the global update's manifest
# and chunks): never a valid participant.
HUB_ID = "hub"
# Rejected messages, with the reason in headers.
DEAD_EXCHANGE = "foldfed.dead"
DEAD_QUEUE = "foldfed.dead-letter"

# The hub's queue types (FOLDFED_QUEUE_TYPE): classic queues live on one node; quorum queues
# are replicated over a cluster's nodes (docs/rabbitmq.md, "A local cluster").
QUEUE_TYPES = ("classic", "quorum")


def queue_arguments(queue_type: str, *, dead_letter: bool = True) -> dict[str, str]:
    """The declare arguments of a hub queue. Classic gives exactly the arguments foldfed has
    always declared (RabbitMQ refuses a redeclare whose arguments differ), so a queue's type
    can only change on an empty broker. `dead_letter`: rejected messages go to DEAD_EXCHANGE
    (every hub queue but the dead-letter queue itself)."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type {queue_type!r}: expected one of {QUEUE_TYPES}")
    arguments = {"x-dead-letter-exchange": DEAD_EXCHANGE} if dead_letter else {}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


# Header names the hub sets on a dead-lettered message.
REASON_HEADER = "x-foldfed-reason"
ORIGINAL_TYPE_HEADER = "x-foldfed-original-type"
ORIGINAL_SENDER_HEADER = "x-foldfed-original-user"

# A participant id becomes a queue name, a user name and a file name: keep it boring.
_PARTICIPANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def is_valid_participant_id(participant: str) -> bool:
    return participant != HUB_ID and bool(_PARTICIPANT_ID.match(participant))


def heartbeat_key(service: str) -> str:
    """Routing key of a service's heartbeats on the events exchange."""
    return f"{service}.{HEARTBEAT_KIND}"


def participant_queue(participant: str) -> str:
    """The only queue a participant consumes from."""
    return f"foldfed.participant.{participant}"


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ permission regexes (configure, write, read) for one user on vhost /, and
    the routing keys it may publish under on the events (topic) exchange."""

    configure: str
    write: str
    read: str
    events_write_keys: str = ".*"


def participant_permissions(participant: str) -> Permissions:
    """Least privilege for a participant: declare nothing, publish only towards the hub
    and the events exchange, read only its own queue."""
    own_queue = re.escape(participant_queue(participant))
    return Permissions(
        configure="^$",
        write=f"^({re.escape(HUB_EXCHANGE)}|{re.escape(EVENTS_EXCHANGE)})$",
        read=f"^{own_queue}$",
        # Its model reports and its uploader's events only: the broker itself refuses a
        # participant's "ingest.receipt" or "aggregator.finalized" (topic authorisation),
        # before the barrier's own sender check would.
        events_write_keys=f"^({re.escape(MODEL_REPORT_KEY)}|uploader\\..+)$",
    )


def grant_event_topics(rabbitmqctl: Callable[..., str], user: str, perms: Permissions) -> None:
    """Restrict the routing keys `user` may publish under on the events exchange."""
    rabbitmqctl(
        "set_topic_permissions", "-p", "/", user, EVENTS_EXCHANGE, perms.events_write_keys, "^$"
    )

"""Whose word the monitor takes: which sender a message on foldfed.events is believed from.

RabbitMQ vouches for a message's `user_id` (it refuses one that is not the connection's
user), so the sender is known; `check_sender` decides whether that sender may say what the
message says. Pure: no I/O.
"""

from __future__ import annotations

from foldfed.domain import AnyMessage, DeliveryReceipt, Event, Heartbeat, ModelReport, StepFinalized

# Services that run at the hub, under the hub's broker user.
HUB_SERVICES = frozenset({"aggregator", "barrier", "ingest", "monitor"})


def check_sender(msg: AnyMessage, user_id: str | None, hub_user: str) -> str | None:
    """Why a message on the events exchange is not to be believed, or None if it is.

    RabbitMQ vouches for `user_id`. Participants may publish there (their uploader's events,
    heartbeats and model reports; topic permissions keep them to those keys), so a fact is
    believed only from whom it is about: hub facts (receipts, finalizations, releases,
    rejections, alerts) from the hub's user; a participant's events, heartbeats and reports
    only from that participant."""
    match msg:
        case DeliveryReceipt() | StepFinalized():
            if user_id != hub_user:
                return f"{type(msg).__name__} from {user_id!r}: only the hub says so"
            return None
        case Event() | Heartbeat() if msg.service in HUB_SERVICES:
            if user_id != hub_user:
                return f"{msg.service} event from {user_id!r}: only the hub sends those"
            return None
        case Event() | Heartbeat() | ModelReport():
            if user_id != msg.participant:
                return (
                    f"forged sender: {type(msg).__name__} claims participant "
                    f"{msg.participant!r} but was published by user {user_id!r}"
                )
            return None
    return f"{type(msg).__name__} does not belong on the events exchange"

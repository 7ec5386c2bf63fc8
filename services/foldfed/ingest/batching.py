"""Ingest's group commit, the decisions: how a batch of deliveries is cut into groups,
and in which order a group's messages are settled with the broker. Pure.

A batch is what the consumer gathered (up to the prefetch count, docs/amqp_client.md):
messages in delivery order. Consecutive chunks form one group, made durable together
(one fsync pass, one SQLite transaction: ingest/ledger.py); any other message (a
manifest, a have-request, a release, a finalize) is handled alone, after the group
before it is durable and acked, and before the next group is read. So the hub's order
holds as if one message at a time: a have-request is answered after the chunks its
sender published before it.

Settling a group. AMQP's `basic.ack(multiple=True)` acks every unacked delivery of the
channel up to and including its tag. So a rejected or failed message of the group is
settled on its own (dead-lettered with its reason, or requeued once) *before* the one
multiple-ack on the last durable message; that ack then covers exactly the durable ones.
A group with no durable message sends no multiple-ack at all.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

CHUNK_TYPE = "foldfed.v1.Chunk"


@dataclass(frozen=True)
class Group:
    """Positions [start, stop) of a batch; `chunks`: a run of chunk messages committed
    together, else one message handled alone."""

    start: int
    stop: int
    chunks: bool


def groups(types: Sequence[str]) -> list[Group]:
    """Cut a batch (its messages' types, in delivery order) into groups, in order."""
    out: list[Group] = []
    for position, type_name in enumerate(types):
        is_chunk = type_name == CHUNK_TYPE
        if is_chunk and out and out[-1].chunks and out[-1].stop == position:
            out[-1] = Group(out[-1].start, position + 1, True)
        else:
            out.append(Group(position, position + 1, is_chunk))
    return out


class Outcome(enum.Enum):
    DURABLE = "durable"  # verified, stored, recorded: acked by the group's multiple-ack
    REJECTED = "rejected"  # the sender's fault: dead-lettered with its reason
    FAILED = "failed"  # ours or the disk's: requeued once, then dead-lettered


@dataclass(frozen=True)
class Settlement:
    """`one_by_one`: positions to settle on their own, in order, first; then
    `ack_through`: the position whose ack(multiple=True) acks every durable message of
    the group (None: no durable message)."""

    one_by_one: tuple[int, ...]
    ack_through: int | None


def settlement(outcomes: Sequence[Outcome]) -> Settlement:
    """How to settle a group's messages, given each one's outcome in delivery order."""
    durable = [i for i, o in enumerate(outcomes) if o is Outcome.DURABLE]
    others = tuple(i for i, o in enumerate(outcomes) if o is not Outcome.DURABLE)
    return Settlement(others, durable[-1] if durable else None)

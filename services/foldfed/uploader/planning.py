"""The uploader's round planning: which chunks to send, in which order. Pure.

One round of an upload publishes the manifest, asks the hub which chunk indices it lacks,
and sends those. Two sources say what need not travel:

- the hub's have-reply, which is authoritative: a chunk it holds is never sent;
- the uploader's journal of broker-confirmed chunks. A confirm means the broker has the
  chunk, so after a restart it is not sent again, but only in the first round: a round
  that ended without a receipt proves that something the journal called confirmed never
  reached the hub (a broker that lost it, a dead-lettered chunk), so later rounds trust
  the hub alone.

Chunks go in ascending index order, so the hub's store fills front to back and a
resumed upload continues where the last one stopped. Everything here is arithmetic on the
manifest and index sets; the upload (uploader/upload.py) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

from foldfed.codedvector import chunk_bounds
from foldfed.domain import Manifest
from foldfed.errors import FoldfedError


@dataclass(frozen=True)
class RoundPlan:
    """What one round sends and why it skips the rest."""

    send: tuple[int, ...]
    """Chunk indices to publish, in this order."""
    send_bytes: int
    held_by_hub: int
    """Chunks the hub said it holds."""
    journaled: int
    """Chunks the hub lacks but the broker confirmed earlier (not sent this round)."""


def journal_trusted(round_number: int) -> bool:
    """Whether round `round_number` (from 1) may skip chunks the journal calls confirmed."""
    return round_number == 1


def chunk_length(manifest: Manifest, index: int) -> int:
    """The size of chunk `index`: the chunk size, but the last chunk may be short (coded
    chunks: the manifest's `chunk_sizes`)."""
    begin, end = chunk_bounds(manifest, index)
    return end - begin


def plan_round(
    manifest: Manifest,
    missing: Iterable[int],
    confirmed: Set[int],
    *,
    trust_journal: bool,
) -> RoundPlan:
    """The chunks to send this round, given the hub's `missing` indices and the journal's
    `confirmed` ones. Raises FoldfedError if the hub names a chunk the manifest lacks."""
    count = len(manifest.chunk_digests)
    wanted = sorted(set(missing))
    outside = [i for i in wanted if not 0 <= i < count]
    if outside:
        raise FoldfedError(
            f"step {manifest.step}: the hub asked for chunks {outside[:5]}, "
            f"the manifest has {count}"
        )
    skip = confirmed if trust_journal else frozenset()
    send = tuple(i for i in wanted if i not in skip)
    return RoundPlan(
        send=send,
        send_bytes=sum(chunk_length(manifest, i) for i in send),
        held_by_hub=count - len(wanted),
        journaled=len(wanted) - len(send),
    )


def resumes(
    journaled: Manifest, *, step: int, participant: str, weight: float, base_model_digest: bytes
) -> bool:
    """Whether a journaled manifest announces this very delivery, so a restarted upload
    resumes it instead of cutting the delta again. (The caller also checks that the bytes
    are what this version's encoder writes.)"""
    return (
        journaled.step == step
        and journaled.participant == participant
        and journaled.weight == weight
        and journaled.base_model_digest == base_model_digest
    )

"""The retention policy: from the durable state of a hub or a participant, what may be
deleted. Pure: step numbers and digests in, sets of deletable things out; the services
list their files, ask, and delete (aggregator/retention.py, uploader/retention.py).

The rules, and why each kept thing is needed, are in docs/retention.md. In short, with
`keep_steps` = m ≥ 1 and `checkpoint_every` = k, while step t is open at the hub:

- participants' delta chunks are live for the steps ≥ t - m + 1 (the open step's are what
  a restarted aggregator replays into its running sum), and so is the open step's
  shared-ranges chunk; every other chunk may go (the global update's chunks are copies of
  the update files, put again by a repeated finalize);
- θ_s is kept for s ≥ t - m + 1 (θ_t is finalize's base; θ_{t+1} exists while t is being
  finalized) and for every s divisible by k;
- the update files of s ≥ t - m are kept (U_{t-1} and θ_t answer a repeated finalize of
  t - 1 without recomputing it).

At a participant, a sent delta's tensors, coded payload and upload progress may go once m
newer deltas were sent; the global update's chunks may go once the release that carries
the update is written (its file holds them); a step's shared-ranges chunk once that
step's delta is sent.

Manifests, digests and signatures are never deleted: nothing here names them. The
decisions depend only on facts GC itself never deletes (the open step, the manifests,
which deltas were sent), so a GC cut short by a crash decides the same again on restart.
`keep_steps = 0` turns retention off: nothing is ever deletable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionPolicy:
    """`keep_steps`: the recent steps whose deltas, updates and chunks are kept (0: keep
    everything); `checkpoint_every`: also keep θ_s for every s divisible by it (0: none)."""

    keep_steps: int = 1
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.keep_steps < 0 or self.checkpoint_every < 0:
            raise ValueError(f"retention counts must be ≥ 0, got {self}")

    @property
    def enabled(self) -> bool:
        return self.keep_steps > 0

    def first_live_delta_step(self, open_step: int) -> int:
        """The oldest step whose delta chunks the hub keeps (open step - m + 1)."""
        return open_step - self.keep_steps + 1

    def is_checkpoint(self, step: int) -> bool:
        return self.checkpoint_every > 0 and step % self.checkpoint_every == 0


# ---------------------------------------------------------------------- the hub


@dataclass(frozen=True)
class HubHoldings:
    """What the hub holds, as GC sees it.

    `manifest_digests`: the chunk digests of every stored participant manifest of the steps
    ≥ `policy.first_live_delta_step(open_step)` (older ones may be left out);
    `pinned`: chunks the open step needs beyond those (its shared ranges)."""

    open_step: int
    models: frozenset[int]
    updates: frozenset[int]
    chunks: frozenset[bytes]
    manifest_digests: Mapping[int, Iterable[bytes]]
    pinned: frozenset[bytes] = frozenset()


@dataclass(frozen=True)
class HubGarbage:
    """Deletable at the hub: θ_s and update files by step, chunks by digest."""

    models: tuple[int, ...] = ()
    updates: tuple[int, ...] = ()
    chunks: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.models or self.updates or self.chunks)


def hub_garbage(held: HubHoldings, policy: RetentionPolicy) -> HubGarbage:
    if not policy.enabled:
        return HubGarbage()
    first_live = policy.first_live_delta_step(held.open_step)
    live = set(held.pinned)
    for step, digests in held.manifest_digests.items():
        if step >= first_live:
            live.update(digests)
    models = (s for s in held.models if s < first_live and not policy.is_checkpoint(s))
    updates = (s for s in held.updates if s < first_live - 1)
    return HubGarbage(
        models=tuple(sorted(models)),
        updates=tuple(sorted(updates)),
        chunks=tuple(sorted(held.chunks - live)),
    )


# ---------------------------------------------------------------------- a participant


def spent_uploads(sent_steps: Iterable[int], policy: RetentionPolicy) -> tuple[int, ...]:
    """Steps whose sent delta (tensors, coded payload, upload progress) may go: all but
    the newest `keep_steps` sent ones. A delta not yet sent is never among them."""
    if not policy.enabled:
        return ()
    ordered = sorted(set(sent_steps))
    return tuple(ordered[: max(0, len(ordered) - policy.keep_steps)])


def spent_downloads(
    stored: frozenset[bytes],
    written_update: Iterable[bytes],
    ranges_of_sent: Iterable[bytes],
    ranges_of_unsent: Iterable[bytes],
    policy: RetentionPolicy,
) -> tuple[bytes, ...]:
    """Downloaded chunks that may go: those of an update whose release is written (its
    file holds them) and the shared ranges of steps whose delta is sent, but never the
    shared ranges a delta still to be coded needs."""
    if not policy.enabled:
        return ()
    spent = (set(written_update) | set(ranges_of_sent)) - set(ranges_of_unsent)
    return tuple(sorted(spent & stored))

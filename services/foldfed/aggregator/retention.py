"""The hub's garbage collector: lists what the aggregator holds, asks the retention policy
(foldfed.retention) what may go, and deletes it.

It runs in the message handler's worker thread, after each release has opened a step and
once at start-up, so it never races the handler that puts chunks (one message at a time).
Deletions are independent file unlinks: a crash between two of them leaves a smaller
store that the next GC, deciding from the same durable facts, finishes. They are not
fsynced: a deletion a power cut undoes is redone by the next GC. Rules: docs/retention.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from foldfed.durable import remove_file
from foldfed.faults import crash_point
from foldfed.ingest.ledger import IngestLedger
from foldfed.retention import HubGarbage, HubHoldings, RetentionPolicy, hub_garbage

log = structlog.get_logger(__name__)
_MODEL = re.compile(r"model-(\d{12})\.safetensors")
# U_t, and with a lossy downlink its coded chunks and their sizes (aggregation/downlink.py).
_UPDATE = re.compile(r"(?:update-(\d{12})\.safetensors|coded-(\d{12})\.(?:bin|json))")


@dataclass(frozen=True)
class HubGcReport:
    models: int
    updates: int
    chunks: int
    bytes_freed: int


class HubRetention:
    """GC of the aggregator's state folder (layout: aggregator/service.py)."""

    def __init__(self, state_dir: Path, ledger: IngestLedger, policy: RetentionPolicy) -> None:
        self.models_dir = state_dir / "models"
        self.updates_dir = state_dir / "updates"
        self.ledger = ledger
        self.policy = policy

    def collect(self) -> HubGcReport:
        """Delete what the policy says nothing needs any more. Blocking."""
        if not self.policy.enabled:
            return HubGcReport(0, 0, 0, 0)
        open_step = self.ledger.open_step
        garbage = hub_garbage(self._holdings(open_step), self.policy)
        report = self._delete(garbage, open_step)
        if garbage:
            log.info(
                "retention: deleted",
                open_step=open_step,
                models=report.models,
                updates=report.updates,
                chunks=report.chunks,
                bytes_freed=report.bytes_freed,
            )
        return report

    def _holdings(self, open_step: int) -> HubHoldings:
        manifests: dict[int, tuple[bytes, ...]] = {}
        facts = self.ledger.facts
        for step in range(self.policy.first_live_delta_step(open_step), open_step + 1):
            digests: list[bytes] = []
            for participant in facts.participants_with_manifest(step):
                manifest = self.ledger.manifest(step, participant)
                if manifest is not None:
                    digests.extend(manifest.chunk_digests)
            manifests[step] = tuple(digests)
        ranges = self.ledger.coding.ranges_digest
        return HubHoldings(
            open_step=open_step,
            models=frozenset(_steps(self.models_dir, _MODEL)),
            updates=frozenset(_steps(self.updates_dir, _UPDATE)),
            chunks=frozenset(self.ledger.store.digests()),
            manifest_digests=manifests,
            pinned=frozenset({ranges} if ranges else ()),
        )

    def _delete(self, garbage: HubGarbage, open_step: int) -> HubGcReport:
        freed = 0
        paths = [
            *(self.updates_dir / name for s in garbage.updates for name in _update_names(s)),
            *(self.models_dir / f"model-{s:012d}.safetensors" for s in garbage.models),
        ]
        for done, digest in enumerate(garbage.chunks):
            freed += self.ledger.store.delete(digest)
            if done == 0:
                # Tests: SIGKILL in the middle of a GC (docs/format.md, crash points).
                crash_point("aggregator", "mid-gc", open_step)
        for path in paths:
            freed += remove_file(path)
        return HubGcReport(len(garbage.models), len(garbage.updates), len(garbage.chunks), freed)


def _update_names(step: int) -> tuple[str, ...]:
    return (
        f"update-{step:012d}.safetensors",
        f"coded-{step:012d}.bin",
        f"coded-{step:012d}.json",
    )


def _steps(folder: Path, pattern: re.Pattern[str]) -> set[int]:
    if not folder.is_dir():
        return set()
    found = set()
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found.add(int(next(g for g in match.groups() if g is not None)))
    return found

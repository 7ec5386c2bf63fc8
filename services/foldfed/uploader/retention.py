"""A participant's garbage collector: what the gateway may delete of its spool, as the
retention policy (foldfed.retention) decides; this module lists and deletes.

Two moments, each in the task that owns the files it deletes:
- after a delta is marked sent (the upload loop): older sent deltas' tensors, their coded
  payloads (`coding/delta-<t>.coded`) and their upload progress (`uploads/step-<t>/`
  `confirmed`, `source`); the manifests and `.sent` records stay;
- after a release is written (the inbox handler, before the release is acked): the
  downloaded chunks of the update it carried, now in `inbox/update-<t>`, and the shared
  ranges of steps whose delta is sent.
A crash in between leaves files the next GC deletes: the upload loop's at start-up, the
inbox's when the unacked release is redelivered. Rules: docs/retention.md.
"""

from __future__ import annotations

import structlog

from foldfed.chunkstore import ChunkStore
from foldfed.domain import Manifest
from foldfed.durable import remove_file
from foldfed.faults import crash_point
from foldfed.retention import RetentionPolicy, spent_downloads, spent_uploads
from foldfed.spool import Spool
from foldfed.uploader.coding import UplinkCoder
from foldfed.uploader.journal import UploadJournal

log = structlog.get_logger(__name__)


class SpoolRetention:
    def __init__(
        self,
        spool: Spool,
        downloads: ChunkStore,
        coder: UplinkCoder,
        policy: RetentionPolicy,
    ) -> None:
        self.spool = spool
        self.downloads = downloads
        self.coder = coder
        self.policy = policy

    def after_sent(self) -> int:
        """Delete what older sent deltas left behind; the bytes freed. Blocking."""
        freed = 0
        spent = spent_uploads(self.spool.sent_delta_steps(), self.policy)
        for step in spent:
            freed += self.spool.discard_sent_delta(step)
            freed += remove_file(self.coder.folder / f"delta-{step:012d}.coded")
            freed += remove_file(self.coder.folder / f"delta-{step:012d}.masked")  # secagg
            journal = self.spool.root / "uploads" / f"step-{step:012d}"
            if journal.is_dir():
                UploadJournal(self.spool.root, step).retire()
        if freed:
            log.info("retention: sent deltas deleted", bytes_freed=freed)
        return freed

    def after_release(self, step: int, update: Manifest | None) -> int:
        """Delete the downloaded chunks release `step` no longer needs (its update is
        written to the inbox); the bytes freed. Blocking."""
        if not self.policy.enabled:
            return 0
        sent = set(self.spool.sent_delta_steps())
        # Shared ranges are per step; older steps' were deleted by earlier GCs.
        recent = range(max(0, step - self.policy.keep_steps - 2), step + 1)
        ranges = {s: self.coder.coding_for(s).ranges_digest for s in recent}
        spent = spent_downloads(
            frozenset(self.downloads.digests()),
            update.chunk_digests if update is not None else (),
            [d for s, d in ranges.items() if s in sent and d],
            [d for s, d in ranges.items() if s not in sent and d],
            self.policy,
        )
        freed = 0
        for done, digest in enumerate(spent):
            freed += self.downloads.delete(digest)
            if done == 0:
                crash_point("uploader", "mid-gc", step)  # tests: SIGKILL during GC
        if freed:
            log.info("retention: downloaded chunks deleted", chunks=len(spent), bytes_freed=freed)
        return freed

"""The hub's durable record of what each participant delivered: the ingest rules carried
out against durable state.

`IngestLedger` turns one verified message into effects (replies, receipts) after making
its consequences durable: chunk bytes in the content-addressed store (fsynced), facts in
SQLite (ingest/store.py). What to accept, drop or reject is decided by ingest/rules.py;
this module reads the facts the rules need, asks them, and writes what they decided.
Handlers are idempotent: a redelivered message changes nothing and is counted as a
duplicate. Chunks may be made durable in groups (`stage_chunk`, `commit_chunks`,
`apply_chunk`: one fsync pass and one SQLite transaction for a batch); `on_chunk` is a
group of one. Blocking: the service calls it from a worker thread, one message or batch
at a time.

What "held" means is scoped per participant: the hub answers a have-request with the
chunks *this* participant delivered before, never with what another participant holds,
so nobody can probe another company's update by digest.

Update bounds (docs/format.md, "Update bounds"): the sink refuses, with OverBound, the
chunk that takes a delta over the step's bound, before it is stored. The delta is then
withdrawn: its rows go in one transaction (the commit point; a replay after a crash
never counts it again), then its counted chunks are taken out of the running sum, so no
part of it stays in the sum, and its sender may send another manifest for the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from foldfed.aggregation.normbound import OverBound
from foldfed.chunkstore import ChunkStore, StagedChunk
from foldfed.codedvector import CycleCoding, check_coding
from foldfed.digests import digest_of
from foldfed.ingest import rules
from foldfed.ingest.checks import check_manifest, check_masking
from foldfed.ingest.rules import Effects, OpenStep, Verdict
from foldfed.ingest.store import IngestStore
from foldfed.keyfiles import read_keyring
from foldfed.messages import (
    Chunk,
    DeliveryReceipt,
    HaveRequest,
    Manifest,
    StepReleased,
    decode,
    encode,
    now_ms,
    unsigned_bytes,
)
from foldfed.secagg.masks import DEFAULT_RING_BITS
from foldfed.signing import VerifyKey

# Manifests never change once stored, and every chunk needs its manifest: keep this many
# decoded ones at hand.
_MANIFEST_CACHE = 1024


class DeltaSink(Protocol):
    """What the aggregator adds to ingest: content checks and the running sum.

    `validate` must raise Reject for bad content *before* anything is stored, and return
    what `apply` needs; `apply` runs once per chunk that newly counts."""

    def check_manifest(self, m: Manifest) -> None: ...

    def validate(self, m: Manifest, index: int, body: bytes) -> object: ...

    def apply(self, m: Manifest, index: int, prepared: object) -> None: ...

    def retract(self, m: Manifest, index: int, body: bytes) -> None: ...

    def forget(self, m: Manifest) -> None: ...


class _NoSink:
    def check_manifest(self, m: Manifest) -> None:
        pass

    def validate(self, m: Manifest, index: int, body: bytes) -> object:
        return None

    def apply(self, m: Manifest, index: int, prepared: object) -> None:
        pass

    def retract(self, m: Manifest, index: int, body: bytes) -> None:
        pass

    def forget(self, m: Manifest) -> None:
        pass


@dataclass
class StagedDelivery:
    """One chunk message of a batch: checked, its body staged; `outcome` (the effects to
    publish once it is applied) is set by the commit."""

    chunk: Chunk
    manifest: Manifest | None
    prepared: object  # what the sink's `apply` needs (None without a manifest)
    newly_present: bool = False
    outcome: Effects | None = None


@dataclass
class ChunkBatch:
    """The chunks of one group commit, in arrival order, and their staged bodies (one per
    digest: a chunk sent twice in a batch is written once)."""

    deliveries: list[StagedDelivery] = field(default_factory=list)
    writes: dict[bytes, StagedChunk] = field(default_factory=dict)


class IngestLedger:
    def __init__(
        self,
        state_dir: Path,
        participants: tuple[str, ...],
        first_step: int,
        max_payload_bytes: int,
        sink: DeltaSink | None = None,
        member_keys: Mapping[str, VerifyKey] | None = None,
        *,
        secure_aggregation: bool = False,
        ring_bits: int = DEFAULT_RING_BITS,
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.sink: DeltaSink = sink or _NoSink()
        # Every member's public key by participant id; None: signatures are not checked.
        self.member_keys = member_keys
        # Secure aggregation: every delta masked on this ring (ingest.checks.check_masking).
        self.secure_aggregation = secure_aggregation
        self.ring_bits = ring_bits
        self._manifests: dict[tuple[int, str], Manifest] = {}
        self.store = ChunkStore(state_dir / "store")
        self.participants = frozenset(participants)
        self.max_payload_bytes = max_payload_bytes
        self.facts = IngestStore(state_dir / "ingest.sqlite3", self.participants, first_step)

    def close(self) -> None:
        self.facts.close()

    # ---------------------------------------------------------------- state

    @property
    def open_step(self) -> int:
        return self.facts.open_step().step

    @property
    def model_digest(self) -> bytes:
        return self.facts.open_step().model_digest

    @property
    def members(self) -> frozenset[str]:
        return self.facts.open_step().members

    @property
    def coding(self) -> CycleCoding:
        """The open step's coding: the cycle's codec, seed and the step's shared ranges."""
        return self.facts.open_step().coding

    def manifest(self, step: int, participant: str) -> Manifest | None:
        key = (step, participant)
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        raw = self.store.get_manifest(step, participant)
        if raw is None or digest_of(raw) != self.facts.accepted_id(step, participant):
            return None  # none, or a withdrawn delta's left by a crash (see _withdraw)
        decoded = decode("foldfed.v1.DeltaManifest", raw)
        assert isinstance(decoded, Manifest)
        if len(self._manifests) > _MANIFEST_CACHE:
            self._manifests.clear()
        self._manifests[key] = decoded
        return decoded

    def delivered(self, step: int) -> set[str]:
        return self.facts.delivered(step)

    def _check_sender(self, step: int, participant: str, delivered: bytes = b"") -> OpenStep:
        open_step = self.facts.open_step()
        completed = b""
        if delivered and step < open_step.step:
            completed = self.facts.completed_id(step, participant)
        rules.check_sender(
            self.participants,
            open_step,
            step,
            participant,
            delivered=delivered,
            completed_id=completed,
        )
        return open_step

    # ---------------------------------------------------------------- handlers

    def on_step_released(self, msg: StepReleased) -> Effects:
        """Open `msg.step` for deltas. Releases only move forward; a replay is a no-op."""
        if rules.release_verdict(self.facts.open_step(), msg) is Verdict.DUPLICATE:
            return Effects(duplicate=True)
        next_ranges = b""
        if msg.update_manifest:
            update = decode("foldfed.v1.DeltaManifest", msg.update_manifest)
            assert isinstance(update, Manifest)
            next_ranges = update.next_ranges_digest
        coding = rules.coding_of(msg, next_ranges)
        weights = tuple(sorted(msg.agreed_weights().items()))
        self.facts.open(
            msg.step, msg.model_digest, msg.participants, coding, weights, msg.update_norm_bound
        )
        return Effects(released=[msg])

    def on_manifest(self, m: Manifest, serialized: bytes) -> Effects:
        new_id = digest_of(serialized)
        open_step = self._check_sender(m.step, m.participant, delivered=new_id)
        check_manifest(m, self.max_payload_bytes)
        if self.member_keys is not None:
            rules.check_signature(m, unsigned_bytes(m), self.member_keys)
        verdict = rules.manifest_verdict(
            m,
            new_id,
            self.facts.accepted_id(m.step, m.participant),
            open_step.model_digest,
            canonical=encode(m)[1] == serialized,
        )
        if verdict is Verdict.DUPLICATE:
            return Effects(duplicate=True)
        rules.check_weight(m, open_step)
        check_coding(m, open_step.coding)
        check_masking(m, secure=self.secure_aggregation, ring_bits=self.ring_bits,
                      cycle=open_step.coding.cycle)  # fmt: skip
        self.sink.check_manifest(m)
        held = [i for i, d in enumerate(m.chunk_digests) if self._holds(m.participant, d)]
        try:
            for index in held:  # chunks it delivered before: their content must pass too
                self.sink.validate(m, index, self.store.get(m.chunk_digests[index]))
        except OverBound:
            self.sink.forget(m)  # nothing of it was counted
            raise
        # Write the manifest file first: the row that points to it is the commit point.
        self.store.put_manifest(m.step, m.participant, serialized)
        self.facts.add_manifest(
            m.step, m.participant, new_id, m.chunk_digests, frozenset(held), now_ms()
        )
        for index in held:
            self._apply_stored(m, index)
        return self._complete_if_done(m.step, m.participant)

    def on_have_request(self, r: HaveRequest) -> Effects:
        self._check_sender(r.step, r.participant, delivered=r.manifest_id)
        accepted = self.facts.accepted_id(r.step, r.participant)
        missing = self.facts.missing(r.step, r.participant) if accepted == r.manifest_id else ()
        reply, resend_receipt = rules.have_reply(r, accepted, missing)
        receipts = [self.receipt(r.step, r.participant)] if resend_receipt else []
        return Effects(replies=[reply], receipts=receipts)

    def on_chunk(self, c: Chunk) -> Effects:
        """One chunk on its own: a group commit of one."""
        batch = ChunkBatch()
        staged = self.stage_chunk(batch, c)
        self.commit_chunks(batch)
        return self.apply_chunk(staged)

    # ---------------------------------------------------------------- group commit
    # A batch of chunks is made durable in three calls, so the service can ack them all
    # at once: `stage_chunk` for each (checks, then the body written, not yet durable),
    # `commit_chunks` once (one fsync pass, one SQLite transaction), then `apply_chunk`
    # for each, in order (the running sum; the effects to publish). A crash anywhere
    # before the acks loses nothing acked: the broker redelivers the whole batch, and
    # what was committed already makes each chunk a duplicate.

    def stage_chunk(self, batch: ChunkBatch, c: Chunk) -> StagedDelivery:
        """Check `c` (Reject: nothing written) and write its body, not yet durable."""
        self._check_sender(c.step, c.participant)
        manifest = self.manifest(c.step, c.participant)
        rules.check_chunk(c, manifest, digest_of(c.body))
        try:
            prepared = None if manifest is None else self.sink.validate(manifest, c.index, c.body)
        except OverBound:
            assert manifest is not None
            self._withdraw(manifest)
            # Chunks of the same delta staged earlier in this batch are not counted yet:
            # they are kept as chunks without a manifest (present, uncounted), so nothing
            # of the withdrawn delta reaches the sum when the batch commits.
            for staged in batch.deliveries:
                if staged.manifest == manifest:
                    staged.manifest, staged.prepared = None, None
            raise
        # A chunk may arrive before its manifest (redelivery reorders): it is verified and
        # stored, and the manifest counts it when it comes.
        if c.digest not in batch.writes:
            written = self.store.stage(c.digest, c.body, verified=True)  # hashed just above
            if written is not None:
                batch.writes[c.digest] = written
        staged = StagedDelivery(c, manifest, prepared)
        batch.deliveries.append(staged)
        return staged

    def commit_chunks(self, batch: ChunkBatch) -> None:
        """Make every staged chunk durable: its body (one fsync pass), then its facts (one
        SQLite transaction, in arrival order, so duplicates and completions count as one
        by one would)."""
        self.store.commit(list(batch.writes.values()))
        with self.facts.batch():
            for staged in batch.deliveries:
                staged.outcome = self._record(staged)

    def discard(self, batch: ChunkBatch) -> None:
        """Forget a batch that will not be committed (its staged files are deleted)."""
        self.store.discard(list(batch.writes.values()))

    def apply_chunk(self, staged: StagedDelivery) -> Effects:
        """Add a committed chunk to the running sum if it newly counts; its effects."""
        if staged.outcome is None:
            raise RuntimeError("apply_chunk before commit_chunks")
        if staged.manifest is not None and staged.newly_present:
            self.sink.apply(staged.manifest, staged.chunk.index, staged.prepared)
        return staged.outcome

    def _record(self, staged: StagedDelivery) -> Effects:
        c = staged.chunk
        staged.newly_present = self.facts.record_chunk(
            c.step, c.participant, c.index, c.digest, counted=staged.manifest is not None
        )
        if staged.manifest is None:
            return Effects()
        if rules.chunk_verdict(staged.newly_present) is Verdict.DUPLICATE:
            return Effects(duplicate=True)
        return self._complete_if_done(c.step, c.participant)

    def replay_open_step(self) -> int:
        """Re-apply every chunk that counts for the open step (a fresh sink after a
        restart rebuilds the exact same running sum). Returns the chunks applied."""
        step, applied = self.open_step, 0
        for participant in self.facts.participants_with_manifest(step):
            manifest = self.manifest(step, participant)
            assert manifest is not None
            for index in self.facts.present(step, participant):
                self._apply_stored(manifest, index)
                applied += 1
        return applied

    def weights(self, step: int) -> dict[str, float]:
        """Aggregation weight of every participant whose delta for `step` is complete."""
        out: dict[str, float] = {}
        for participant in self.delivered(step):
            manifest = self.manifest(step, participant)
            assert manifest is not None
            out[participant] = manifest.weight
        return out

    def receipt(self, step: int, participant: str) -> DeliveryReceipt:
        manifest = self.manifest(step, participant)
        assert manifest is not None
        return rules.receipt(manifest, *self.facts.receipt_facts(step, participant))

    # ---------------------------------------------------------------- helpers

    def _apply_stored(self, m: Manifest, index: int) -> None:
        body = self.store.get(m.chunk_digests[index])
        self.sink.apply(m, index, self.sink.validate(m, index, body))

    def _withdraw(self, m: Manifest) -> None:
        """Take a delta over the bound out: its rows first (the commit point), then its
        counted chunks out of the sum (a crash in between: the replay never counts them)."""
        counted = self.facts.withdraw(m.step, m.participant)
        self._manifests.pop((m.step, m.participant), None)
        self.store.delete_manifest(m.step, m.participant)  # a crash may leave it: unread
        self.sink.forget(m)
        for index in counted:
            self.sink.retract(m, index, self.store.get(m.chunk_digests[index]))

    def _holds(self, participant: str, digest: bytes) -> bool:
        return self.facts.owns(participant, digest) and self.store.has(digest)

    def _complete_if_done(self, step: int, participant: str) -> Effects:
        if not rules.is_complete(self.facts.missing_count(step, participant)):
            return Effects()
        if not self.facts.mark_complete(step, participant, now_ms()):
            return Effects(duplicate=True)
        return Effects(receipts=[self.receipt(step, participant)])


def member_keys(keyring_file: Path | None) -> dict[str, VerifyKey] | None:
    """The members' public keys by name from a keyring file (None: no file, no checks)."""
    if keyring_file is None:
        return None
    return {key.name: key for key in read_keyring(keyring_file).keys}

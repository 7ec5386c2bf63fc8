"""Send one delta: manifest first, ask what the hub lacks, send only that, confirm.

Resumable: the manifest and every broker-confirmed chunk index are journaled locally, and
the hub's have-reply is authoritative, so a restarted uploader sends only chunks that
neither the hub holds nor the broker confirmed.

Over 400 lines, one concept: one delta's delivery protocol (its rounds, the chunk pipeline,
the waits for replies and receipts, and which refusals end it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import structlog
from tqdm import tqdm

from foldfed import topology, tracing
from foldfed.audit.signatures import sign_manifest
from foldfed.bus import Bus, PublishWindow
from foldfed.codedvector import chunk_bounds
from foldfed.config import UploaderSettings
from foldfed.domain import manifest_of
from foldfed.errors import FoldfedError
from foldfed.faults import crash_point
from foldfed.keyfiles import read_private_key
from foldfed.messages import (
    AnyMessage,
    Chunk,
    DeliveryReceipt,
    Event,
    HaveReply,
    HaveRequest,
    Manifest,
    decode,
    encode,
    manifest_id,
    unsigned_bytes,
)
from foldfed.payloadfile import plan_chunks, read_chunk, read_range
from foldfed.signing import SigningKey
from foldfed.uploader.inbox import Inbox
from foldfed.uploader.journal import UploadJournal
from foldfed.uploader.link import Link
from foldfed.uploader.planning import RoundPlan, journal_trusted, plan_round, resumes

log = structlog.get_logger(__name__)

# How many times to ask again (have-request, re-send what is missing) before giving up.
MAX_ROUNDS = 5


class UploadRejected(FoldfedError):
    """The hub rejected our delta; the reason says why. Retrying will not help."""


@dataclass(frozen=True)
class UploadReport:
    step: int
    participant: str
    manifest_id: str
    chunks_total: int
    chunks_sent: int
    bytes_sent: int
    skipped_held_by_hub: int
    skipped_journaled: int
    hub_duplicates: int
    resumed: bool
    seconds: float
    retries: int = 0
    # Seconds the emulated uplink (token bucket) held the chunks back: the link's busy
    # time beyond its burst (0 on an unlimited link). A metric for load tests.
    link_s: float = 0.0
    # Seconds from the first chunk published to the last one confirmed (all rounds): the
    # chunk pipeline alone, without the manifest, have and receipt round trips, whose
    # replies may queue behind the update's chunks on the participant's own queue.
    send_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Tally:
    """What an upload sent and skipped, over all its rounds."""

    sent: int = 0
    sent_bytes: int = 0
    skipped_hub: int = 0
    skipped_journal: int = 0
    # Rounds run again (no receipt in time).
    retries: int = 0
    # Seconds the uplink's token bucket held chunks back, over all rounds.
    link_s: float = 0.0
    # Seconds from each round's first chunk publish to its last confirm, over all rounds.
    send_s: float = 0.0


class Uploader:
    def __init__(self, settings: UploaderSettings, bus: Bus, inbox: Inbox) -> None:
        self.settings = settings
        self.bus = bus
        self.inbox = inbox
        self._link = Link.uplink(settings.rate_limit_bps, settings.chunk_size)
        key_file = settings.signing_key
        self._key: SigningKey | None = None if key_file is None else read_private_key(key_file)

    def _signed(self, manifest: Manifest, serialized: bytes) -> tuple[Manifest, bytes]:
        """The manifest signed with our key, and its bytes (as given without a key). The
        journal keeps the unsigned bytes: Ed25519 is deterministic, so a resumed upload
        signs them to the same manifest id (foldfed.audit.signatures)."""
        if self._key is None or manifest.signature:
            return manifest, serialized
        signed = replace(manifest, signature=sign_manifest(self._key, unsigned_bytes(manifest)))
        return signed, encode(signed)[1]

    async def upload(
        self,
        delta_path: Path,
        step: int,
        weight: float,
        base_model_digest: bytes = b"",
        trace: Mapping[str, str] | None = None,
        prepared: tuple[Manifest, bytes] | None = None,
    ) -> UploadReport:
        """Deliver one delta. `trace`: the context of the trainer's span that made it (the
        upload span hangs under it; the chunks' headers carry the upload span's).
        `prepared`: a coded delta's manifest and its canonical bytes (uploader/coding.py);
        `delta_path` is then its coded payload."""
        parent = tracing.CURRENT if trace is None else trace
        with tracing.span("upload", parent=parent, step=step) as span:
            report = await self._upload(delta_path, step, weight, base_model_digest, prepared)
            span.set_attributes(
                {
                    tracing.BYTES: report.bytes_sent,
                    "chunks": report.chunks_total,
                    "chunks_sent": report.chunks_sent,
                    "skipped": report.skipped_held_by_hub + report.skipped_journaled,
                    "retries": report.retries,
                    "resumed": report.resumed,
                }
            )
        return report

    async def _upload(
        self,
        delta_path: Path,
        step: int,
        weight: float,
        base_model_digest: bytes,
        prepared: tuple[Manifest, bytes] | None = None,
    ) -> UploadReport:
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(step=step)
        journal = UploadJournal(self.settings.spool_dir, step)
        try:
            if prepared is None:
                manifest, serialized, resumed = await self._manifest(
                    journal, delta_path, step, weight, base_model_digest
                )
            else:
                manifest, serialized = prepared
                # The coded payload is written once per step: its journal stays valid.
                resumed = journal.load_manifest(delta_path) == serialized
                if not resumed:
                    journal.start(delta_path, serialized)
            manifest, serialized = self._signed(manifest, serialized)
            mid = manifest_id(serialized)
            log.info(
                "upload start",
                chunks=len(manifest.chunk_digests),
                bytes=manifest.payload_size,
                resumed=resumed,
            )
            tally = _Tally()
            receipt: DeliveryReceipt | None = None
            for round_ in range(1, MAX_ROUNDS + 1):
                trust_journal = journal_trusted(round_)
                receipt = await self._round(
                    manifest, serialized, mid, delta_path, journal, trust_journal, tally
                )
                if receipt is not None:
                    break
                tally.retries += 1
                log.warning("no receipt in time; asking the hub again", round=round_)
            if receipt is None:
                raise FoldfedError(f"step {step}: no delivery receipt after {MAX_ROUNDS} rounds")
        finally:
            journal.close()
        report = UploadReport(
            step=step,
            participant=self.settings.participant,
            manifest_id=mid.hex(),
            chunks_total=len(manifest.chunk_digests),
            chunks_sent=tally.sent,
            bytes_sent=tally.sent_bytes,
            skipped_held_by_hub=tally.skipped_hub,
            skipped_journaled=tally.skipped_journal,
            hub_duplicates=receipt.duplicate_chunks,
            resumed=resumed,
            seconds=round(time.monotonic() - started, 3),
            retries=tally.retries,
            link_s=round(tally.link_s, 6),
            send_s=round(tally.send_s, 6),
        )
        log.info("upload done", **report.as_dict())
        return report

    async def _round(
        self,
        manifest: Manifest,
        serialized: bytes,
        mid: bytes,
        delta_path: Path,
        journal: UploadJournal,
        trust_journal: bool,
        tally: _Tally,
    ) -> DeliveryReceipt | None:
        """Manifest (idempotent at the hub), have-request, the missing chunks, receipt."""
        receipt_future = self.inbox.expect(_receipt_for(manifest.step, mid))
        await self.bus.publish_bytes(
            topology.HUB_EXCHANGE,
            topology.INGEST_ROUTING_KEY,
            serialized,
            type_name="foldfed.v1.DeltaManifest",
        )
        missing = await self._ask_missing(manifest.step, mid)
        confirmed = journal.confirmed() if trust_journal else frozenset[int]()
        plan = plan_round(manifest, missing, confirmed, trust_journal=trust_journal)
        tally.skipped_hub += plan.held_by_hub
        tally.skipped_journal += plan.journaled
        sending = time.monotonic()
        tally.link_s += await self._send_chunks(manifest, delta_path, plan, journal)
        tally.send_s += time.monotonic() - sending
        tally.sent += len(plan.send)
        tally.sent_bytes += plan.send_bytes
        return await self._await_receipt(receipt_future, manifest.step, mid)

    async def _manifest(
        self,
        journal: UploadJournal,
        delta_path: Path,
        step: int,
        weight: float,
        base_model_digest: bytes,
    ) -> tuple[Manifest, bytes, bool]:
        journaled = journal.load_manifest(delta_path)
        if journaled is not None:
            decoded = decode("foldfed.v1.DeltaManifest", journaled)
            assert isinstance(decoded, Manifest)
            same_delivery = resumes(
                decoded,
                step=step,
                participant=self.settings.participant,
                weight=weight,
                base_model_digest=base_model_digest,
            )
            # ... and written by this version's encoder.
            if same_delivery and encode(decoded)[1] == journaled:
                return decoded, journaled, True
        # Hashing a GB-sized file takes a fraction of a second per GB, but never on the loop.
        with tracing.span("encode", step=step, chunk_size=self.settings.chunk_size):
            plan = await asyncio.to_thread(plan_chunks, delta_path, self.settings.chunk_size)
        manifest = manifest_of(
            plan,
            step=step,
            participant=self.settings.participant,
            weight=weight,
            base_model_digest=base_model_digest,
        )
        serialized = encode(manifest)[1]
        journal.start(delta_path, serialized)
        return manifest, serialized, False

    async def _ask_missing(self, step: int, mid: bytes) -> list[int]:
        for _attempt in range(MAX_ROUNDS):
            request_id = uuid.uuid4().hex
            future = self.inbox.expect(
                lambda m, rid=request_id: isinstance(m, HaveReply) and m.request_id == rid
            )
            request = HaveRequest(step, self.settings.participant, mid, request_id)
            await self.bus.publish(topology.HUB_EXCHANGE, topology.INGEST_ROUTING_KEY, request)
            reply = await self._wait(future, self.settings.reply_timeout_s)
            if reply is None:
                log.warning("no have-reply in time; asking again", request_id=request_id)
                continue
            assert isinstance(reply, HaveReply)
            if reply.error:
                raise UploadRejected(f"hub cannot answer for our manifest: {reply.error}")
            return list(reply.missing)
        raise FoldfedError(f"step {step}: the hub did not answer {MAX_ROUNDS} have-requests")

    async def _wait(self, future: asyncio.Future[AnyMessage], timeout: float) -> AnyMessage | None:
        """Wait for `future`, but fail fast if the hub rejects something of ours."""
        seen = len(self.inbox.rejections)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({future}, timeout=min(0.5, timeout))
            if done:
                return future.result()
            self._raise_on_rejection(seen)
        self.inbox.forget(future)
        future.cancel()
        return None

    def _raise_on_rejection(self, seen: int) -> None:
        """Fail fast on a refusal of one of this process's messages. A refusal naming a
        message another process sent under the same broker identity (a hand-run `foldfed
        upload`, anyone holding the credentials) is not this upload's: logged by the inbox,
        ignored here. One without a subject (a hub before Event.subject) counts as ours."""
        ours = own_refusals(self.inbox.rejections[seen:], self.bus.sent)
        if ours:
            raise UploadRejected(f"hub rejected our message: {ours[0].detail}")

    async def _await_receipt(
        self, future: asyncio.Future[AnyMessage], step: int, mid: bytes
    ) -> DeliveryReceipt | None:
        known = self.inbox.receipts.get((step, mid))
        if known is not None:
            self.inbox.forget(future)
            return known
        got = await self._wait(future, self.settings.receipt_timeout_s)
        assert got is None or isinstance(got, DeliveryReceipt)
        return got

    async def _send_chunks(
        self, manifest: Manifest, delta_path: Path, plan: RoundPlan, journal: UploadJournal
    ) -> float:
        """Publish the plan's chunks with at most `inflight_window` unconfirmed at once;
        journal each index as its confirm arrives. Memory: window x chunk size. Returns the
        seconds the uplink held the chunks back (its token bucket's waits)."""
        held = 0.0
        progress = tqdm(
            total=plan.send_bytes,
            unit="B",
            unit_scale=True,
            desc=f"step {manifest.step} upload",
            disable=None,  # shown on a terminal only
        )

        def confirmed(index: int, size: int) -> Callable[[], None]:
            def done() -> None:
                journal.mark_confirmed(index)
                progress.update(size)
                crash_point("uploader", "after-first-chunk", manifest.step)

            return done

        try:
            async with PublishWindow(self.settings.bus.inflight_window) as window:
                for index in plan.send:
                    body = await asyncio.to_thread(_read_chunk, delta_path, manifest, index)
                    held += await self._link.carry(len(body))
                    chunk = Chunk(
                        manifest.step,
                        manifest.participant,
                        index,
                        manifest.chunk_digests[index],
                        body,
                    )
                    publish = self.bus.publish(
                        topology.HUB_EXCHANGE, topology.INGEST_ROUTING_KEY, chunk
                    )
                    await window.submit(publish, on_confirm=confirmed(index, len(body)))
        finally:
            progress.close()
        return held


def own_refusals(events: Sequence[Event], sent: Callable[[str], bool]) -> list[Event]:
    """The refusals in `events` of messages this process sent (`sent`: Bus.sent), and
    those that name no message (a hub before Event.subject): the only ones that may end an
    upload."""
    return [e for e in events if not e.subject or sent(e.subject)]


def _read_chunk(path: Path, manifest: Manifest, index: int) -> bytes:
    if manifest.coded:
        return read_range(path, *chunk_bounds(manifest, index))
    return read_chunk(path, manifest.chunk_size, index)


def _receipt_for(step: int, mid: bytes):
    return lambda m: isinstance(m, DeliveryReceipt) and m.step == step and m.manifest_id == mid


async def run_upload(
    settings: UploaderSettings,
    delta_path: Path,
    step: int,
    weight: float,
    base_model_digest: bytes = b"",
) -> UploadReport:
    bus = await Bus.connect(settings.bus, name=f"uploader-{settings.participant}")
    inbox = Inbox(bus, settings.participant)
    inbox.start()
    try:
        return await Uploader(settings, bus, inbox).upload(
            delta_path, step, weight, base_model_digest
        )
    finally:
        await inbox.close()
        await bus.close()

"""The uploader service: a participant's only networked process.

It owns the participant's queue and its side of the spool it shares with the trainer
(which never touches the network):
  outbox -> hub: deltas (resumable upload) and model reports;
  hub -> inbox: the global update's chunks (kept in a local content-addressed store) and
  step releases, turned into files the trainer picks up.
With a lossy cycle codec, deltas are coded (with this participant's error feedback) and
coded updates decoded here (uploader/coding.py): the trainer only ever sees safetensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path

import structlog

from foldfed import topology, tracing
from foldfed.bus import Bus, unless_stopped
from foldfed.chunkstore import ChunkStore
from foldfed.config import UploaderSettings
from foldfed.digests import digest_of, short
from foldfed.domain import AnyMessage, Chunk, Event, Manifest, ModelReport, StepReleased
from foldfed.errors import IntegrityError
from foldfed.heartbeat import run_heartbeats
from foldfed.messages import decode, now_ms
from foldfed.retention import RetentionPolicy
from foldfed.settings import load
from foldfed.spool import Spool
from foldfed.uploader.coding import UplinkCoder, decode_update
from foldfed.uploader.inbox import Inbox
from foldfed.uploader.link import Link
from foldfed.uploader.masking import MaskedUplink
from foldfed.uploader.retention import SpoolRetention
from foldfed.uploader.upload import Uploader

log = structlog.get_logger(__name__)
SERVICE = "uploader"
POLL_S = 0.2


class UploaderService:
    def __init__(self, settings: UploaderSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.spool = Spool(settings.spool_dir)
        self.downloads = ChunkStore(settings.spool_dir / "downloads")
        self.inbox = Inbox(bus, settings.participant, handler=self._on_message)
        self.uploader = Uploader(settings, bus, self.inbox)
        self.coder = UplinkCoder(
            settings.spool_dir,
            settings.participant,
            settings.chunk_size,
            self.downloads,
            clip=load().update_clip,
        )
        # Secure aggregation: deltas travel masked (uploader/masking.py), never in clear.
        self.masker = (
            MaskedUplink(self.coder, settings.signing_key, settings.member_keys,
                         settings.ring_bits)
            if settings.secure_aggregation
            else None
        )  # fmt: skip
        # When the latest receipt arrived: the wait at the barrier runs from then until
        # the next release.
        self._delivered_at: float | None = None
        # What heartbeats report: the step at hand and what this participant is doing.
        self._step, self._state = 0, "idle"
        # Test-only knob: seconds to wait before each upload (a slow participant, known
        # exactly, for the monitor's straggler test). 0 in production.
        self._extra_delay_s = load().uploader_extra_delay_s
        # Seconds an upload may take per step; the coder picks the codec that fits (0: off).
        self._upload_budget_s = load().upload_budget_s
        # Load tests emulate the site's downlink (0: off; the broker's own pace).
        self.downlink = Link.downlink(load().download_rate_limit_bps)
        # Seconds the emulated downlink held each step's update (step of the update).
        self._download_s: dict[int, float] = {}
        policy = RetentionPolicy(load().retain_steps)  # checkpoints are the hub's
        self.retention = SpoolRetention(self.spool, self.downloads, self.coder, policy)

    async def run(self, stop: asyncio.Event) -> None:
        self.inbox.start()
        beats = asyncio.create_task(
            run_heartbeats(self.bus, SERVICE, self.settings.participant, self._status, stop)
        )
        log.info("uploader ready", spool=str(self.settings.spool_dir))
        await asyncio.to_thread(self.retention.after_sent)  # finishes one a crash cut short
        try:
            while not stop.is_set():
                # A stop abandons an upload at once rather than finishing it (it may wait
                # minutes for a slow link or a receipt): the journal and the hub's
                # have-reply resume it after a restart (docs/shutdown.md).
                worked = await unless_stopped(self._send_outbound(), stop)
                if worked is None:
                    if self._state == "uploading":
                        log.info("stopped mid-upload; a restart resumes it", step=self._step)
                    break
                if not worked:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.poll_s)
        finally:
            beats.cancel()
            await self.inbox.close()

    async def _send_outbound(self) -> bool:
        worked = await self._send_model_reports()
        return await self._send_deltas() or worked

    def _status(self) -> tuple[int, str]:
        return self._step, self._state

    # ---------------------------------------------------------------- outbound

    async def _send_deltas(self) -> bool:
        worked = False
        for delta in await asyncio.to_thread(self.spool.pending_deltas):
            structlog.contextvars.bind_contextvars(step=delta.step)
            self._step, self._state = delta.step, "uploading"
            if self._extra_delay_s:
                await asyncio.sleep(self._extra_delay_s)
            started = {"bytes_total": float(delta.size), **_finite(delta.metrics)}
            await self._event("upload_started", delta.step, started)
            with tracing.span("code", parent=delta.trace, step=delta.step):
                if self.masker is not None:
                    coded = await asyncio.to_thread(self.masker.prepare, delta)
                else:
                    coded = await asyncio.to_thread(
                        self.coder.prepare, delta, self._upload_budget_s
                    )
            if coded is None:  # fp32: the delta file, or its clipped copy (update bound)
                payload = await asyncio.to_thread(self.coder.bounded_payload, delta)
            else:
                payload = coded.payload
            report = await self.uploader.upload(
                payload,
                delta.step,
                delta.weight,
                delta.base_model_digest,
                trace=delta.trace,
                prepared=None if coded is None else (coded.manifest, coded.serialized),
            )
            self._delivered_at = time.monotonic()
            # This link's goodput, measured on its own transfers: the next choice's input.
            await asyncio.to_thread(self.coder.record_upload, report.bytes_sent, report.seconds)
            self._state = "waiting"
            metrics = {
                "upload_s": report.seconds,
                # The emulated uplink's share of it (load tests; 0 on an unlimited link).
                "upload_link_s": report.link_s,
                # Its chunk pipeline alone: first publish to last confirm.
                "upload_send_s": report.send_s,
                "bytes_sent": float(report.bytes_sent),
                "chunks_sent": float(report.chunks_sent),
                "chunks_total": float(report.chunks_total),
                **_finite(delta.metrics),
            }
            await self._event("upload_finished", delta.step, metrics)
            await asyncio.to_thread(self.spool.mark_sent, "delta", delta.step)
            await asyncio.to_thread(self.retention.after_sent)
            worked = True
        return worked

    async def _send_model_reports(self) -> bool:
        worked = False
        for report in await asyncio.to_thread(self.spool.pending_model_reports):
            msg = ModelReport(
                step=report.step,
                participant=self.settings.participant,
                model_digest=report.model_digest,
                metrics=_finite(report.metrics),
                unix_ms=now_ms(),
            )
            # Under the trainer's evaluation of this model (its context is in the file).
            with tracing.span("report", parent=report.trace, step=report.step):
                await self.bus.publish(topology.EVENTS_EXCHANGE, topology.MODEL_REPORT_KEY, msg)
            await asyncio.to_thread(self.spool.mark_sent, "model", report.step)
            worked = True
        return worked

    async def _event(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        event = Event(kind, SERVICE, self.settings.participant, step, "", metrics, now_ms())
        await self.bus.publish(
            topology.EVENTS_EXCHANGE, f"{SERVICE}.{kind}", event, mandatory=False
        )

    # ---------------------------------------------------------------- inbound

    async def _on_message(self, msg: AnyMessage) -> None:
        match msg:
            case Chunk(participant=topology.HUB_ID):
                # A child of the aggregator's broadcast of step t's update (trace t).
                with tracing.span(
                    "download", step=msg.step, index=msg.index, **{tracing.BYTES: len(msg.body)}
                ):
                    # Kept (and acked) once its last byte would have crossed the link.
                    held = await self.downlink.carry(len(msg.body))
                    if self.downlink.limited:
                        self._download_s[msg.step] = self._download_s.get(msg.step, 0.0) + held
                    await asyncio.to_thread(self._keep_update_chunk, msg)
            case StepReleased():
                await self._on_release(msg)

    def _keep_update_chunk(self, chunk: Chunk) -> None:
        if digest_of(chunk.body) != chunk.digest:
            raise IntegrityError(f"update chunk {chunk.index} does not match its digest")
        self.downloads.put(chunk.digest, chunk.body)

    async def _on_release(self, release: StepReleased) -> None:
        structlog.contextvars.bind_contextvars(step=release.step)
        self._step, self._state = release.step, "done" if release.final else "training"
        # A child of the barrier's release span; the trainer's spans for this step hang
        # under it (its context goes into the release file).
        with tracing.span("receive_release", step=release.step, final=release.final or None):
            await self._write_release(release)
        waited = None if self._delivered_at is None else time.monotonic() - self._delivered_at
        metrics = {"wait_s": waited or 0.0}
        # The update released with step t is step t-1's; older entries are done with too.
        held = self._download_s.pop(release.step - 1, None)
        self._download_s = {k: v for k, v in self._download_s.items() if k >= release.step}
        if held is not None:
            metrics["download_s"] = held
        log.info(
            "step released",
            model=short(release.model_digest),
            waited_s=waited,
            download_s=metrics.get("download_s"),
        )
        await self._event("release_received", release.step, metrics)

    async def _write_release(self, release: StepReleased) -> None:
        update = None
        if release.update_manifest:
            update = decode("foldfed.v1.DeltaManifest", release.update_manifest)
            assert isinstance(update, Manifest)
        # A release redelivered after its file was written (a crash before the ack) is
        # done: its update's chunks may be deleted already (docs/retention.md).
        if not await asyncio.to_thread(self.spool.release_path(release.step).exists):
            await self._write_release_files(release, update)
        await asyncio.to_thread(self.retention.after_release, release.step, update)

    async def _write_release_files(self, release: StepReleased, update: Manifest | None) -> None:
        update_path: Path | None = None
        update_trace: tracing.Carrier = {}
        # What delta t must be coded with: before the release file, which starts training.
        await asyncio.to_thread(self.coder.remember, release, update)
        if release.update_manifest:
            # U_{t-1} belongs to step t-1's trace (its context is in a header of its own).
            parent = tracing.incoming_carrier(tracing.UPDATE_TRACEPARENT) or tracing.CURRENT
            with tracing.span("assemble", parent=parent, step=release.step - 1):
                update_path = await asyncio.to_thread(self._assemble_update, release)
                update_trace = tracing.carrier()
        await asyncio.to_thread(
            self.spool.write_release,
            release.step,
            release.model_digest,
            update_path,
            release.final,
            trace=tracing.carrier(),
            update_trace=update_trace,
            # The trainer declares it as its delta's weight: the hub rejects any other.
            weight=release.agreed_weights().get(self.settings.participant),
        )

    def _assemble_update(self, release: StepReleased) -> Path:
        """Write the global update from downloaded chunks, verifying every one of them.
        A missing chunk raises: the release is retried (and logged) until it is there."""
        manifest = decode("foldfed.v1.DeltaManifest", release.update_manifest)
        assert isinstance(manifest, Manifest)
        path = self.spool.update_path(release.step)
        for index, digest in enumerate(manifest.chunk_digests):
            if not self.downloads.has(digest):
                raise IntegrityError(f"update chunk {index} ({short(digest)}) not received")
        if manifest.coded:
            chunks = [self.downloads.get(d) for d in manifest.chunk_digests]
            decode_update(manifest, chunks, path)
            return path
        tmp = path.with_name(f".{path.name}.tmp")  # spool readers skip dot-names
        with open(tmp, "wb") as out:
            for digest in manifest.chunk_digests:
                out.write(self.downloads.get(digest))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return path


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The wire refuses non-finite numbers (a NaN would void the digest check with it):
    a diverged metric is logged here and left out."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        log.warning("non-finite metrics left out of the report", metrics=bad)
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


async def run_uploader(settings: UploaderSettings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings.bus, name=f"{SERVICE}-{settings.participant}")
    try:
        await UploaderService(settings, bus).run(stop)
    finally:
        await bus.close()

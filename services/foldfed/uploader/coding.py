"""The participant's codec work, both directions: Δ_t + residual out, the coded update in.

Uplink (`UplinkCoder.prepare`). For delta t under the step's coding (what release t
announced: the cycle's spec and seed, the step's shared ranges):

    x = Δ_t + e_{t-1};  chunks = encode(x);  e_t = x - decode(chunks)

with Δ_t the trainable tensors of the trainer's delta file, flattened in file (canonical,
= manifest) order as float32. Durable order (codecs/feedback.py): the coded chunks
(`coding/delta-<t>.coded`) and the manifest bytes (`coding/delta-<t>.manifest`) first,
each atomically, then the residual `coding/uplink.residual` tagged t: the commit point. A
restart before it encodes again from the same Δ_t and e_{t-1}, which gives the same bytes
(the same manifest id); after it, the stored manifest and chunks are sent and the residual
is never added twice. The manifest carries Δ_t's block statistics (not x's) when the codec
shares ranges: the hub makes step t+1's ranges from them.

Downlink (`decode_update`). A coded global update is decoded (direction "down", sender
"hub") and written as the canonical safetensors file of d_t, so the trainer applies it
unchanged, and holds bit-identically the θ the hub made from the same d_t.

`pick_spec` is the one place the uplink spec is chosen: with an upload budget
(`FOLDFED_UPLOAD_BUDGET_S`), the least lossy spec the cycle allows whose upload fits it at
this link's measured goodput (`coding/goodput.json`, smoothed over uploads, kept across
restarts), logged with the reason (codecs/adaptive.py; docs/format.md 14.8).
Update bounds: what the hub will decode is measured, refused or clipped before anything
is sent (uploader/bounding.py; docs/format.md, "Update bounds").
No torch here: numpy, the pure codecs, and files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from foldfed.aggregation.dtypes import decode_narrow, from_float64
from foldfed.chunkstore import ChunkStore
from foldfed.codecs import (
    ChunkPlan,
    CodecChoice,
    CodecContext,
    Goodput,
    ResidualAlreadyApplied,
    SharedRanges,
    block_stats,
    carried,
    choose_for_cycle,
    codec_from_spec,
    decode_vector,
    plan_chunks,
)
from foldfed.codecs.base import Codec
from foldfed.codecs.feedback import Compensated
from foldfed.codecs_store import ResidualStore
from foldfed.codedvector import (
    CycleCoding,
    chunk_plan,
    context_of,
    ranges_for,
    ranges_from_bytes,
    shared_rule,
    stats_to_bytes,
    vector_spans,
)
from foldfed.digests import digest_of, short
from foldfed.domain import CODEC_CODED_VECTOR, Manifest, StepReleased
from foldfed.durable import atomic_write
from foldfed.errors import IntegrityError, StoreError
from foldfed.faults import crash_point
from foldfed.format import TensorSpan, TensorSpec, canonical_order, encode_header
from foldfed.messages import decode, encode
from foldfed.payloadfile import read_layout
from foldfed.spool import DeltaRecord
from foldfed.uploader.bounding import encode_within, payload_within

log = structlog.get_logger(__name__)


def pick_spec(
    coding: CycleCoding, goodput: Goodput, budget_s: float, elements: int, chunk_limit: int
) -> CodecChoice | None:
    """The uplink spec for a step and why; None without a budget (the cycle's spec). The
    choice is only among the specs the cycle allows: its own and its member choices
    (codecs.allowed_specs, docs/format.md 14.8); a spec with shared ranges is the cycle's
    by construction."""
    if budget_s <= 0:
        return None
    return choose_for_cycle(
        coding.spec, goodput, budget_s, elements, chunk_limit, choices=coding.choices
    )


@dataclass(frozen=True)
class Prepared:
    """A coded delta ready to send: its manifest (canonical bytes) and payload file."""

    manifest: Manifest
    serialized: bytes
    payload: Path


class UplinkCoder:
    def __init__(
        self,
        spool_dir: Path,
        participant: str,
        chunk_limit: int,
        downloads: ChunkStore,
        *,
        clip: bool = False,
    ) -> None:
        self.folder = spool_dir / "coding"
        self.clip = clip  # FOLDFED_UPDATE_CLIP: scale down to the bound instead of refusing
        self.participant = participant
        self.chunk_limit = chunk_limit
        self.downloads = downloads
        self.residuals = ResidualStore(self.folder / "uplink.residual")

    # ---------------------------------------------------------------- the step's coding

    def remember(self, release: StepReleased, update: Manifest | None) -> None:
        """Keep what release t asks of delta t (written before the release is acked)."""
        coding = {
            "choices": list(release.codec_choices),
            "codec": release.codec,
            "cycle": release.cycle,
            "norm_bound": release.update_norm_bound,
            "participants": list(release.participants),  # the step's members (secagg masks)
            "ranges_digest": update.next_ranges_digest.hex() if update else "",
            "seed": release.codec_seed,
            "step": release.step,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._coding(release.step), json.dumps(coding, sort_keys=True).encode())

    def coding_for(self, step: int) -> CycleCoding:
        try:
            raw = json.loads(self._coding(step).read_bytes())
        except FileNotFoundError:
            return CycleCoding()  # a release from before codecs: the reference
        return CycleCoding(
            raw["codec"],
            int(raw["seed"]),
            int(raw["cycle"]),
            bytes.fromhex(raw["ranges_digest"]),
            tuple(raw.get("choices", ())),  # absent in files from before member choices
        )

    def bound_for(self, step: int) -> float:
        """Release `step`'s update bound (0.0: none, or a release from before bounds)."""
        try:
            raw = json.loads(self._coding(step).read_bytes())
        except FileNotFoundError:
            return 0.0
        return float(raw.get("norm_bound", 0.0))

    def members_for(self, step: int) -> tuple[str, ...]:
        """Release `step`'s members (() for a release not seen, or from before secagg)."""
        try:
            raw = json.loads(self._coding(step).read_bytes())
        except FileNotFoundError:
            return ()
        return tuple(raw.get("participants", ()))

    # ---------------------------------------------------------------- the link

    def goodput(self) -> Goodput:
        try:
            raw = json.loads(self._goodput().read_bytes())
            return Goodput(float(raw["bytes_per_s"]), int(raw["uploads"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return Goodput()  # never measured, or an unreadable file: measure again

    def record_upload(self, bytes_sent: int, seconds: float) -> Goodput:
        """Fold one upload into the measured goodput (kept across restarts)."""
        before = self.goodput()
        after = before.after(bytes_sent, seconds)
        if after != before:
            body = {"bytes_per_s": after.bytes_per_s, "uploads": after.uploads}
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self._goodput(), json.dumps(body, sort_keys=True).encode())
        return after

    def choose(self, delta: DeltaRecord, coding: CycleCoding, budget_s: float) -> str:
        """The spec delta t travels with; with a budget, the choice is logged and why."""
        if budget_s <= 0:
            return coding.spec  # no budget: not even the header is read
        goodput = self.goodput()
        elements = _elements(delta.path)
        choice = pick_spec(coding, goodput, budget_s, elements, self.chunk_limit)
        if choice is None:
            return coding.spec
        say = log.info if choice.fits else log.warning
        say(
            "uplink codec chosen",
            step=delta.step,
            participant=self.participant,
            goodput_bps=round(goodput.bytes_per_s),
            budget_s=budget_s,
            spec=choice.spec,
            expected_bytes=choice.wire_bytes,
            expected_s=round(choice.seconds, 3),
            fits=choice.fits,
            reason=choice.reason,
        )
        return choice.spec

    # ---------------------------------------------------------------- uplink

    def prepare(self, delta: DeltaRecord, budget_s: float = 0.0) -> Prepared | None:
        """The coded delta to send for `delta` (None: send the safetensors file as is)."""
        coding = self.coding_for(delta.step)
        spec = self.choose(delta, coding, budget_s)
        if spec == CycleCoding().spec:
            return None
        codec = codec_from_spec(spec)
        tensors, values = _read_vector(delta.path)
        residual = self.residuals.load()
        try:
            carried(residual, cycle=coding.cycle, step=delta.step, elements=values.size)
        except ResidualAlreadyApplied:
            return self._stored(delta.step)
        ranges = self._ranges(codec, coding, values.size)
        ctx = CodecContext(coding.cycle, delta.step, self.participant, "up", coding.seed, ranges)
        plan = plan_chunks(codec, values.size, self.chunk_limit)
        x = values + carried(residual, cycle=ctx.cycle, step=ctx.step, elements=values.size)
        out = self._bounded(x, codec, ctx, plan, self.bound_for(delta.step))
        stats = stats_to_bytes(block_stats(values, codec.block)) if ranges is not None else b""
        manifest = Manifest(
            step=delta.step,
            participant=self.participant,
            weight=delta.weight,
            codec=CODEC_CODED_VECTOR,
            tensors=tensors,
            chunk_size=self.chunk_limit,
            payload_size=sum(len(c) for c in out.chunks),
            chunk_digests=tuple(digest_of(c) for c in out.chunks),
            payload_digest=digest_of(b"".join(out.chunks)),
            base_model_digest=delta.base_model_digest,
            codec_spec=spec,
            cycle=coding.cycle,
            codec_seed=coding.seed,
            chunk_sizes=tuple(len(c) for c in out.chunks),
            shared_ranges_digest=coding.ranges_digest if ranges is not None else b"",
            block_stats=stats,
        )
        serialized = encode(manifest)[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._payload(delta.step), b"".join(out.chunks))
        atomic_write(self._manifest(delta.step), serialized)
        # Tests: the coded delta is durable, its residual not yet (a re-encode must match).
        crash_point("uploader", "before-residual", delta.step)
        self.residuals.save(out.residual)  # the commit point: step t is encoded
        return Prepared(manifest, serialized, self._payload(delta.step))

    def _bounded(
        self, x: np.ndarray, codec: Codec, ctx: CodecContext, plan: ChunkPlan, bound: float
    ) -> Compensated:
        """Encode x = Δ + e so that what the hub decodes is within the bound (bounding.py)."""
        return encode_within(x, codec, ctx, plan, bound, clip=self.clip)

    def bounded_payload(self, delta: DeltaRecord) -> Path:
        """The safetensors file to send for an fp32 delta: the delta itself when within
        the bound, else (clip on) a clipped copy; UpdateOverBound when clipping is off."""
        return payload_within(
            delta.path,
            self._clipped_path(delta.step),
            delta.step,
            self.bound_for(delta.step),
            self.chunk_limit,
            clip=self.clip,
        )

    def _clipped_path(self, step: int) -> Path:
        return self.folder / f"delta-{step:012d}.clipped.safetensors"

    def _ranges(self, codec: Codec, coding: CycleCoding, elements: int) -> SharedRanges | None:
        rotated = shared_rule(codec)
        if rotated is None:
            return None
        if not coding.ranges_digest:  # a cycle's first step: the spec's init ranges
            return ranges_for(codec, elements, [])
        if not self.downloads.has(coding.ranges_digest):
            raise IntegrityError(f"shared ranges {short(coding.ranges_digest)} not received")
        data = self.downloads.get(coding.ranges_digest)
        return ranges_from_bytes(data, elements, rotated.block)

    def _stored(self, step: int) -> Prepared:
        try:
            serialized = self._manifest(step).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"residual of step {step} stored without its coded delta") from None
        manifest = decode("foldfed.v1.DeltaManifest", serialized)
        assert isinstance(manifest, Manifest)
        return Prepared(manifest, serialized, self._payload(step))

    def _goodput(self) -> Path:
        return self.folder / "goodput.json"

    def _coding(self, step: int) -> Path:
        return self.folder / f"step-{step:012d}.json"

    def _payload(self, step: int) -> Path:
        return self.folder / f"delta-{step:012d}.coded"

    def _manifest(self, step: int) -> Path:
        return self.folder / f"delta-{step:012d}.manifest"


# ---------------------------------------------------------------- downlink


def decode_update(manifest: Manifest, chunks: list[bytes], path: Path) -> None:
    """Write the canonical safetensors file of the coded update `manifest` announces."""
    codec = codec_from_spec(manifest.codec_spec)
    values = decode_vector(codec, chunks, context_of(manifest, None), chunk_plan(manifest, codec))
    specs = [TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in manifest.tensors]
    spans = {t.name: t for t in manifest.tensors}
    parts = [encode_header(specs)]
    for spec in canonical_order(specs):  # the order the header lays the data out
        t = spans[spec.name]
        stored = from_float64(values[t.begin : t.end].astype(np.float64), t.dtype)
        parts.append(np.ascontiguousarray(stored).tobytes())
    atomic_write(path, b"".join(parts))


def _elements(path: Path) -> int:
    """Elements of the delta file's vector (its header only)."""
    return sum(math.prod(s.shape) for s in read_layout(path))


def _read_vector(path: Path) -> tuple[tuple[TensorSpan, ...], np.ndarray]:
    """The delta file's tensors as vector spans, and its values as one float32 vector."""
    spans = read_layout(path)
    data = path.read_bytes()
    tensors = vector_spans([(s.name, s.dtype, tuple(s.shape)) for s in spans])
    values = np.empty(tensors[-1].end if tensors else 0, dtype=np.float32)
    for span, at in zip(spans, tensors, strict=True):
        raw = decode_narrow(memoryview(data)[span.begin : span.end], span.dtype, tensor=span.name)
        values[at.begin : at.end] = raw.astype(np.float32)
    return tensors, values

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
Update bounds (docs/format.md, "Update bounds"). With the release's bound B, what the hub
will decode is measured exactly as the hub measures it (aggregation.normbound, chunk by
chunk) before anything is sent. Within B: sent as is. Above it: refused
(UpdateOverBound: the step waits for this member, the operator sees why), or, with
FOLDFED_UPDATE_CLIP, scaled down: x_c = s·x with s from the measured decoded norm, encoded
again until decode(encode(x_c)) is within B. The residual is then e_t = x_c - decode(...):
the codec error of what was sent, as always; the clipped excess (1 - s)·x is dropped, not
carried, and logged with its norm. Carrying it would make e grow without limit while a
member keeps hitting the bound and re-send the excess later, a rate limit, not a bound.
An fp32 delta above B is clipped into `coding/delta-<t>.clipped.safetensors` (the same
dtypes), measured again the same way.
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
from foldfed.aggregation.layout import ModelLayout, chunk_values
from foldfed.aggregation.normbound import (
    MAX_CLIP_ROUNDS,
    clip_scale,
    norm_of,
    sendable,
    squared_norm,
)
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
    encode_vector,
    plan_chunks,
)
from foldfed.codecs.base import Codec
from foldfed.codecs.feedback import Compensated, Residual
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
from foldfed.errors import FoldfedError, IntegrityError, StoreError
from foldfed.faults import crash_point
from foldfed.format import TensorSpan, TensorSpec, canonical_order, encode_header
from foldfed.messages import decode, encode
from foldfed.payloadfile import plan_chunks as plan_file_chunks
from foldfed.payloadfile import read_chunk, read_layout
from foldfed.spool import DeltaRecord

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


class UpdateOverBound(FoldfedError):
    """A delta decodes above the cycle's update bound and clipping is off: not sent."""


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
        """Encode x (= Δ + e), scaled down if the bound and the clip say so, so that what
        the hub decodes is within the bound; the residual is the codec error of what is
        sent (the module docstring says where the clipped excess goes)."""
        scale = clip_scale(float(np.linalg.norm(x.astype(np.float64))), bound) if self.clip else 1.0
        for _ in range(MAX_CLIP_ROUNDS):
            sent = x if scale == 1.0 else (x.astype(np.float64) * scale).astype(np.float32)
            chunks = encode_vector(codec, sent, ctx, plan)
            decoded = decode_vector(codec, chunks, ctx, plan)
            norm = norm_of([squared_norm(decoded[s.begin : s.end]) for s in plan.spans()])
            if sendable(norm, bound):
                if scale != 1.0:
                    self._log_clip(ctx.step, x, scale, norm, bound)
                return Compensated(chunks, decoded, Residual(ctx.cycle, ctx.step, sent - decoded))
            if not self.clip:
                raise UpdateOverBound(_over(ctx.step, norm, bound))
            scale *= clip_scale(norm, bound)
        raise UpdateOverBound(_over(ctx.step, norm, bound) + f" after {MAX_CLIP_ROUNDS} clips")

    def bounded_payload(self, delta: DeltaRecord) -> Path:
        """The safetensors file to send for an fp32 delta: the delta itself when within
        the bound, else (clip on) a clipped copy; UpdateOverBound when clipping is off."""
        bound = self.bound_for(delta.step)
        if bound <= 0:
            return delta.path
        norm = _file_norm(delta.path, self.chunk_limit)
        if sendable(norm, bound):
            return delta.path
        if not self.clip:
            raise UpdateOverBound(_over(delta.step, norm, bound))
        path, scale = self._clipped_path(delta.step), clip_scale(norm, bound)
        for _ in range(MAX_CLIP_ROUNDS):
            _write_scaled(delta.path, scale, path)
            clipped = _file_norm(path, self.chunk_limit)
            if sendable(clipped, bound):
                log.warning("update clipped", step=delta.step, norm=norm, sent_norm=clipped,
                            bound=bound, scale=scale, dropped_norm=norm * (1 - scale))  # fmt: skip
                return path
            scale *= clip_scale(clipped, bound)
        raise UpdateOverBound(_over(delta.step, clipped, bound) + f" after {MAX_CLIP_ROUNDS} clips")

    def _log_clip(self, step: int, x: np.ndarray, scale: float, norm: float, bound: float) -> None:
        before = float(np.linalg.norm(x.astype(np.float64)))
        log.warning(
            "update clipped",
            step=step,
            norm=before,
            sent_norm=norm,
            bound=bound,
            scale=scale,
            # Dropped, not carried into the residual (module docstring).
            dropped_norm=before * (1 - scale),
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


def _over(step: int, norm: float, bound: float) -> str:
    return (
        f"delta {step} decodes to L2 norm {norm:.6g}, over the cycle's bound {bound:.6g}: "
        "not sent (FOLDFED_UPDATE_CLIP=on scales it down to the bound)"
    )


def _file_norm(path: Path, chunk_size: int) -> float:
    """The L2 norm the hub measures of a safetensors payload, chunk by chunk."""
    plan = plan_file_chunks(path, chunk_size)
    layout = ModelLayout.from_spans(read_layout(path))
    squares = []
    for index in range(len(plan.chunk_digests)):
        body = read_chunk(path, chunk_size, index)
        values = chunk_values(layout, plan.tensors, index, chunk_size, plan.payload_size, body)
        squares.append(sum(squared_norm(v) for v in values))
    return norm_of(squares)


def _write_scaled(source: Path, scale: float, path: Path) -> None:
    """`source` with every value times `scale`, in the same dtypes and canonical layout."""
    spans = read_layout(source)
    data = source.read_bytes()
    specs = [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in spans]
    by_name = {s.name: s for s in spans}
    parts = [encode_header(specs)]
    for spec in canonical_order(specs):
        span = by_name[spec.name]
        raw = decode_narrow(memoryview(data)[span.begin : span.end], span.dtype, tensor=span.name)
        scaled = raw.astype(np.float64) * scale
        parts.append(np.ascontiguousarray(from_float64(scaled, span.dtype)).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
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

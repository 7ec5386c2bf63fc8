"""The one serde of domain messages (foldfed.domain): `encode(msg) -> (type, bytes)` and
`decode(type, bytes) -> msg`.

The rest of foldfed never touches generated pb2 classes. Decoding validates what the
protobuf schema cannot (digest lengths, finite weights, known codec) and raises
DecodeError with the raw bytes kept, so a bad message is rejected with a reason.

One concept, the proto <-> domain serde, in one module of over 400 lines: a matching
`x_to_proto` / `x_from_proto` pair per message, kept together so a field added to a .proto
file is added here once, both ways (Flower's serde module does the same).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import replace

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message as ProtobufMessage

from foldfed.digests import DIGEST_SIZE, digest_of
from foldfed.domain import (
    CODEC_CODED_VECTOR,
    CODEC_MASKED_RING,
    CODEC_SAFETENSORS,
    REFERENCE_CODEC,
    AnyMessage,
    Chunk,
    DeliveryReceipt,
    Domain,
    Event,
    FinalizeRequest,
    HaveReply,
    HaveRequest,
    Heartbeat,
    Manifest,
    ModelReport,
    StepFinalized,
    StepReleased,
)
from foldfed.errors import DecodeError
from foldfed.format import TensorSpan
from foldfed.signing import SIGNATURE_SIZE
from foldfed.v1 import delta_pb2, events_pb2, step_pb2, transfer_pb2

MANIFEST_FORMAT_VERSION = 1
_CODECS = {
    delta_pb2.CODEC_SAFETENSORS: CODEC_SAFETENSORS,
    delta_pb2.CODEC_CODED_VECTOR: CODEC_CODED_VECTOR,
    delta_pb2.CODEC_MASKED_RING: CODEC_MASKED_RING,
}
_CODEC_NUMBERS = {name: number for number, name in _CODECS.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


_EVENT_KINDS = {
    events_pb2.EVENT_KIND_REJECTED: "rejected",
    events_pb2.EVENT_KIND_UPLOAD_STARTED: "upload_started",
    events_pb2.EVENT_KIND_UPLOAD_FINISHED: "upload_finished",
    events_pb2.EVENT_KIND_DELIVERED: "delivered",
    events_pb2.EVENT_KIND_STEP_RELEASED: "step_released",
    events_pb2.EVENT_KIND_RELEASE_RECEIVED: "release_received",
    events_pb2.EVENT_KIND_MODEL_MISMATCH: "model_mismatch",
    events_pb2.EVENT_KIND_CYCLE_DONE: "cycle_done",
    events_pb2.EVENT_KIND_STEP_FINALIZED: "step_finalized",
    events_pb2.EVENT_KIND_STRAGGLER: "straggler",
    events_pb2.EVENT_KIND_SILENT: "silent",
    events_pb2.EVENT_KIND_READINESS: "readiness",
}
_EVENT_KIND_NUMBERS = {name: number for number, name in _EVENT_KINDS.items()}


def manifest_id(serialized_manifest: bytes) -> bytes:
    """What have-requests and receipts name a manifest by: blake3 of its canonical bytes."""
    return digest_of(serialized_manifest)


def id_of(m: Manifest) -> bytes:
    return manifest_id(encode(m)[1])


# ---------------------------------------------------------------- domain -> protobuf


def manifest_to_proto(m: Manifest) -> delta_pb2.DeltaManifest:
    return delta_pb2.DeltaManifest(
        format_version=MANIFEST_FORMAT_VERSION,
        step=m.step,
        participant=m.participant,
        weight=m.weight,
        codec=_CODEC_NUMBERS[m.codec],
        tensors=[
            delta_pb2.TensorLayout(
                name=t.name, dtype=t.dtype, shape=list(t.shape), begin=t.begin, end=t.end
            )
            for t in m.tensors
        ],
        chunk_size=m.chunk_size,
        payload_size=m.payload_size,
        chunk_digests=list(m.chunk_digests),
        payload_digest=m.payload_digest,
        base_model_digest=m.base_model_digest,
        codec_spec=m.codec_spec,
        cycle=m.cycle,
        codec_seed=m.codec_seed,
        chunk_sizes=list(m.chunk_sizes),
        shared_ranges_digest=m.shared_ranges_digest,
        block_stats=m.block_stats,
        next_ranges_digest=m.next_ranges_digest,
        signature=m.signature,
        ring_bits=m.ring_bits,
        attested_norm=m.attested_norm,
    )


def _to_proto(msg: AnyMessage) -> ProtobufMessage:
    match msg:
        case Manifest():
            return manifest_to_proto(msg)
        case Chunk():
            return delta_pb2.Chunk(
                step=msg.step,
                participant=msg.participant,
                index=msg.index,
                digest=msg.digest,
                body=msg.body,
            )
        case HaveRequest():
            return transfer_pb2.HaveRequest(
                step=msg.step,
                participant=msg.participant,
                manifest_id=msg.manifest_id,
                request_id=msg.request_id,
            )
        case HaveReply():
            return transfer_pb2.HaveReply(
                step=msg.step,
                participant=msg.participant,
                manifest_id=msg.manifest_id,
                request_id=msg.request_id,
                missing=list(msg.missing),
                error=msg.error,
            )
        case DeliveryReceipt():
            return transfer_pb2.DeliveryReceipt(
                step=msg.step,
                participant=msg.participant,
                manifest_id=msg.manifest_id,
                payload_digest=msg.payload_digest,
                chunk_count=msg.chunk_count,
                payload_size=msg.payload_size,
                duplicate_chunks=msg.duplicate_chunks,
                completed_unix_ms=msg.completed_unix_ms,
            )
        case StepReleased():
            return step_pb2.StepReleased(
                step=msg.step,
                model_digest=msg.model_digest,
                participants=list(msg.participants),
                released_unix_ms=msg.released_unix_ms,
                update_manifest=msg.update_manifest,
                cycle=msg.cycle,
                final=msg.final,
                # The reference is written as absent: releases of fp32 cycles keep their bytes.
                codec="" if msg.codec == REFERENCE_CODEC else msg.codec,
                codec_seed=msg.codec_seed,
                codec_choices=list(msg.codec_choices),
                weights=list(msg.weights),
                update_norm_bound=msg.update_norm_bound,
            )
        case FinalizeRequest():
            return step_pb2.FinalizeRequest(
                step=msg.step, participants=list(msg.participants), cycle=msg.cycle
            )
        case StepFinalized():
            return step_pb2.StepFinalized(
                step=msg.step,
                update_manifest=msg.update_manifest,
                model_digest=msg.model_digest,
                weight_sum=msg.weight_sum,
                finalized_unix_ms=msg.finalized_unix_ms,
            )
        case ModelReport():
            return step_pb2.ModelReport(
                step=msg.step,
                participant=msg.participant,
                model_digest=msg.model_digest,
                metrics=msg.metrics,
                unix_ms=msg.unix_ms,
            )
        case Event():
            return events_pb2.Event(
                kind=_EVENT_KIND_NUMBERS[msg.kind],
                service=msg.service,
                participant=msg.participant,
                step=msg.step,
                detail=msg.detail,
                metrics=msg.metrics,
                unix_ms=msg.unix_ms,
                subject=msg.subject,
            )
        case Heartbeat():
            return events_pb2.Heartbeat(
                service=msg.service,
                participant=msg.participant,
                step=msg.step,
                state=msg.state,
                unix_ms=msg.unix_ms,
            )
    raise TypeError(f"not a foldfed message: {type(msg).__name__}")


def encode(msg: AnyMessage) -> tuple[str, bytes]:
    """The AMQP `type` property (the protobuf's full name) and the serialized bytes.

    Serialization is deterministic so that a manifest's id is stable across processes.
    """
    proto = _to_proto(msg)
    return proto.DESCRIPTOR.full_name, proto.SerializeToString(deterministic=True)


# ---------------------------------------------------------------- protobuf -> domain


def _digest(value: bytes, what: str, *, allow_empty: bool = False) -> bytes:
    if allow_empty and not value:
        return b""
    if len(value) != DIGEST_SIZE:
        raise DecodeError(f"{what} must be {DIGEST_SIZE} bytes, got {len(value)}")
    return bytes(value)


def _agreed_weights(weights: Iterable[float], members: int) -> tuple[float, ...]:
    """A release's agreed weights: none, or one finite positive weight per participant."""
    out = tuple(float(w) for w in weights)
    if out and len(out) != members:
        raise DecodeError(f"release lists {len(out)} weights for {members} participants")
    for weight in out:
        if not (math.isfinite(weight) and weight > 0):
            raise DecodeError(f"agreed weight {weight} must be finite and > 0")
    return out


def _norm_bound(bound: float) -> float:
    """A release's update bound: 0 (none) or a finite positive L2 norm."""
    if not (math.isfinite(bound) and bound >= 0):
        raise DecodeError(f"update norm bound {bound} must be finite and >= 0")
    return float(bound)


def manifest_from_proto(p: delta_pb2.DeltaManifest) -> Manifest:
    if p.format_version != MANIFEST_FORMAT_VERSION:
        raise DecodeError(f"manifest format_version {p.format_version} is not supported")
    if p.codec not in _CODECS:
        raise DecodeError(f"manifest codec {p.codec} is not supported")
    if not (math.isfinite(p.weight) and p.weight > 0):
        raise DecodeError(f"manifest weight {p.weight} must be finite and > 0")
    return Manifest(
        step=p.step,
        participant=p.participant,
        weight=p.weight,
        codec=_CODECS[p.codec],
        tensors=tuple(
            TensorSpan(name=t.name, dtype=t.dtype, shape=tuple(t.shape), begin=t.begin, end=t.end)
            for t in p.tensors
        ),
        chunk_size=p.chunk_size,
        payload_size=p.payload_size,
        chunk_digests=tuple(_digest(d, "chunk digest") for d in p.chunk_digests),
        payload_digest=_digest(p.payload_digest, "payload_digest"),
        base_model_digest=_digest(p.base_model_digest, "base_model_digest", allow_empty=True),
        signature=_signature(p.signature),
        **_coding_fields(p),
        **_masking_fields(p),
    )


def _masking_fields(p: delta_pb2.DeltaManifest) -> dict[str, object]:
    """The masked-ring fields: required for CODEC_MASKED_RING, absent otherwise."""
    masked = p.codec == delta_pb2.CODEC_MASKED_RING
    if not masked and (p.ring_bits or p.attested_norm):
        raise DecodeError("ring_bits and attested_norm need a masked payload")
    if masked and p.ring_bits not in (32, 64):
        raise DecodeError(f"a masked manifest's ring_bits must be 32 or 64, not {p.ring_bits}")
    if masked and not (math.isfinite(p.attested_norm) and p.attested_norm >= 0):
        raise DecodeError(f"attested_norm {p.attested_norm} must be finite and >= 0")
    return {"ring_bits": p.ring_bits, "attested_norm": p.attested_norm}


def _signature(raw: bytes) -> bytes:
    if raw and len(raw) != SIGNATURE_SIZE:
        raise DecodeError(f"manifest signature has {len(raw)} bytes, not {SIGNATURE_SIZE}")
    return bytes(raw)


def unsigned_bytes(m: Manifest) -> bytes:
    """The canonical bytes of `m` with its signature empty: what its signature covers."""
    return encode(replace(m, signature=b""))[1]


def _coding_fields(p: delta_pb2.DeltaManifest) -> dict[str, object]:
    """The coded-vector fields: required for CODEC_CODED_VECTOR, absent otherwise."""
    coded = p.codec == delta_pb2.CODEC_CODED_VECTOR
    if coded and not p.codec_spec:
        raise DecodeError("a coded-vector manifest must name its codec_spec")
    if not coded and (p.codec_spec or p.chunk_sizes or p.shared_ranges_digest or p.block_stats):
        raise DecodeError("codec_spec, chunk_sizes, ranges and statistics need a coded vector")
    return {
        "codec_spec": p.codec_spec,
        "cycle": p.cycle,
        "codec_seed": p.codec_seed,
        "chunk_sizes": tuple(p.chunk_sizes),
        "shared_ranges_digest": _digest(
            p.shared_ranges_digest, "shared_ranges_digest", allow_empty=True
        ),
        "block_stats": bytes(p.block_stats),
        "next_ranges_digest": _digest(p.next_ranges_digest, "next_ranges_digest", allow_empty=True),
    }


def _from_proto(p: ProtobufMessage) -> AnyMessage:
    match p:
        case delta_pb2.DeltaManifest():
            return manifest_from_proto(p)
        case delta_pb2.Chunk():
            return Chunk(
                step=p.step,
                participant=p.participant,
                index=p.index,
                digest=_digest(p.digest, "chunk digest"),
                body=p.body,
            )
        case transfer_pb2.HaveRequest():
            return HaveRequest(
                step=p.step,
                participant=p.participant,
                manifest_id=_digest(p.manifest_id, "manifest_id"),
                request_id=p.request_id,
            )
        case transfer_pb2.HaveReply():
            return HaveReply(
                step=p.step,
                participant=p.participant,
                manifest_id=_digest(p.manifest_id, "manifest_id"),
                request_id=p.request_id,
                missing=tuple(p.missing),
                error=p.error,
            )
        case transfer_pb2.DeliveryReceipt():
            return DeliveryReceipt(
                step=p.step,
                participant=p.participant,
                manifest_id=_digest(p.manifest_id, "manifest_id"),
                payload_digest=_digest(p.payload_digest, "payload_digest"),
                chunk_count=p.chunk_count,
                payload_size=p.payload_size,
                duplicate_chunks=p.duplicate_chunks,
                completed_unix_ms=p.completed_unix_ms,
            )
        case step_pb2.StepReleased():
            return StepReleased(
                step=p.step,
                model_digest=_digest(p.model_digest, "model_digest", allow_empty=True),
                participants=tuple(p.participants),
                released_unix_ms=p.released_unix_ms,
                update_manifest=p.update_manifest,
                cycle=p.cycle,
                final=p.final,
                codec=p.codec or REFERENCE_CODEC,
                codec_seed=p.codec_seed,
                codec_choices=tuple(p.codec_choices),
                weights=_agreed_weights(p.weights, len(p.participants)),
                update_norm_bound=_norm_bound(p.update_norm_bound),
            )
        case step_pb2.FinalizeRequest():
            return FinalizeRequest(step=p.step, participants=tuple(p.participants), cycle=p.cycle)
        case step_pb2.StepFinalized():
            if not math.isfinite(p.weight_sum):
                raise DecodeError(f"weight_sum {p.weight_sum} is not finite")
            return StepFinalized(
                step=p.step,
                update_manifest=p.update_manifest,
                model_digest=_digest(p.model_digest, "model_digest"),
                weight_sum=p.weight_sum,
                finalized_unix_ms=p.finalized_unix_ms,
            )
        case step_pb2.ModelReport():
            if not all(math.isfinite(v) for v in p.metrics.values()):
                raise DecodeError("model report metrics must be finite")
            return ModelReport(
                step=p.step,
                participant=p.participant,
                model_digest=_digest(p.model_digest, "model_digest"),
                metrics=dict(p.metrics),
                unix_ms=p.unix_ms,
            )
        case events_pb2.Event():
            if p.kind not in _EVENT_KINDS:
                raise DecodeError(f"unknown event kind {p.kind}")
            return Event(
                kind=_EVENT_KINDS[p.kind],
                service=p.service,
                participant=p.participant,
                step=p.step,
                detail=p.detail,
                metrics=dict(p.metrics),
                unix_ms=p.unix_ms,
                subject=p.subject,
            )
        case events_pb2.Heartbeat():
            return Heartbeat(
                service=p.service,
                participant=p.participant,
                step=p.step,
                state=p.state,
                unix_ms=p.unix_ms,
            )
    raise TypeError(type(p).__name__)


_PROTO_BY_TYPE: dict[str, type[ProtobufMessage]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        delta_pb2.DeltaManifest,
        delta_pb2.Chunk,
        transfer_pb2.HaveRequest,
        transfer_pb2.HaveReply,
        transfer_pb2.DeliveryReceipt,
        step_pb2.StepReleased,
        step_pb2.FinalizeRequest,
        step_pb2.StepFinalized,
        step_pb2.ModelReport,
        events_pb2.Event,
        events_pb2.Heartbeat,
    )
}


def decode(type_name: str | None, data: bytes) -> AnyMessage:
    """Parse a wire message by its AMQP `type`; DecodeError (raw bytes kept) if bad."""
    cls = _PROTO_BY_TYPE.get(type_name or "")
    if cls is None:
        raise DecodeError(f"unknown message type {type_name!r}", data)
    proto = cls()
    try:
        proto.ParseFromString(data)
    except ProtobufDecodeError as exc:
        raise DecodeError(f"malformed {type_name}: {exc}", data) from None
    try:
        return _from_proto(proto)
    except DecodeError as exc:
        raise DecodeError(str(exc), data) from None


__all__ = [
    "CODEC_SAFETENSORS",
    "AnyMessage",
    "Chunk",
    "DeliveryReceipt",
    "Domain",
    "Event",
    "FinalizeRequest",
    "HaveReply",
    "HaveRequest",
    "Heartbeat",
    "Manifest",
    "ModelReport",
    "StepFinalized",
    "StepReleased",
    "decode",
    "encode",
    "id_of",
    "manifest_id",
    "now_ms",
    "unsigned_bytes",
]

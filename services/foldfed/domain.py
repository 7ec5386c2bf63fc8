"""The messages services exchange, as plain frozen dataclasses.

Pure: no protobuf here (foldfed.messages converts), so the core logic that checks and
uses these can be tested and imported without the wire code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foldfed.format import ChunkPlan, TensorSpan

CODEC_SAFETENSORS = "safetensors"
# A flat float32 vector coded chunk by chunk (foldfed.codedvector, docs/format.md).
CODEC_CODED_VECTOR = "coded-vector"
# Secure aggregation: fixed-point words plus pairwise masks on a ring (foldfed.secagg).
CODEC_MASKED_RING = "masked-ring"
# The cycle codec whose payload is the safetensors file: the exact reference.
REFERENCE_CODEC = "fp32:v1"


@dataclass(frozen=True)
class Manifest:
    step: int
    participant: str
    weight: float
    codec: str
    tensors: tuple[TensorSpan, ...]
    chunk_size: int
    payload_size: int
    chunk_digests: tuple[bytes, ...]
    payload_digest: bytes
    base_model_digest: bytes = b""
    # CODEC_CODED_VECTOR only (docs/format.md, "Coded payloads"); empty or 0 otherwise.
    codec_spec: str = ""
    cycle: int = 0
    codec_seed: int = 0
    chunk_sizes: tuple[int, ...] = ()
    shared_ranges_digest: bytes = b""
    block_stats: bytes = b""
    # Hub manifests: the digest of the next step's shared ranges (a broadcast chunk).
    next_ranges_digest: bytes = b""
    # The sender's Ed25519 signature over the manifest without it (foldfed.audit.signatures);
    # b"" when unsigned.
    signature: bytes = b""
    # CODEC_MASKED_RING only (docs/format.md, "Masked payloads"); 0 otherwise.
    ring_bits: int = 0
    attested_norm: float = 0.0

    @property
    def coded(self) -> bool:
        return self.codec == CODEC_CODED_VECTOR

    @property
    def masked(self) -> bool:
        return self.codec == CODEC_MASKED_RING


def manifest_of(
    plan: ChunkPlan, *, step: int, participant: str, weight: float, base_model_digest: bytes
) -> Manifest:
    """The manifest announcing a payload cut by payloadfile.plan_chunks."""
    return Manifest(
        step=step,
        participant=participant,
        weight=weight,
        codec=CODEC_SAFETENSORS,
        tensors=plan.tensors,
        chunk_size=plan.chunk_size,
        payload_size=plan.payload_size,
        chunk_digests=plan.chunk_digests,
        payload_digest=plan.payload_digest,
        base_model_digest=base_model_digest,
    )


@dataclass(frozen=True)
class Chunk:
    step: int
    participant: str
    index: int
    digest: bytes
    body: bytes


@dataclass(frozen=True)
class HaveRequest:
    step: int
    participant: str
    manifest_id: bytes
    request_id: str


@dataclass(frozen=True)
class HaveReply:
    step: int
    participant: str
    manifest_id: bytes
    request_id: str
    missing: tuple[int, ...]
    error: str = ""


@dataclass(frozen=True)
class DeliveryReceipt:
    step: int
    participant: str
    manifest_id: bytes
    payload_digest: bytes
    chunk_count: int
    payload_size: int
    duplicate_chunks: int
    completed_unix_ms: int


@dataclass(frozen=True)
class StepReleased:
    step: int
    model_digest: bytes
    participants: tuple[str, ...]
    released_unix_ms: int = 0
    update_manifest: bytes = b""
    cycle: int = 0
    final: bool = False
    codec: str = REFERENCE_CODEC  # the cycle's uplink codec spec
    codec_seed: int = 0
    codec_choices: tuple[str, ...] = ()  # per-member specs a member may send instead
    # The cycle's agreed weight of each participant, in `participants` order (() = none).
    weights: tuple[float, ...] = ()
    # The cycle's L2-norm bound on each member's decoded delta (0.0 = none; docs/format.md,
    # "Update bounds").
    update_norm_bound: float = 0.0

    def agreed_weights(self) -> dict[str, float]:
        """Participant -> the weight its manifests must declare ({} when none is fixed)."""
        if not self.weights:
            return {}
        return dict(zip(self.participants, self.weights, strict=True))


@dataclass(frozen=True)
class FinalizeRequest:
    step: int
    participants: tuple[str, ...]
    cycle: int = 0


@dataclass(frozen=True)
class StepFinalized:
    step: int
    update_manifest: bytes
    model_digest: bytes
    weight_sum: float
    finalized_unix_ms: int = 0


@dataclass(frozen=True)
class ModelReport:
    step: int
    participant: str
    model_digest: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    unix_ms: int = 0


@dataclass(frozen=True)
class Event:
    # One of messages._EVENT_KINDS: "rejected", "upload_started", "upload_finished",
    # "release_received", "step_released", "step_finalized", "model_mismatch", "cycle_done",
    # "straggler", "silent" (the last two from the monitor), "readiness" (`foldfed gate`).
    kind: str
    service: str
    participant: str
    step: int
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    unix_ms: int = 0
    # For "rejected": the refused message's AMQP message_id ("" if unknown).
    subject: str = ""


@dataclass(frozen=True)
class Heartbeat:
    service: str
    participant: str
    step: int
    state: str
    unix_ms: int = 0


Domain = (
    Manifest
    | Chunk
    | HaveRequest
    | HaveReply
    | DeliveryReceipt
    | StepReleased
    | FinalizeRequest
    | StepFinalized
    | ModelReport
    | Event
)
AnyMessage = Domain | Heartbeat

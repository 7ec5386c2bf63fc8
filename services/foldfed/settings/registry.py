"""The registry: every environment variable foldfed reads, declared once.

One concept, hence the length: each field of `Settings` is one variable, with its name
(spelled out in full, so a grep finds every reader), type, default, constraint, one-line
doc and the roles that read it. Parsing (`parse.py`) and README's table (`readme.py`) are
views of these declarations and add none of their own.

A variable that only some roles need (`FOLDFED_AMQP_URL`, `FOLDFED_PARTICIPANT`,
`FOLDFED_INITIAL_MODEL`, ...) is optional here; a service demands it with
`settings.required`. A default computed from other settings is None here, and `shown` says
in README what the service computes.

The monitor's window is `FOLDFED_MONITOR_WINDOW` (the name the code has always read, and
docs/monitor.md's): W is the window of the projection and the ETA too, not only of the
straggler rule. README once said `FOLDFED_MONITOR_STRAGGLER_WINDOW`, which nothing read;
no alias is kept for a name that never worked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from foldfed.codecs import codec_from_spec
from foldfed.codedvector import shared_rule
from foldfed.errors import CodecError
from foldfed.format import DEFAULT_CHUNK_SIZE, validate_chunk_size
from foldfed.topology import is_valid_participant_id

ROLES = (
    "all", "hub", "participant", "aggregator", "barrier", "ingest", "monitor", "trainer",
    "uploader", "cli", "demo", "loadtest", "localbroker", "tests",
)  # fmt: skip
# Spellings of a switch; env_for writes the first of each.
ON = ("on", "1", "true")
OFF = ("off", "0", "false")


# ---------------------------------------------------------------------- value types


@dataclass(frozen=True)
class Label:
    """How README names a type that a validator, not the annotation, defines."""

    text: str


def _switch(raw: object) -> object:
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in ON + OFF:
            return word in ON
        raise ValueError("must be on or off")
    return raw


def _participant_id(name: str) -> str:
    if not is_valid_participant_id(name):
        raise ValueError(f"{name!r} is not a valid participant id")
    return name


def _participant_list(raw: object) -> object:
    # Order and repeats carry no meaning: the cycle is a set, kept sorted.
    if isinstance(raw, str):
        raw = sorted({name.strip() for name in raw.split(",") if name.strip()})
        if not raw:
            raise ValueError("names no participant")
    return raw


def _member_weights(raw: object) -> object:
    # "org-a=2,org-b=1" -> (("org-a", 2.0), ("org-b", 1.0)), sorted by name like the cycle.
    if not isinstance(raw, str):
        return raw
    pairs: dict[str, float] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, number = item.partition("=")
        name = _participant_id(name.strip())
        try:
            weight = float(number) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{item!r}: expected member=weight, a finite weight > 0")
        if name in pairs:
            raise ValueError(f"{name!r} is listed twice")
        pairs[name] = weight
    return tuple(sorted(pairs.items()))


def _chunk_size(size: int) -> int:
    try:
        validate_chunk_size(size)
    except CodecError as exc:
        raise ValueError(str(exc)) from None
    return size


Switch = Annotated[bool, BeforeValidator(_switch), Label("`on` or `off`")]
MemberWeights = Annotated[
    tuple[tuple[str, float], ...],
    NoDecode,
    BeforeValidator(_member_weights),
    Label("`member=weight`, comma-separated"),
]
ParticipantId = Annotated[str, AfterValidator(_participant_id), Label("participant id")]
Participants = Annotated[
    tuple[ParticipantId, ...],
    NoDecode,
    BeforeValidator(_participant_list),
    Label("participant ids, comma-separated"),
]


def _shaped(pattern: str, expected: str) -> Any:
    """A text that must match `pattern` (whole), else "expected <expected>"."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"expected {expected}")
        return value

    return AfterValidator(check)


# RabbitMQ 3.10's own parser of disk_free_limit (rabbit_resource_monitor_misc): a value it
# cannot parse is only logged and the limit falls back to 50MB, so it is refused here.
DiskLimit = Annotated[
    str,
    BeforeValidator(lambda raw: raw.strip() if isinstance(raw, str) else raw),
    _shaped(
        r"[0-9]+(kB|KB|MB|GB|kb|mb|gb|Kb|Mb|Gb|kiB|KiB|MiB|GiB|kib|mib|gib|KIB|MIB|GIB|k|K|m|M|g|G)?",
        "bytes or a size such as 1GB, 500MB, 2GiB",
    ),
    Label("size, e.g. `1GB`"),
]
CrashPoint = Annotated[
    str,
    _shaped(r"[a-z0-9_-]+:[a-z0-9_.-]+(@[0-9]+)?", "<service>:<point>[@<step>]"),
    Label("`<service>:<point>[@<step>]`"),
]
FinetuneMode = Annotated[
    str,
    _shaped(r"all|confidence|prefixes:.*", "all, confidence or prefixes:a.b,c.d"),
    Label("`all`, `confidence` or `prefixes:a.b,c.d`"),
]
ChunkSize = Annotated[
    int, AfterValidator(_chunk_size), Label("integer, 1 to 16 MiB, a multiple of 8")
]
# The choices of a Literal setting, declared here once; the code that acts on them takes
# its list from these (`typing.get_args`).
LocalOptimizer = Literal["adamw", "sgd"]
Of3Eval = Literal["heldout", "global", "both", "none"]
QueueType = Literal["classic", "quorum"]


def _codec_spec(spec: str) -> str:
    _from_spec(spec)  # CodecError names what is wrong
    return spec


def _downlink_spec(spec: str) -> str:
    if shared_rule(_from_spec(spec)) is not None:
        raise ValueError("the downlink codes with the hub's own ranges: use scale=block")
    return spec


def _from_spec(spec: str) -> object:
    try:
        return codec_from_spec(spec)
    except CodecError as exc:
        raise ValueError(str(exc)) from None


def _spec_list(raw: object) -> object:
    # Specs hold ';', '=', ':' and '+', never ',': a comma separates them.
    if isinstance(raw, str):
        return tuple(spec.strip() for spec in raw.split(",") if spec.strip())
    return raw


def _member_choice(spec: str) -> str:
    codec = _from_spec(spec)
    if spec == "fp32:v1" or getattr(codec, "linear_shared", False):
        raise ValueError(
            f"{spec!r}: a member choice is a coded spec without shared ranges (not fp32:v1)"
        )
    return spec


CodecSpec = Annotated[
    str, AfterValidator(_codec_spec), Label("codec spec, e.g. `fp32:v1` (docs/format.md)")
]
MemberChoices = Annotated[
    tuple[Annotated[str, AfterValidator(_member_choice)], ...],
    NoDecode,
    BeforeValidator(_spec_list),
    Label("codec specs without shared ranges, comma-separated"),
]
DownlinkSpec = Annotated[
    str, AfterValidator(_downlink_spec), Label("codec spec without shared ranges")
]


def _var(
    name: str, default: Any, roles: str, doc: str, shown: str | None = None, **limits: Any
) -> Any:
    """One variable: `roles` space-separated (see ROLES); `shown` is README's default when
    the real one is computed from other settings."""
    extra = {"roles": roles.split(), "shown": shown}
    return Field(default, validation_alias=name, description=doc, json_schema_extra=extra, **limits)


# ---------------------------------------------------------------------- the registry


class Settings(BaseSettings):
    """Every variable, typed and frozen. Build it with `settings.load`, never directly."""

    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True
    )

    # --- the federation
    amqp_url: str | None = _var(
        "FOLDFED_AMQP_URL", None, "all",
        "broker URL; its user is the identity RabbitMQ stamps on every message",
    )  # fmt: skip
    participants: Participants | None = _var(
        "FOLDFED_PARTICIPANTS", None, "hub trainer", "the participant ids of the cycle"
    )
    participant: ParticipantId | None = _var(
        "FOLDFED_PARTICIPANT", None, "participant", "this participant's id (= its broker user)"
    )
    participant_index: int | None = _var(
        "FOLDFED_PARTICIPANT_INDEX", None, "trainer",
        "this site's data shard; pin it to keep the shard when the participant list changes",
        shown="its place in `FOLDFED_PARTICIPANTS`", ge=0,
    )  # fmt: skip
    state_dir: Path = _var(
        "FOLDFED_STATE_DIR", Path("var/hub"), "hub", "chunk store and SQLite state"
    )
    spool_dir: Path | None = _var(
        "FOLDFED_SPOOL_DIR", None, "participant", "the spool shared by trainer and uploader",
        shown="`var/spool/<participant>`",
    )  # fmt: skip
    initial_model: Path | None = _var(
        "FOLDFED_INITIAL_MODEL", None, "all",
        "θ₀, a canonical safetensors file every party starts from",
    )  # fmt: skip
    steps: int = _var("FOLDFED_STEPS", 5, "barrier monitor", "global steps in the cycle (R)", ge=1)
    first_step: int = _var("FOLDFED_FIRST_STEP", 1, "hub", "the cycle's first global step", ge=0)
    member_weights: MemberWeights = _var(
        "FOLDFED_MEMBER_WEIGHTS", (), "barrier",
        "each member's aggregation weight for the cycle, announced with every release;"
        " a manifest declaring another is rejected (docs/format.md, \"Agreed weights\")",
        shown="4096 for every member (equal)",
    )  # fmt: skip
    update_norm_bound: float = _var(
        "FOLDFED_UPDATE_NORM_BOUND", 0.0, "barrier",
        "the cycle's bound on the L2 norm of each member's delta as the hub decodes it,"
        " announced with every release; the hub rejects a delta above it (0 = off;"
        " docs/format.md, \"Update bounds\")",
        ge=0.0, allow_inf_nan=False,
    )  # fmt: skip
    cycle: int = _var(
        "FOLDFED_CYCLE", 1, "barrier",
        "a value above the stored, finished cycle starts that cycle (with FOLDFED_FIRST_STEP"
        " ≥ R+2 and FOLDFED_INITIAL_MODEL = the previous final model): where late joiners"
        " are admitted",
        ge=1,
    )  # fmt: skip

    gated_cycles: Switch = _var(
        "FOLDFED_GATED_CYCLES", False, "barrier",
        "the barrier starts each cycle by itself with exactly the roster"
        " (`FOLDFED_PARTICIPANTS`) members whose signed readiness record reached it before"
        " the deadline (docs/operating-model.md, \"Gated cycles\"); off: the settings"
        " start cycles",
    )  # fmt: skip
    consortium_keyring: Path | None = _var(
        "FOLDFED_CONSORTIUM_KEYRING", None, "barrier",
        "the consortium's keyring.json; readiness records must verify against it"
        " (needed with `FOLDFED_GATED_CYCLES`)",
    )  # fmt: skip
    gate_window_s: float = _var(
        "FOLDFED_GATE_WINDOW_S", 3600.0, "barrier",
        "gated cycles: the deadline is this long after the previous cycle ended (or the"
        " first start); with too few members gated it moves on by as much again",
        gt=0.0, allow_inf_nan=False,
    )  # fmt: skip
    gate_min_members: int = _var(
        "FOLDFED_GATE_MIN_MEMBERS", 2, "barrier",
        "gated cycles: the fewest members a cycle starts with", ge=1,
    )  # fmt: skip
    split_reference_hash: str = _var(
        "FOLDFED_SPLIT_REFERENCE_HASH", "", "barrier",
        "gated cycles: the consortium's blind-split reference hash (`foldfed data"
        " split-reference`); a readiness record reporting another is not admitted; empty:"
        " not checked",
        pattern=r"^([0-9a-f]{64})?$",
    )  # fmt: skip

    # --- transfer
    chunk_size: ChunkSize = _var(
        "FOLDFED_CHUNK_SIZE", DEFAULT_CHUNK_SIZE, "uploader aggregator",
        "chunk size in bytes of deltas and of the global update",
    )  # fmt: skip
    codec: CodecSpec = _var(
        "FOLDFED_CODEC", "fp32:v1", "barrier",
        "the cycle's uplink codec spec, announced with every release; `fp32:v1` sends exact"
        " safetensors payloads (docs/format.md, \"Codec specs\")",
    )  # fmt: skip
    codec_choices: MemberChoices = _var(
        "FOLDFED_CODEC_CHOICES", (), "barrier",
        "member choices: per-member codec specs a member may send instead of the cycle's when"
        " its upload budget needs them, announced with every release (docs/format.md 14.8)",
        shown="none",
    )  # fmt: skip
    downlink_codec: DownlinkSpec = _var(
        "FOLDFED_DOWNLINK_CODEC", "fp32:v1", "aggregator",
        "the global update's codec spec, coded with the hub's error feedback (no shared"
        " ranges)",
    )  # fmt: skip
    progressive_finalize: Switch = _var(
        "FOLDFED_PROGRESSIVE_FINALIZE", True, "aggregator",
        "finalize and broadcast the global update chunk by chunk while the deltas still"
        " arrive (same bytes; only steps with no update bound; docs/format.md, \"Progressive"
        " finalize\")",
    )  # fmt: skip
    codec_seed: int = _var(
        "FOLDFED_CODEC_SEED", 0, "barrier",
        "the cycle's codec seed: names the codecs' random streams (rotation, rounding)",
        ge=0, lt=1 << 63,
    )  # fmt: skip
    rate_limit_bps: int = _var(
        "FOLDFED_RATE_LIMIT_BPS", 0, "uploader", "token-bucket rate limit in bytes/s (0 = none)",
        ge=0,
    )  # fmt: skip
    download_rate_limit_bps: int = _var(
        "FOLDFED_DOWNLOAD_RATE_LIMIT_BPS", 0, "uploader",
        "link emulation for load tests: the global update's chunks are received at most at"
        " this rate in bytes/s, each kept once its last byte would have arrived (0 = off)",
        ge=0,
    )  # fmt: skip
    upload_budget_s: float = _var(
        "FOLDFED_UPLOAD_BUDGET_S", 0.0, "uploader",
        "seconds per step an upload may take: with the measured goodput, the least lossy"
        " codec the cycle allows that fits is used and the choice logged (0 = off;"
        " docs/format.md 14.8)",
        ge=0.0,
    )  # fmt: skip
    update_clip: Switch = _var(
        "FOLDFED_UPDATE_CLIP", False, "uploader",
        "with an update bound: scale a delta down to the bound instead of refusing to send it"
        " (the clipped excess is dropped, not carried; docs/format.md, \"Update bounds\")",
    )  # fmt: skip
    inflight_window: int = _var(
        "FOLDFED_INFLIGHT_WINDOW", 8, "all", "unconfirmed publishes at once", ge=1
    )
    # Classic: one node, today's queues. Quorum: replicated over a cluster's nodes
    # (docs/rabbitmq.md, "A local cluster"); a queue's type is fixed when it is declared.
    queue_type: QueueType = _var(
        "FOLDFED_QUEUE_TYPE", "classic", "hub",
        "type of the hub's queues: `classic` (one node) or `quorum` (replicated over a"
        " RabbitMQ cluster); change it only on an empty broker",
    )  # fmt: skip
    publish_timeout_s: float = _var(
        "FOLDFED_PUBLISH_TIMEOUT_S", 30.0, "all", "no confirm within this ⇒ \"broker blocked\"",
        ge=0.1,
    )  # fmt: skip
    reply_timeout_s: float = _var(
        "FOLDFED_REPLY_TIMEOUT_S", 30.0, "uploader",
        "seconds to wait for the hub's answer before asking again", ge=0.1,
    )  # fmt: skip
    receipt_timeout_s: float = _var(
        "FOLDFED_RECEIPT_TIMEOUT_S", 120.0, "uploader",
        "seconds to wait for the hub's receipt of a delta before asking again", ge=0.1,
    )  # fmt: skip
    poll_s: float = _var(
        "FOLDFED_POLL_S", 0.2, "trainer uploader", "spool poll interval, seconds", ge=0.001
    )
    uploader_extra_delay_s: float = _var(
        "FOLDFED_UPLOADER_EXTRA_DELAY_S", 0.0, "uploader tests",
        "(tests only) sleep before each upload: a participant slower by a known amount", ge=0.0,
    )  # fmt: skip

    # --- the hub
    prefetch: int = _var("FOLDFED_PREFETCH", 8, "ingest aggregator", "AMQP prefetch", ge=1)
    ingest_batch: int = _var(
        "FOLDFED_INGEST_BATCH", 0, "ingest aggregator",
        "most chunks made durable together (one fsync pass, one SQLite transaction, one"
        " ack); `0`: the prefetch count; `1`: one by one",
        ge=0,
    )  # fmt: skip
    max_payload_bytes: int = _var(
        "FOLDFED_MAX_PAYLOAD_BYTES", 8 << 30, "ingest aggregator",
        "largest payload a manifest may announce, bytes", ge=1,
    )  # fmt: skip
    require_sender_identity: Switch = _var(
        "FOLDFED_REQUIRE_SENDER_IDENTITY", True, "ingest aggregator",
        "check that a message's AMQP user_id is the participant it claims to come from;"
        " off only for brokers that cannot stamp it",
    )  # fmt: skip
    signing_key: Path | None = _var(
        "FOLDFED_SIGNING_KEY", None, "uploader aggregator",
        "this party's Ed25519 private key file (`foldfed keys generate`): a participant signs"
        " its manifests with it, the hub its step records (docs/threat-model.md)",
        shown="none: unsigned",
    )  # fmt: skip
    member_keys: Path | None = _var(
        "FOLDFED_MEMBER_KEYS", None, "uploader ingest aggregator",
        "the consortium keyring (`foldfed keys keyring`) with each member's public key under"
        " its participant id; when set, the hub rejects a manifest its sender did not sign;"
        " under secure aggregation a participant derives its pairwise mask keys from it",
        shown="none: signatures not checked",
    )  # fmt: skip
    secure_aggregation: Switch = _var(
        "FOLDFED_SECURE_AGGREGATION", False, "uploader ingest aggregator",
        "pairwise-masked secure aggregation: members send their fixed-point contribution"
        " plus pairwise masks, the hub sees only masked vectors and their sum (needs"
        " FOLDFED_SIGNING_KEY and FOLDFED_MEMBER_KEYS at every member; the same value at the"
        " hub and every member; docs/format.md, \"Masked payloads\")",
    )  # fmt: skip
    secagg_ring_bits: int = _var(
        "FOLDFED_SECAGG_RING_BITS", 32, "uploader ingest aggregator",
        "width of the secure-aggregation ring, 32 or 64: 32 (4 bytes per element, the size"
        " of fp32) holds a sum of w*x up to 128 in magnitude per element; 64 holds anything the"
        " grid does",
        ge=32, le=64, multiple_of=32,
    )  # fmt: skip
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = _var(
        "FOLDFED_SERVER_OPTIMIZER", "fedavg", "aggregator",
        "server optimizer: the mean delta, with server momentum, or Adam",
    )  # fmt: skip
    server_lr: float | None = _var(
        "FOLDFED_SERVER_LR", None, "aggregator", "server learning rate",
        shown="`1` (fedadam: `0.001`)", ge=0.0,
    )  # fmt: skip
    server_momentum: float = _var(
        "FOLDFED_SERVER_MOMENTUM", 0.9, "aggregator", "server momentum (fedavgm, fedadam)",
        ge=0.0,
    )  # fmt: skip

    # --- the trainer
    model: str = _var(
        "FOLDFED_MODEL", "mlp", "trainer cli",
        "model family: `mlp` (the demo task), `openfold3-tiny`, `openfold3-full`",
    )  # fmt: skip
    local_steps: int = _var(
        "FOLDFED_LOCAL_STEPS", 10, "trainer", "K: optimizer steps per global step", ge=1
    )
    grad_accum: int = _var(
        "FOLDFED_GRAD_ACCUM", 8, "trainer", "G: micro-batches per optimizer step", ge=1
    )
    micro_batch: int = _var(
        "FOLDFED_MICRO_BATCH", 32, "trainer", "samples per micro-batch (mlp)", ge=1
    )
    lr: float = _var("FOLDFED_LR", 1e-3, "trainer", "local learning rate (mlp)", gt=0.0)
    optimizer: LocalOptimizer = _var(
        "FOLDFED_OPTIMIZER", "adamw", "trainer", "local optimizer (mlp)"
    )
    seed: int = _var(
        "FOLDFED_SEED", 0, "trainer cli", "seed of θ₀ and of the local data order", ge=0
    )
    samples: int = _var(
        "FOLDFED_SAMPLES", 2048, "trainer",
        "samples of the demo task for this participant (one in five held out)", ge=5,
    )  # fmt: skip
    of3_sample: Path | None = _var(
        "FOLDFED_OF3_SAMPLE", None, "trainer",
        "OpenFold3: folder made by `foldfed data sample` (needed to train)",
    )  # fmt: skip
    of3_company: str | None = _var(
        "FOLDFED_OF3_COMPANY", None, "trainer", "OpenFold3: this site's name in the sample",
        shown="`FOLDFED_PARTICIPANT`",
    )  # fmt: skip
    of3_finetune: FinetuneMode = _var(
        "FOLDFED_OF3_FINETUNE", "all", "trainer",
        "OpenFold3: which parameters train (docs/of3_training.md)",
    )  # fmt: skip
    of3_checkpoint: Path | None = _var(
        "FOLDFED_OF3_CHECKPOINT", None, "trainer cli",
        "OpenFold3: a local checkpoint to start from (never downloaded)",
    )  # fmt: skip
    of3_overrides: str | None = _var(
        "FOLDFED_OF3_OVERRIDES", None, "trainer cli",
        "OpenFold3: a JSON object of dotted config paths to values",
    )  # fmt: skip
    of3_lr: float = _var("FOLDFED_OF3_LR", 1.8e-3, "trainer", "OpenFold3: peak lr", gt=0.0)
    of3_warmup: int = _var("FOLDFED_OF3_WARMUP", 1000, "trainer", "OpenFold3: warm-up steps", ge=0)
    of3_eval: Of3Eval = _var(
        "FOLDFED_OF3_EVAL", "heldout", "trainer",
        "OpenFold3: what is scored (docs/of3_training.md)",
    )  # fmt: skip
    eval_every: int = _var(
        "FOLDFED_EVAL_EVERY", 10, "trainer",
        "federated evaluation: score every k-th release and the final one against θ₀ on the"
        " site's held-out split (docs/federated_evaluation.md); 0: off", ge=0,
    )  # fmt: skip
    eval_local_model: Path | None = _var(
        "FOLDFED_EVAL_LOCAL_MODEL", None, "trainer",
        "federated evaluation: this site's local-only model (trainable state, safetensors),"
        " scored once as a baseline",
    )  # fmt: skip
    ddp_backend: str | None = _var(
        "FOLDFED_DDP_BACKEND", None, "trainer", "torch.distributed backend of a DDP trainer",
        shown="`nccl` with CUDA, else `gloo`",
    )  # fmt: skip
    cache_dir: Path | None = _var(
        "FOLDFED_CACHE_DIR", None, "cli", "downloads of `foldfed data` (plinder sources)",
        shown="`~/.cache/foldfed`",
    )  # fmt: skip
    test_cache: Path | None = _var(
        "FOLDFED_TEST_CACHE", None, "tests", "the OpenFold3 tests' prepared sample lives here",
        shown="`var/test-cache`",
    )  # fmt: skip

    # --- the monitor
    monitor_host: str = _var("FOLDFED_MONITOR_HOST", "0.0.0.0", "monitor", "HTTP bind address")
    monitor_port: int = _var(
        "FOLDFED_MONITOR_PORT", 8090, "monitor cli", "HTTP port (0: any free port, logged)",
        ge=0, le=65535,
    )  # fmt: skip
    monitor_url: str | None = _var(
        "FOLDFED_MONITOR_URL", None, "cli", "the monitor `foldfed status` asks",
        shown="`http://127.0.0.1:<FOLDFED_MONITOR_PORT>/`",
    )  # fmt: skip
    monitor_silent_s: float = _var(
        "FOLDFED_MONITOR_SILENT_S", 30.0, "monitor", "no heartbeat for this long: SILENT",
        ge=0.1,
    )  # fmt: skip
    monitor_straggler_margin: float = _var(
        "FOLDFED_MONITOR_STRAGGLER_MARGIN", 0.2, "monitor",
        "straggler: relative margin over the others' median time to deliver", ge=0.0,
    )  # fmt: skip
    monitor_straggler_min_s: float = _var(
        "FOLDFED_MONITOR_STRAGGLER_MIN_S", 1.0, "monitor",
        "straggler: absolute margin, seconds", ge=0.0,
    )  # fmt: skip
    monitor_window: int = _var(
        "FOLDFED_MONITOR_WINDOW", 5, "monitor",
        "W: closed steps looked at (stragglers, projection, ETA)", ge=1,
    )  # fmt: skip
    monitor_straggler_steps: int = _var(
        "FOLDFED_MONITOR_STRAGGLER_STEPS", 3, "monitor",
        "M: slow in at least M of the last W steps makes a straggler", ge=1,
    )  # fmt: skip
    monitor_tick_s: float = _var(
        "FOLDFED_MONITOR_TICK_S", 1.0, "monitor", "seconds between silence checks", ge=0.05
    )
    monitor_refresh_s: int = _var(
        "FOLDFED_MONITOR_REFRESH_S", 5, "monitor", "the dashboard's auto-refresh, seconds", ge=1
    )
    heartbeat_s: float = _var(
        "FOLDFED_HEARTBEAT_S", 5.0, "uploader", "seconds between heartbeats", ge=0.05
    )

    # --- retention (docs/retention.md)
    retain_steps: int = _var(
        "FOLDFED_RETAIN_STEPS", 1, "aggregator uploader",
        "recent steps whose deltas, updates and chunks are kept; older ones are deleted"
        " after each release (0 = keep everything, no GC). Manifests are kept for ever",
        ge=0,
    )  # fmt: skip
    retain_checkpoint_every: int = _var(
        "FOLDFED_RETAIN_CHECKPOINT_EVERY", 50, "aggregator",
        "the hub also keeps θ_t for every step t divisible by this (0 = only the latest)",
        ge=0,
    )  # fmt: skip

    # --- operations
    tracing: Switch = _var(
        "FOLDFED_TRACING", True, "all", "OpenTelemetry spans, one trace per global step"
    )
    trace_dir: Path = _var(
        "FOLDFED_TRACE_DIR", Path("var/traces"), "all cli",
        "folder of each service's span file `<service>[-<participant>].jsonl`",
    )  # fmt: skip
    otlp_endpoint: str | None = _var(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, "all",
        "also send spans over OTLP/HTTP to a collector (compose: Jaeger); other `OTEL_*`"
        " variables apply",
    )  # fmt: skip
    otlp_traces_endpoint: str | None = _var(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, "all",
        "as `OTEL_EXPORTER_OTLP_ENDPOINT`, for traces only",
    )  # fmt: skip
    health_port: int | None = _var(
        "FOLDFED_HEALTH_PORT", None, "all cli", "serve `/healthz` and `/readyz` on this port",
        shown="unset: off", ge=0, le=65535,
    )  # fmt: skip
    health_host: str = _var("FOLDFED_HEALTH_HOST", "0.0.0.0", "all", "health bind address")
    health_cache_s: float = _var(
        "FOLDFED_HEALTH_CACHE_S", 5.0, "all", "seconds a broker check is reused", ge=0.0
    )
    crash_at: CrashPoint | None = _var(
        "FOLDFED_CRASH_AT", None, "tests",
        "(tests only) that process SIGKILLs itself at this point of its code",
    )  # fmt: skip
    broker_dir: Path = _var(
        "FOLDFED_BROKER_DIR", Path("var/broker"), "cli", "data folder of `foldfed broker`"
    )
    # RabbitMQ's own default (50 MB) is far too low when single payloads are GBs: the disk
    # would fill before the alarm fires. 1GB is headroom enough for our transfers yet does
    # not alarm on a small dev disk; raise it for big runs (e.g. "5GB").
    broker_disk_free_limit: DiskLimit = _var(
        "FOLDFED_BROKER_DISK_FREE_LIMIT", "1GB", "localbroker demo tests",
        "local broker: free disk below which RabbitMQ blocks every publisher",
    )  # fmt: skip
    localbroker_dir: str | None = _var(
        "FOLDFED_LOCALBROKER_DIR", None, "localbroker",
        "(internal) marks the local broker's processes as ours; never set it",
    )  # fmt: skip
    loadtest_dir: Path = _var(
        "FOLDFED_LOADTEST_DIR", Path("var/loadtest"), "loadtest", "load-test reports"
    )
    loadtest_sim: str | None = _var(
        "FOLDFED_LOADTEST_SIM", None, "loadtest",
        "(internal) the `sim` trainer's JSON: `weight`, `elements` (θ's float32 values),"
        " `compute_s` (`{step: seconds}`)",
    )  # fmt: skip

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the values `load` passes in: no hidden read of os.environ or a .env file.
        return (init_settings,)


def as_env_text(value: Any) -> str:
    """A typed value as the environment spells it (the inverse of parsing)."""
    if isinstance(value, bool):
        return ON[0] if value else OFF[0]
    if isinstance(value, (tuple, list, set, frozenset)):
        return ",".join(f"{v[0]}={v[1]}" if isinstance(v, tuple) else str(v) for v in value)
    return str(value)

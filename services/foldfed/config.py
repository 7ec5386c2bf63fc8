"""The per-service settings objects, built from the settings registry (foldfed.settings).

Every service reads the same variables, so the demo, compose and Kubernetes cannot drift
apart. Each class here takes the fields its service needs from one parsed, validated
`foldfed.settings.Settings`, demands the variables only its role needs, and adds the
checks that look at more than one value or at the file system. A bad value raises
ConfigError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from foldfed.codecs import check_choices
from foldfed.errors import CodecError, ConfigError
from foldfed.settings import Settings, load, required, variable


def existing_initial_model(settings: Settings) -> Path:
    """FOLDFED_INITIAL_MODEL, which must name an existing file."""
    initial = required(settings.initial_model, "initial_model")
    if not initial.is_file():
        raise ConfigError(f"{variable('initial_model')}={str(initial)!r} is not a file")
    return initial


# Equal weights by default. Any equal value gives the same mean; this one keeps the grid of
# docs/format.md 9.3 fine (one step is 2^-24 / w in delta units: 2^-36 here, where 1.0
# would give 6e-8, coarse for deltas of 1e-5), and as a power of two w·x is exact.
DEFAULT_MEMBER_WEIGHT = 4096.0


def _gate_keyring(settings: Settings) -> Path | None:
    """FOLDFED_CONSORTIUM_KEYRING: required once cycles are gated, and the minimum must fit
    the roster (a cycle that can never start is a configuration error, not a wait)."""
    if not settings.gated_cycles:
        return settings.consortium_keyring
    roster = required(settings.participants, "participants")
    if settings.gate_min_members > len(roster):
        raise ConfigError(
            f"{variable('gate_min_members')}={settings.gate_min_members} but "
            f"{variable('participants')} names {len(roster)}"
        )
    return required(settings.consortium_keyring, "consortium_keyring")


def _member_weights(settings: Settings) -> tuple[tuple[str, float], ...]:
    """FOLDFED_MEMBER_WEIGHTS: empty (DEFAULT_MEMBER_WEIGHT each), or a weight for every
    participant and no one else, so that no member's weight is left to a default by a typo."""
    given = dict(settings.member_weights)
    if not given:
        return ()
    participants = set(required(settings.participants, "participants"))
    strangers, missing = sorted(set(given) - participants), sorted(participants - set(given))
    if strangers or missing:
        raise ConfigError(
            f"{variable('member_weights')} must name every participant and no one else: "
            f"unknown {strangers}, missing {missing}"
        )
    return tuple(sorted(given.items()))


def spool_dir_of(settings: Settings, participant: str) -> Path:
    """FOLDFED_SPOOL_DIR, by default var/spool/<participant>."""
    return settings.spool_dir or Path(f"var/spool/{participant}")


def amqp_user(url: str) -> str:
    """The user name in an AMQP URL: the identity RabbitMQ will stamp as user_id."""
    return unquote(urlparse(url).username or "guest")


@dataclass(frozen=True)
class BusSettings:
    amqp_url: str
    # Publishes not confirmed within this many seconds mean the broker is blocked.
    publish_timeout_s: float
    # Unconfirmed publishes allowed at once (bounds the sender's memory).
    inflight_window: int
    # The hub's queues: "classic" (one node) or "quorum" (replicated; topology.QUEUE_TYPES).
    queue_type: str = "classic"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BusSettings:
        return cls.from_settings(load(env))

    @classmethod
    def from_settings(cls, s: Settings) -> BusSettings:
        return cls(
            amqp_url=required(s.amqp_url, "amqp_url"),
            publish_timeout_s=s.publish_timeout_s,
            inflight_window=s.inflight_window,
            queue_type=s.queue_type,
        )


@dataclass(frozen=True)
class UploaderSettings:
    bus: BusSettings
    participant: str
    spool_dir: Path
    chunk_size: int
    # 0 = unlimited; otherwise the token bucket's rate in bytes per second.
    rate_limit_bps: int
    # How long to wait for the hub's answers before asking again.
    reply_timeout_s: float
    receipt_timeout_s: float
    # How often the outbox is looked at for new deltas and reports (FOLDFED_POLL_S, as the
    # trainer's); load tests lower it so polling does not blur step times.
    poll_s: float = 0.2
    # This participant's Ed25519 key file: its manifests are signed with it (None: unsigned).
    signing_key: Path | None = None
    # Secure aggregation (foldfed.secagg): mask keys come from signing_key and member_keys.
    secure_aggregation: bool = False
    member_keys: Path | None = None
    ring_bits: int = 32

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> UploaderSettings:
        s = load(env)
        participant = required(s.participant, "participant")
        return cls(
            bus=BusSettings.from_settings(s),
            participant=participant,
            spool_dir=spool_dir_of(s, participant),
            chunk_size=s.chunk_size,
            rate_limit_bps=s.rate_limit_bps,
            reply_timeout_s=s.reply_timeout_s,
            receipt_timeout_s=s.receipt_timeout_s,
            poll_s=s.poll_s,
            signing_key=s.signing_key,
            secure_aggregation=s.secure_aggregation,
            member_keys=s.member_keys,
            ring_bits=s.secagg_ring_bits,
        )


@dataclass(frozen=True)
class IngestSettings:
    bus: BusSettings
    participants: tuple[str, ...]
    state_dir: Path
    # Step open for deltas when the hub state is created (later steps come from StepReleased).
    first_step: int
    # Largest payload a manifest may announce.
    max_payload_bytes: int
    # Check that a message's AMQP user_id (stamped and verified by RabbitMQ) is the
    # participant it claims to come from. Off only for brokers that cannot do it.
    require_sender_identity: bool
    prefetch: int
    # Most chunks made durable together (group commit); 1 = one by one.
    batch: int = 1
    # The members' public keys (a keyring file): every manifest must be signed by its
    # sender's key. None: signatures are not checked.
    member_keys: Path | None = None
    # Secure aggregation: every delta must be masked (and none may be, when off), on a
    # ring of ring_bits.
    secure_aggregation: bool = False
    ring_bits: int = 32

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> IngestSettings:
        return cls.from_settings(load(env))

    @classmethod
    def from_settings(cls, s: Settings) -> IngestSettings:
        return cls(
            bus=BusSettings.from_settings(s),
            participants=required(s.participants, "participants"),
            state_dir=s.state_dir,
            first_step=s.first_step,
            max_payload_bytes=s.max_payload_bytes,
            require_sender_identity=s.require_sender_identity,
            prefetch=s.prefetch,
            batch=s.ingest_batch or s.prefetch,
            member_keys=s.member_keys,
            secure_aggregation=s.secure_aggregation,
            ring_bits=s.secagg_ring_bits,
        )


@dataclass(frozen=True)
class ServerOptimizerSettings:
    # "fedavg" (the mean delta), "fedavgm" (server momentum) or "fedadam".
    kind: str
    lr: float
    momentum: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerOptimizerSettings:
        return cls.from_settings(load(env))

    @classmethod
    def from_settings(cls, s: Settings) -> ServerOptimizerSettings:
        default_lr = 1e-3 if s.server_optimizer == "fedadam" else 1.0  # as aggregation.server_opt
        return cls(
            kind=s.server_optimizer,
            lr=default_lr if s.server_lr is None else s.server_lr,
            momentum=s.server_momentum,
        )


@dataclass(frozen=True)
class AggregatorSettings:
    ingest: IngestSettings
    # The model every participant starts the cycle from (θ_0): the hub applies each
    # global update to it too, to know the digest every participant must report.
    initial_model: Path
    optimizer: ServerOptimizerSettings
    # Chunk size of the global update the hub broadcasts.
    update_chunk_size: int
    # The global update's codec (docs/format.md, "Codec specs"); fp32:v1 is exact.
    downlink_codec: str = "fp32:v1"
    # Finalize and broadcast the update while deltas arrive (aggregation/progressive.py).
    progressive_finalize: bool = True
    # The hub's Ed25519 key file: each step record is signed with it (None: unsigned).
    signing_key: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AggregatorSettings:
        s = load(env)
        initial = existing_initial_model(s)
        return cls(
            ingest=IngestSettings.from_settings(s),
            initial_model=initial,
            optimizer=ServerOptimizerSettings.from_settings(s),
            update_chunk_size=s.chunk_size,
            downlink_codec=s.downlink_codec,
            progressive_finalize=s.progressive_finalize,
            signing_key=s.signing_key,
        )


def cycle_choices(codec: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """The cycle's member choices, checked against its codec (registry.check_choices)."""
    try:
        return check_choices(codec, choices)
    except CodecError as exc:
        raise ConfigError(f"{variable('codec_choices')}: {exc}") from None


@dataclass(frozen=True)
class BarrierSettings:
    bus: BusSettings
    participants: tuple[str, ...]
    state_dir: Path
    initial_model: Path
    # Global steps in the cycle (R), the first one's number and the cycle's.
    steps: int
    first_step: int
    cycle: int
    # The cycle's uplink codec and seed, announced with every release.
    codec: str = "fp32:v1"
    codec_seed: int = 0
    # Per-member specs a member may send instead of `codec` (docs/format.md 14.8).
    codec_choices: tuple[str, ...] = ()
    # Each participant's agreed aggregation weight, announced with every release; every
    # participant has one (FOLDFED_MEMBER_WEIGHTS, default DEFAULT_MEMBER_WEIGHT each).
    member_weights: tuple[tuple[str, float], ...] = ()
    # The cycle's L2 bound on each member's decoded delta, announced with every release
    # (FOLDFED_UPDATE_NORM_BOUND; 0.0 = none).
    update_norm_bound: float = 0.0
    # Readiness gating (docs/operating-model.md, "Gated cycles"): the barrier starts each
    # cycle itself with the `participants` (the roster) gated before the deadline.
    gated_cycles: bool = False
    consortium_keyring: Path | None = None
    gate_window_s: float = 3600.0
    gate_min_members: int = 2
    split_reference_hash: str = ""  # "": records' blind-split references are not checked

    def agreed_weights(self, members: tuple[str, ...]) -> tuple[float, ...]:
        """The weights a release of `members` announces, in that order."""
        fixed = dict(self.member_weights)
        return tuple(fixed.get(member, DEFAULT_MEMBER_WEIGHT) for member in members)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BarrierSettings:
        s = load(env)
        initial = existing_initial_model(s)
        return cls(
            bus=BusSettings.from_settings(s),
            participants=required(s.participants, "participants"),
            state_dir=s.state_dir,
            initial_model=initial,
            steps=s.steps,
            first_step=s.first_step,
            cycle=s.cycle,
            codec=s.codec,
            codec_seed=s.codec_seed,
            codec_choices=cycle_choices(s.codec, s.codec_choices),
            member_weights=_member_weights(s),
            update_norm_bound=s.update_norm_bound,
            gated_cycles=s.gated_cycles,
            consortium_keyring=_gate_keyring(s),
            gate_window_s=s.gate_window_s,
            gate_min_members=s.gate_min_members,
            split_reference_hash=s.split_reference_hash,
        )

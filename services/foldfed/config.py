"""Settings from environment variables (12-factor), validated at start-up.

Every service reads the same variables, so the demo, compose and Kubernetes cannot drift
apart. A bad value raises ConfigError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from foldfed.errors import CodecError, ConfigError
from foldfed.format import DEFAULT_CHUNK_SIZE, validate_chunk_size
from foldfed.topology import is_valid_participant_id

AMQP_URL = "FOLDFED_AMQP_URL"


def _get(env: Mapping[str, str], key: str, default: str | None = None) -> str:
    value = env.get(key, default)
    if value is None or value == "":
        raise ConfigError(f"{key} is not set")
    return value


_N = TypeVar("_N", int, float)


def _number(
    env: Mapping[str, str], key: str, default: _N, minimum: _N, parse: type[_N], what: str
) -> _N:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not {what}") from None
    if not value >= minimum:  # also false for NaN
        raise ConfigError(f"{key}={value} must be >= {minimum}")
    return value


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    return _number(env, key, default, minimum, int, "an integer")


def _float(env: Mapping[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, key, default, minimum, float, "a number")


def _participants(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    names = tuple(sorted({p.strip() for p in _get(env, key).split(",") if p.strip()}))
    for name in names:
        if not is_valid_participant_id(name):
            raise ConfigError(f"{key}: {name!r} is not a valid participant id")
    if not names:
        raise ConfigError(f"{key} names no participant")
    return names


def _chunk_size(env: Mapping[str, str]) -> int:
    chunk_size = _int(env, "FOLDFED_CHUNK_SIZE", DEFAULT_CHUNK_SIZE, 1)
    try:
        validate_chunk_size(chunk_size)
    except CodecError as exc:
        raise ConfigError(f"FOLDFED_CHUNK_SIZE: {exc}") from None
    return chunk_size


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BusSettings:
        return cls(
            amqp_url=_get(env, AMQP_URL),
            publish_timeout_s=_float(env, "FOLDFED_PUBLISH_TIMEOUT_S", 30.0, 0.1),
            inflight_window=_int(env, "FOLDFED_INFLIGHT_WINDOW", 8, 1),
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> UploaderSettings:
        participant = _get(env, "FOLDFED_PARTICIPANT")
        if not is_valid_participant_id(participant):
            raise ConfigError(f"FOLDFED_PARTICIPANT: {participant!r} is not a valid id")
        chunk_size = _chunk_size(env)
        return cls(
            bus=BusSettings.from_env(env),
            participant=participant,
            spool_dir=Path(_get(env, "FOLDFED_SPOOL_DIR", f"var/spool/{participant}")),
            chunk_size=chunk_size,
            rate_limit_bps=_int(env, "FOLDFED_RATE_LIMIT_BPS", 0, 0),
            reply_timeout_s=_float(env, "FOLDFED_REPLY_TIMEOUT_S", 30.0, 0.1),
            receipt_timeout_s=_float(env, "FOLDFED_RECEIPT_TIMEOUT_S", 120.0, 0.1),
            poll_s=_float(env, "FOLDFED_POLL_S", 0.2, 0.001),
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> IngestSettings:
        return cls(
            bus=BusSettings.from_env(env),
            participants=_participants(env, "FOLDFED_PARTICIPANTS"),
            state_dir=Path(_get(env, "FOLDFED_STATE_DIR", "var/hub")),
            first_step=_int(env, "FOLDFED_FIRST_STEP", 1, 0),
            max_payload_bytes=_int(env, "FOLDFED_MAX_PAYLOAD_BYTES", 8 << 30, 1),
            require_sender_identity=env.get("FOLDFED_REQUIRE_SENDER_IDENTITY", "1") != "0",
            prefetch=_int(env, "FOLDFED_PREFETCH", 8, 1),
        )


@dataclass(frozen=True)
class ServerOptimizerSettings:
    # "fedavg" (the mean delta), "fedavgm" (server momentum) or "fedadam".
    kind: str
    lr: float
    momentum: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerOptimizerSettings:
        kind = env.get("FOLDFED_SERVER_OPTIMIZER", "fedavg")
        if kind not in ("fedavg", "fedavgm", "fedadam"):
            raise ConfigError(
                f"FOLDFED_SERVER_OPTIMIZER={kind!r}: expected fedavg, fedavgm or fedadam"
            )
        default_lr = 1e-3 if kind == "fedadam" else 1.0  # as aggregation.server_opt
        return cls(
            kind=kind,
            lr=_float(env, "FOLDFED_SERVER_LR", default_lr, 0.0),
            momentum=_float(env, "FOLDFED_SERVER_MOMENTUM", 0.9, 0.0),
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AggregatorSettings:
        initial = Path(_get(env, "FOLDFED_INITIAL_MODEL"))
        if not initial.is_file():
            raise ConfigError(f"FOLDFED_INITIAL_MODEL={str(initial)!r} is not a file")
        return cls(
            ingest=IngestSettings.from_env(env),
            initial_model=initial,
            optimizer=ServerOptimizerSettings.from_env(env),
            update_chunk_size=_chunk_size(env),
        )


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BarrierSettings:
        initial = Path(_get(env, "FOLDFED_INITIAL_MODEL"))
        if not initial.is_file():
            raise ConfigError(f"FOLDFED_INITIAL_MODEL={str(initial)!r} is not a file")
        return cls(
            bus=BusSettings.from_env(env),
            participants=_participants(env, "FOLDFED_PARTICIPANTS"),
            state_dir=Path(_get(env, "FOLDFED_STATE_DIR", "var/hub")),
            initial_model=initial,
            steps=_int(env, "FOLDFED_STEPS", 5, 1),
            first_step=_int(env, "FOLDFED_FIRST_STEP", 1, 0),
            cycle=_int(env, "FOLDFED_CYCLE", 1, 1),
        )

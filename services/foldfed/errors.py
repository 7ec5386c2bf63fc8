"""The one error tree of foldfed.

A shallow tree: callers catch the branch they can act on. `Reject` is control flow, not a
failure of ours: the message it names is bad and goes to the dead-letter queue with its
reason.
"""

from __future__ import annotations


class FoldfedError(Exception):
    """Root of every error foldfed raises on purpose."""


class IntegrityError(FoldfedError):
    """Bytes do not match the digest that names them (corruption or forgery)."""


class CodecError(FoldfedError):
    """A payload cannot be encoded or decoded (bad layout, dtype, size)."""


class DecodeError(FoldfedError):
    """A wire message is not the protobuf it claims to be. Keeps the raw bytes."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class BrokerError(FoldfedError):
    """The broker cannot be reached or refuses us."""


class BrokerBlocked(BrokerError):
    """A publish was not confirmed in time: the broker is most likely blocked by a memory
    or disk alarm, which RabbitMQ signals to publishers only by silence."""


class StoreError(FoldfedError):
    """The on-disk store is unusable (missing, unwritable, inconsistent)."""


class ConfigError(FoldfedError):
    """A setting is missing or invalid; the message names the key."""


class Reject(FoldfedError):
    """This message is bad: dead-letter it with `reason` and keep going."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

"""Ed25519 signatures over canonical bytes: the one way foldfed signs a document.

A party's key is an Ed25519 key pair (RFC 8032). The private half is the 32-byte seed;
the public half is 32 bytes. A public key is named by its **key id**: the blake3 (hex)
of its 32 raw bytes, so a key id names exactly one key and cannot be chosen to collide
with another's. Signatures are 64 bytes, deterministic (the same key and message always
give the same signature) and verify in constant time in `cryptography`.

A JSON document is signed over its **canonical bytes** (`canonical_json`): keys sorted,
no whitespace, UTF-8, no NaN or infinity. Two parties who hold equal documents therefore
sign and verify equal bytes, whatever order or spacing their files use. Domain separation
(a data-card signature must never verify as a checkpoint approval) comes from the DSSE
pre-authentication encoding in `foldfed.dsse`, which prefixes every signed message with
its payload type.

The `Keyring` is the consortium's set of public keys and its approval threshold M. Key
files (how keys are stored) are `foldfed.keyfiles`; this module gets and gives bytes
only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from foldfed.digests import digest_of
from foldfed.errors import ConfigError

ALGORITHM = "ed25519"
SEED_SIZE = 32
PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64


class BadKey(ConfigError):
    """Bytes that are not an Ed25519 key, or a keyring that breaks its rules."""


def key_id(public: bytes) -> str:
    """The key id of a public key: blake3 (hex) over its 32 raw bytes."""
    if len(public) != PUBLIC_SIZE:
        raise BadKey(f"an Ed25519 public key has {PUBLIC_SIZE} bytes, not {len(public)}")
    return digest_of(public).hex()


@dataclass(frozen=True)
class VerifyKey:
    """A named Ed25519 public key."""

    name: str
    public: bytes

    def __post_init__(self) -> None:
        key_id(self.public)  # checks the length

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's signature of `message`."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """A named Ed25519 private key (its 32-byte seed). `repr` never shows the seed."""

    name: str
    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise BadKey(f"an Ed25519 private key has {SEED_SIZE} bytes, not {len(self.seed)}")

    def __repr__(self) -> str:
        return f"SigningKey(name={self.name!r}, keyid={self.keyid[:12]}...)"

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        """A fresh key from the operating system's randomness."""
        raw = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        return cls(name, raw)

    @property
    def public(self) -> bytes:
        private = Ed25519PrivateKey.from_private_bytes(self.seed)
        return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self.name, self.public)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message` (deterministic)."""
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)


@dataclass(frozen=True)
class Keyring:
    """The consortium's public keys (N) and how many must approve a release (M).

    Names and keys are unique, and 1 <= M <= N: a keyring that breaks these is refused
    when it is built, so no decision ever runs on one."""

    keys: tuple[VerifyKey, ...]
    threshold: int

    def __post_init__(self) -> None:
        if not self.keys:
            raise BadKey("a keyring needs at least one key")
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise BadKey(f"a keyring names each party once: {sorted(names)}")
        if len({k.public for k in self.keys}) != len(self.keys):
            raise BadKey("a keyring holds each public key once")
        if not 1 <= self.threshold <= len(self.keys):
            raise BadKey(
                f"threshold {self.threshold} must be between 1 and the {len(self.keys)} keys"
            )

    def by_keyid(self) -> Mapping[str, VerifyKey]:
        return {k.keyid: k for k in self.keys}

    def find(self, keyid: str) -> VerifyKey | None:
        return self.by_keyid().get(keyid)


def canonical_json(document: Any) -> bytes:
    """The bytes a JSON document is signed over: sorted keys, no whitespace, UTF-8.

    Numbers are written as Python's `json` writes them (integers exactly, floats as the
    shortest text that reads back the same); NaN and infinity are refused. This is not
    RFC 8785 (JCS), whose float text differs for some values, but both signer and verifier
    use this function, so they agree byte for byte."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")

"""Pairwise key agreement for the masks: X25519 keys derived from the members' Ed25519 keys.

Pure: bytes in, bytes out.

Why derived, not provisioned apart: every member already holds its Ed25519 signing key
(FOLDFED_SIGNING_KEY) and the consortium's keyring of public keys (FOLDFED_MEMBER_KEYS)
is already shared and checked. The birational map from Ed25519 to Curve25519 (RFC 7748
section 4.1; libsodium's crypto_sign_ed25519_{sk,pk}_to_curve25519, the conversion `age`
uses for ssh-ed25519 recipients) turns them into an X25519 key pair, so one keyring
serves signatures and masks, and nothing new must be provisioned, rotated or trusted:

    x25519 private = clamp(SHA-512(ed25519 seed)[:32])   (the Ed25519 secret scalar)
    x25519 public  = u = (1 + y) / (1 - y)  mod 2**255 - 19   (y: the Ed25519 point)

The hub holds only public keys, so it can compute no pair's secret and no mask. A
member's shared secret with member j is X25519(own private, j's public), the same on
both sides; masks.pair_key turns it into the (cycle, step, pair) key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from foldfed.secagg.masks import pair_key
from foldfed.signing import BadKey

_P = 2**255 - 19


def x25519_private(seed: bytes) -> X25519PrivateKey:
    """The X25519 private key of an Ed25519 seed (its clamped secret scalar)."""
    if len(seed) != 32:
        raise BadKey(f"an Ed25519 seed has 32 bytes, not {len(seed)}")
    scalar = bytearray(hashlib.sha512(seed).digest()[:32])
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    return X25519PrivateKey.from_private_bytes(bytes(scalar))


def x25519_public(ed25519_public: bytes) -> bytes:
    """The X25519 public key (u-coordinate, 32 bytes) of an Ed25519 public key."""
    if len(ed25519_public) != 32:
        raise BadKey(f"an Ed25519 public key has 32 bytes, not {len(ed25519_public)}")
    y = int.from_bytes(ed25519_public, "little") & ((1 << 255) - 1)  # drop x's sign bit
    if y >= _P or (1 - y) % _P == 0:
        raise BadKey("not an Ed25519 point usable for key agreement")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def public_of(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_keys(
    member: str,
    seed: bytes,
    members: Mapping[str, bytes],
    *,
    cycle: int,
    step: int,
) -> dict[str, bytes]:
    """K_{member,j} for every other member j of the step; `members`: id -> Ed25519 public."""
    private = x25519_private(seed)
    out = {}
    for other, public in members.items():
        if other == member:
            continue
        secret = private.exchange(X25519PublicKey.from_public_bytes(x25519_public(public)))
        a, b = sorted((member, other))
        out[other] = pair_key(secret, cycle, step, a, b)
    return out

"""What a signature covers: a member's manifest and the hub's step record.

Both are Ed25519 signatures (foldfed.signing) over the DSSE pre-authentication encoding
(foldfed.dsse), so each kind is domain-separated by its payload type: a manifest
signature can never pass as a step record's, nor as a checkpoint approval's.

- A **manifest** is signed in place (`DeltaManifest.signature`, field 20): over
  PAE(MANIFEST_TYPE, the manifest's canonical bytes with `signature` empty). The signature
  travels inside the manifest, so the manifest id (blake3 of its bytes) names the signed
  manifest, and the hub stores what it needs to check it again offline. Ed25519 is
  deterministic: a restarted uploader signs the same bytes and keeps its manifest id.
- A **step record** is a DSSE envelope of type RECORD_TYPE whose payload is the record's
  canonical JSON (foldfed.audit.record), signed by the hub's key.

Keys are found by name: a member's manifest must verify with the keyring's key named as
its participant, a record with the key named `hub` (foldfed.topology.HUB_ID). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

from foldfed.dsse import pae
from foldfed.signing import SigningKey, VerifyKey

MANIFEST_TYPE = "application/vnd.foldfed.manifest.v1+protobuf"
RECORD_TYPE = "application/vnd.foldfed.step-record.v1+json"


def sign_manifest(key: SigningKey, unsigned: bytes) -> bytes:
    """`key`'s signature of a manifest whose canonical bytes without signature are
    `unsigned` (foldfed.messages.unsigned_bytes)."""
    return key.sign(pae(MANIFEST_TYPE, unsigned))


def manifest_signature_problem(
    participant: str, unsigned: bytes, signature: bytes, keys: Mapping[str, VerifyKey]
) -> str:
    """Why `signature` is not `participant`'s signature of the manifest, or "" if it is.

    `keys`: the members' public keys by name."""
    if not signature:
        return f"manifest of {participant!r} is not signed (the hub's keyring requires it)"
    key = keys.get(participant)
    if key is None:
        return f"the keyring holds no key for {participant!r}"
    if not key.verify(pae(MANIFEST_TYPE, unsigned), signature):
        return f"manifest signature does not verify against {participant!r}'s key"
    return ""

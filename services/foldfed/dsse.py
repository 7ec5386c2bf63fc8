"""The DSSE envelope: signed documents as in-toto's "Dead Simple Signing Envelope" v1.

An envelope carries a payload (bytes), its type (a media type string) and any number of
signatures, each a key id and the signature bytes::

    {"payload": "<base64 payload>", "payloadType": "<type>",
     "signatures": [{"keyid": "<blake3 hex of the public key>", "sig": "<base64>"}]}

A signature is over the pre-authentication encoding (PAE), never over the payload alone::

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

where LEN is the byte length in ASCII decimal and SP one space. The type is signed with
the body, so a signature made for one kind of document (a data card) cannot be passed off
as another (a checkpoint approval). Writers use standard base64 with padding; readers
also accept the URL-safe alphabet, as the DSSE specification asks.

Implemented on `cryptography` directly (see `foldfed.signing`). OpenSSF `model-signing`
1.1.1 was tried first: it pulls sigstore and TUF and fails to import without an
undeclared pyOpenSSL, so foldfed does not depend on it (docs/operating-model.md). Pure:
bytes in, bytes out.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from foldfed.errors import IntegrityError
from foldfed.signing import SigningKey, VerifyKey

PAE_PREFIX = b"DSSEv1"


class MalformedEnvelope(IntegrityError):
    """A document that is not a DSSE envelope, or whose payload is not what it claims."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """The pre-authentication encoding: the exact bytes every signature covers."""
    kind = payload_type.encode("utf-8")
    return b" ".join(
        [PAE_PREFIX, str(len(kind)).encode(), kind, str(len(payload)).encode(), payload]
    )


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...] = ()

    def signed_by(self, key: SigningKey) -> Envelope:
        """This envelope with `key`'s signature added."""
        sig = Signature(key.keyid, key.sign(pae(self.payload_type, self.payload)))
        return Envelope(self.payload_type, self.payload, (*self.signatures, sig))

    def signature_verifies(self, signature: Signature, key: VerifyKey) -> bool:
        """Whether `signature` is `key`'s over this envelope (its key id must match)."""
        return signature.keyid == key.keyid and key.verify(
            pae(self.payload_type, self.payload), signature.sig
        )

    def payload_json(self) -> dict[str, Any]:
        """The payload read as a JSON object."""
        try:
            document = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # too deeply nested
            raise MalformedEnvelope(f"the payload is not JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise MalformedEnvelope("the payload is not a JSON object")
        return document

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": _b64(self.payload),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": _b64(s.sig)} for s in self.signatures],
        }


def sign(payload_type: str, payload: bytes, keys: Iterable[SigningKey]) -> Envelope:
    """An envelope of `payload` signed by every key in `keys`."""
    envelope = Envelope(payload_type, payload)
    for key in keys:
        envelope = envelope.signed_by(key)
    return envelope


def verified_keys(envelope: Envelope, keys: Mapping[str, VerifyKey]) -> list[VerifyKey]:
    """The keys (from `keys`, by key id) whose signatures on `envelope` verify."""
    found = []
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is not None and envelope.signature_verifies(signature, key):
            found.append(key)
    return found


def envelope_from_json(document: Any) -> Envelope:
    """An envelope from its JSON object; `MalformedEnvelope` names what is wrong."""
    if not isinstance(document, dict):
        raise MalformedEnvelope("a DSSE envelope is a JSON object")
    payload_type = document.get("payloadType")
    if not isinstance(payload_type, str) or not payload_type:
        raise MalformedEnvelope("the envelope has no payloadType")
    try:
        payload_type.encode("utf-8")  # what `pae` signs; JSON may carry a lone surrogate
    except UnicodeEncodeError:
        raise MalformedEnvelope("the envelope's payloadType is not UTF-8 text") from None
    payload = _unb64(document.get("payload"), "payload")
    raw_signatures = document.get("signatures")
    if not isinstance(raw_signatures, list):
        raise MalformedEnvelope("the envelope's signatures are not a list")
    signatures = []
    for i, entry in enumerate(raw_signatures):
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise MalformedEnvelope(f"signature {i} has no keyid")
        signatures.append(Signature(entry["keyid"], _unb64(entry.get("sig"), f"signature {i}")))
    return Envelope(payload_type, payload, tuple(signatures))


def _b64(data: bytes) -> str:
    return base64.standard_b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedEnvelope(f"the envelope's {what} is not base64 text")
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEnvelope(f"the envelope's {what} is not base64 ({exc})") from exc

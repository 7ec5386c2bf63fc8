"""A step record: what the hub states, and signs, about one finalized global step.

Written by the aggregator when it finalizes step t (it knows all of it), kept for ever
beside the manifests (`records/step-<t:012d>.dsse.json` in its state folder), and read
back by `foldfed verify`. Its payload is canonical JSON (foldfed.signing.canonical_json)::

    {"format": "foldfed.step-record/1", "cycle": 1, "step": 3,
     "members": ["company-a", "company-b"],          sorted
     "weights": {"company-a": 4096.0, ...},         the agreed weight each delta carried
     "weight_sum": 8192.0,
     "manifests": {"company-a": "<hex id>", ...},   blake3 of each member's signed manifest
     "model_before": "<hex>",                       θ_t as released
     "model_after": "<hex>",                        θ_{t+1} = θ_t + U_t
     "update_digest": "<hex>",                      blake3 of the update file U_t
     "update_manifest": "<hex>",                    id of the update manifest broadcast
     "codec": "fp32:v1", "downlink_codec": "fp32:v1",
     "optimizer": "fedavg", "server_lr": 1.0}               how the mean became U_t

The record is signed in a DSSE envelope (foldfed.audit.signatures.RECORD_TYPE) by the
hub's key. Successive records chain: step t+1's `model_before` is step t's `model_after`,
so with only the records (retention deleted the files) a verifier still follows θ from
the first release to the last. Pure: dicts and bytes in and out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from foldfed.dsse import Envelope
from foldfed.errors import IntegrityError
from foldfed.signing import canonical_json

RECORD_FORMAT = "foldfed.step-record/1"
# Where a hub keeps its records: <state dir>/records/step-<t:012d>.dsse.json.
RECORDS_DIR = "records"
_HEX_FIELDS = ("model_before", "model_after", "update_digest", "update_manifest")
_TEXT_FIELDS = ("codec", "downlink_codec", "optimizer")


class RecordError(IntegrityError):
    """A step record that is not one (a missing or mistyped field); the reason says which."""


@dataclass(frozen=True)
class StepRecord:
    cycle: int
    step: int
    weights: tuple[tuple[str, float], ...]  # (member, weight), sorted by member
    weight_sum: float
    manifests: tuple[tuple[str, str], ...]  # (member, hex manifest id), sorted by member
    model_before: str
    model_after: str
    update_digest: str
    update_manifest: str
    codec: str
    downlink_codec: str
    optimizer: str
    server_lr: float

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    def weight_of(self) -> dict[str, float]:
        return dict(self.weights)

    def manifest_of(self) -> dict[str, str]:
        return dict(self.manifests)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "cycle": self.cycle,
            "step": self.step,
            "members": list(self.members),
            "weights": dict(self.weights),
            "weight_sum": self.weight_sum,
            "manifests": dict(self.manifests),
            **{name: getattr(self, name) for name in _HEX_FIELDS + _TEXT_FIELDS},
            "server_lr": self.server_lr,
        }

    def payload(self) -> bytes:
        """The bytes the hub signs."""
        return canonical_json(self.to_json())


def record_file_bytes(envelope: Envelope) -> bytes:
    """A record file's exact bytes: its envelope's JSON, indented, one newline. A verifier
    requires them, so even bytes the signature does not cover (spacing, base64 padding
    bits) cannot change unseen."""
    return (json.dumps(envelope.to_json(), indent=1) + "\n").encode()


def make_record(
    *,
    cycle: int,
    step: int,
    weights: Mapping[str, float],
    weight_sum: float,
    manifests: Mapping[str, bytes],
    model_before: bytes,
    model_after: bytes,
    update_digest: bytes,
    update_manifest: bytes,
    codec: str,
    downlink_codec: str,
    optimizer: str,
    server_lr: float,
) -> StepRecord:
    """A record from the aggregator's facts (digests as bytes)."""
    if set(weights) != set(manifests):
        raise RecordError("a record names a weight and a manifest for every member")
    return StepRecord(
        cycle=cycle,
        step=step,
        weights=tuple(sorted(weights.items())),
        weight_sum=weight_sum,
        manifests=tuple(sorted((p, mid.hex()) for p, mid in manifests.items())),
        model_before=model_before.hex(),
        model_after=model_after.hex(),
        update_digest=update_digest.hex(),
        update_manifest=update_manifest.hex(),
        codec=codec,
        downlink_codec=downlink_codec,
        optimizer=optimizer,
        server_lr=server_lr,
    )


def record_from_json(document: Any) -> StepRecord:
    """The record in a payload's JSON; RecordError names the first bad field."""
    if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT:
        raise RecordError(f"not a {RECORD_FORMAT} document")
    members = document.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise RecordError("members is not a list of names")
    if members != sorted(set(members)) or not members:
        raise RecordError("members must be sorted, unique and not empty")
    weights = _mapping(document, "weights", members, _weight)
    manifests = _mapping(document, "manifests", members, _hex)
    record = StepRecord(
        cycle=_count(document, "cycle"),
        step=_count(document, "step"),
        weights=tuple(sorted(weights.items())),
        weight_sum=_weight(document.get("weight_sum"), "weight_sum"),
        manifests=tuple(sorted(manifests.items())),
        **{name: _hex(document.get(name), name) for name in _HEX_FIELDS},
        **{name: _text(document.get(name), name) for name in _TEXT_FIELDS},
        server_lr=_weight(document.get("server_lr"), "server_lr"),
    )
    if record.to_json() != document:
        raise RecordError("the record holds fields this format does not know")
    return record


def _mapping(document: dict[str, Any], field: str, members: list[str], value: Any) -> dict:
    raw = document.get(field)
    if not isinstance(raw, dict) or sorted(raw) != members:
        raise RecordError(f"{field} must name exactly the members")
    return {name: value(raw[name], f"{field}[{name}]") for name in members}


def _count(document: dict[str, Any], field: str) -> int:
    value = document.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordError(f"{field} is not a count")
    return value


def _weight(value: Any, field: str) -> float:
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise RecordError(f"{field} is not a finite weight > 0")
    return value


def _hex(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) not in (0, 64):
        raise RecordError(f"{field} is not a 32-byte hex digest")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise RecordError(f"{field} is not hex") from None
    if value != value.lower():
        raise RecordError(f"{field} is not lower-case hex")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{field} is not text")
    return value

"""The readiness record: a participant's signed statement of its gate results for a cycle.

An in-toto Statement v1 in a DSSE envelope (`foldfed.dsse`), signed with the
participant's Ed25519 key (payload type `application/vnd.in-toto+json`, as approvals and
releases; docs/operating-model.md, "Formats")::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "theta0", "digest": {"blake3": "<θ0 as this participant holds it>"}}],
     "predicateType": "urn:foldfed:readiness:v1",
     "predicate": {"format": "foldfed.readiness/1", "participant": "company-a",
                   "cycle": 2, "ready": true, "theta0_expected": "<the cycle's θ0>",
                   "schema_version": "foldfed.data/1", "measured_at": "<ISO 8601 UTC>",
                   "checks": [{"name", "result", "value", "fix"}, ...],
                   "split": {"reference_hash", "config_digest", "assignment_digest",
                             "config"}}}

`split` (optional: present when the participant gave its split configuration) is its
blind-split reference (of3/data/split_standard.py): the hash, and the public
configuration it was computed from, never the key.

The subject is θ0 as the participant holds it (empty digest when it has no file), so the
record says which model it is ready to train. `verify_record` accepts a record only when
it is such a Statement, signed by exactly one key of the given keys, under the name the
predicate claims, and its `ready` agrees with its checks. A changed byte anywhere in the
payload breaks the signature. Pure: documents and keys in, a verdict out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from foldfed.dsse import Envelope, MalformedEnvelope, envelope_from_json, verified_keys
from foldfed.errors import IntegrityError
from foldfed.gate.checks import CheckResult, Result, Terms, is_ready
from foldfed.signing import SigningKey, VerifyKey, canonical_json

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
READINESS_PREDICATE = "urn:foldfed:readiness:v1"
READINESS_FORMAT = "foldfed.readiness/1"
SUBJECT_NAME = "theta0"


class RecordRefused(IntegrityError):
    """A document that is not a valid readiness record; the message is the reason."""


@dataclass(frozen=True)
class Readiness:
    """A verified record's content."""

    participant: str
    cycle: int
    ready: bool
    checks: tuple[dict[str, str], ...]
    signer: VerifyKey

    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.checks if c.get("result") == Result.FAIL.value]


def readiness_statement(
    participant: str,
    terms: Terms,
    results: Sequence[CheckResult],
    theta0_digest: str,
    measured_at: str,
    split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Statement a participant signs (module docstring)."""
    statement: dict[str, Any] = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": SUBJECT_NAME, "digest": {"blake3": theta0_digest}}],
        "predicateType": READINESS_PREDICATE,
        "predicate": {
            "format": READINESS_FORMAT,
            "participant": participant,
            "cycle": terms.cycle,
            "ready": is_ready(results),
            "theta0_expected": terms.theta0_digest,
            "schema_version": terms.schema_version,
            "measured_at": measured_at,
            "checks": [r.to_json() for r in results],
        },
    }
    if split is not None:
        statement["predicate"]["split"] = dict(split)
    return statement


def sign_record(statement: dict[str, Any], key: SigningKey) -> Envelope:
    return Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(key)


def verify_record(document: Any, keys: Iterable[VerifyKey]) -> Readiness:
    """The record in `document` (an envelope's JSON), verified against `keys`."""
    try:
        envelope = envelope_from_json(document)
        statement = envelope.payload_json()
    except MalformedEnvelope as exc:
        raise RecordRefused(str(exc)) from exc
    if envelope.payload_type != PAYLOAD_TYPE or statement.get("_type") != STATEMENT_TYPE:
        raise RecordRefused("not an in-toto Statement v1 in a DSSE envelope")
    if statement.get("predicateType") != READINESS_PREDICATE:
        raise RecordRefused(f"predicate {statement.get('predicateType')!r} is not readiness")
    if len(envelope.signatures) != 1:
        raise RecordRefused(f"{len(envelope.signatures)} signatures: a record has exactly one")
    signers = verified_keys(envelope, {k.keyid: k for k in keys})
    if not signers:
        raise RecordRefused("the signature does not verify against the given keys")
    return _readiness(statement.get("predicate"), signers[0])


def _readiness(predicate: Any, signer: VerifyKey) -> Readiness:
    if not isinstance(predicate, dict) or predicate.get("format") != READINESS_FORMAT:
        raise RecordRefused(f"the predicate is not {READINESS_FORMAT}")
    participant, cycle, ready = (predicate.get(k) for k in ("participant", "cycle", "ready"))
    checks = predicate.get("checks")
    if not isinstance(cycle, int) or isinstance(cycle, bool) or not isinstance(ready, bool):
        raise RecordRefused("the record's cycle or ready field is malformed")
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise RecordRefused("the record's checks are not a list of objects")
    if participant != signer.name:
        raise RecordRefused(f"signed by {signer.name}, but claims participant {participant!r}")
    if ready != all(c.get("result") != Result.FAIL.value for c in checks):
        raise RecordRefused("the record's ready field disagrees with its checks")
    return Readiness(participant, cycle, ready, tuple(checks), signer)

"""The release decision: is this bundle a consortium release of these exact weights?

Three documents, all in-toto Statements (v1) about one subject, the weights file, named
by its blake3 and sha256 digests:

- a **proposal** (plain JSON): the weights' name, size and digests, the cycle and step
  they come from, a note;
- an **approval** (a DSSE envelope signed by one company): predicate
  `urn:foldfed:checkpoint-approval:v1` holding the proposal, the approver's name and that
  company's evaluation summary;
- a **release** (a DSSE envelope signed by its publisher, a consortium member): predicate
  `urn:foldfed:checkpoint-release:v1` holding the proposal, the threshold and every
  approval envelope, verbatim.

A release is valid against a keyring (N public keys, threshold M) and the digests of the
weights file in hand when, in this order (the first break is the reason given):

1. the envelope is a release Statement signed by a key of the keyring;
2. its subject is the proposal's, and the weights in hand have that size and digests
   (one changed byte changes both digests);
3. every approval is a DSSE envelope with one signature, by a key of the keyring, that
   verifies; it approves this very proposal and subject under the name of its key; no
   key approves twice. A single forged, foreign or duplicate approval refuses the whole
   bundle: nobody should publish one, so its presence means tampering;
4. at least M distinct keys approved.

The authority is the approvals, not the publisher: a publisher can leave approvals out
(fewer than M fails) but cannot add, alter or forge one. The threshold comes from the
verifier's keyring, never from the bundle. Pure: documents and digests in, a verdict out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foldfed.dsse import Envelope, MalformedEnvelope, envelope_from_json
from foldfed.errors import IntegrityError
from foldfed.signing import Keyring, SigningKey, canonical_json

PROPOSAL_FORMAT = "foldfed.checkpoint-proposal/1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
APPROVAL_PREDICATE = "urn:foldfed:checkpoint-approval:v1"
RELEASE_PREDICATE = "urn:foldfed:checkpoint-release:v1"
# An evaluation summary is aggregates only: a few metrics per benchmark, not a report.
MAX_EVALUATION_BYTES = 64 * 1024


class ReleaseRefused(IntegrityError):
    """A document that cannot be (part of) a release; the message is the reason."""


@dataclass(frozen=True)
class WeightsDigest:
    """What identifies a weights file: its name, size and content digests (hex)."""

    name: str
    size: int
    blake3: str
    sha256: str

    def same_content(self, other: WeightsDigest) -> bool:
        """Whether both name the same bytes (whatever the file is called)."""
        return (self.size, self.blake3, self.sha256) == (other.size, other.blake3, other.sha256)

    def subject(self) -> dict[str, Any]:
        """The in-toto subject entry."""
        return {"name": self.name, "digest": {"blake3": self.blake3, "sha256": self.sha256}}


@dataclass(frozen=True)
class Proposal:
    weights: WeightsDigest
    cycle: int
    step: int
    tensors: int
    proposed_at: str
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROPOSAL_FORMAT,
            "weights": {
                "name": self.weights.name,
                "size": self.weights.size,
                "blake3": self.weights.blake3,
                "sha256": self.weights.sha256,
            },
            "cycle": self.cycle,
            "step": self.step,
            "tensors": self.tensors,
            "proposed_at": self.proposed_at,
            "note": self.note,
        }


def proposal_from_json(document: Any) -> Proposal:
    """A proposal from its JSON object; `ReleaseRefused` names the bad field."""
    if not isinstance(document, dict) or document.get("format") != PROPOSAL_FORMAT:
        raise ReleaseRefused(f"not a {PROPOSAL_FORMAT} document")
    weights = document.get("weights")
    if not isinstance(weights, dict):
        raise ReleaseRefused("the proposal has no weights")
    digest = WeightsDigest(
        _field(weights, "name", str),
        _field(weights, "size", int),
        _field(weights, "blake3", str),
        _field(weights, "sha256", str),
    )
    if digest.name in ("", ".", "..") or "/" in digest.name or "\\" in digest.name:
        raise ReleaseRefused(f"the weights name {digest.name!r} is not a plain file name")
    proposal = Proposal(
        digest,
        _field(document, "cycle", int),
        _field(document, "step", int),
        _field(document, "tensors", int),
        _field(document, "proposed_at", str),
        _field(document, "note", str),
    )
    if proposal.to_json() != document:
        raise ReleaseRefused("the proposal holds fields this version does not know")
    return proposal


def approval_statement(
    proposal: Proposal, approver: str, evaluation: Mapping[str, Any]
) -> dict[str, Any]:
    return _statement(
        proposal,
        APPROVAL_PREDICATE,
        {"proposal": proposal.to_json(), "approver": approver, "evaluation": dict(evaluation)},
    )


def approve(proposal: Proposal, evaluation: Mapping[str, Any], key: SigningKey) -> Envelope:
    """`key`'s company approves `proposal`, attaching its evaluation summary."""
    if len(canonical_json(dict(evaluation))) > MAX_EVALUATION_BYTES:
        raise ReleaseRefused(f"the evaluation summary is over {MAX_EVALUATION_BYTES} bytes")
    statement = approval_statement(proposal, key.name, evaluation)
    return Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(key)


def assemble_release(
    proposal: Proposal, approvals: Sequence[Envelope], keyring: Keyring, publisher: SigningKey
) -> Envelope:
    """The release envelope, signed by `publisher`. It is judged before it is returned,
    so a bundle that `judge` would refuse is never written."""
    predicate = {
        "proposal": proposal.to_json(),
        "threshold": keyring.threshold,
        "approvals": [a.to_json() for a in approvals],
    }
    statement = _statement(proposal, RELEASE_PREDICATE, predicate)
    envelope = Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(publisher)
    verdict = judge(envelope, proposal.weights, keyring)
    if not verdict.valid:
        raise ReleaseRefused(verdict.reason)
    return envelope


@dataclass(frozen=True)
class Verdict:
    """The release decision. `reason` names the first break when `valid` is false."""

    valid: bool
    reason: str
    approvers: tuple[str, ...] = ()
    evaluations: Mapping[str, Any] = field(default_factory=dict)
    proposal: Proposal | None = None


def judge(envelope: Envelope, weights: WeightsDigest, keyring: Keyring) -> Verdict:
    """Whether `envelope` releases the weights whose digests are `weights` (see the module
    docstring for the rules and their order)."""
    try:
        return _judge(envelope, weights, keyring)
    except (ReleaseRefused, MalformedEnvelope) as exc:
        return Verdict(False, str(exc))


def _judge(envelope: Envelope, weights: WeightsDigest, keyring: Keyring) -> Verdict:
    statement = _read_statement(envelope, RELEASE_PREDICATE, "the release")
    _check_publisher(envelope, keyring)
    predicate = statement["predicate"]
    proposal = proposal_from_json(predicate.get("proposal"))
    if statement["subject"] != [proposal.weights.subject()]:
        raise ReleaseRefused("the release's subject is not the proposal's weights")
    _check_weights(weights, proposal.weights)
    raw_approvals = predicate.get("approvals")
    if not isinstance(raw_approvals, list):
        raise ReleaseRefused("the release lists no approvals")
    evaluations: dict[str, Any] = {}
    for i, raw in enumerate(raw_approvals):
        name, evaluation = _check_approval(i, raw, proposal, keyring)
        if name in evaluations:
            raise ReleaseRefused(f"approval {i}: duplicate approval by {name}")
        evaluations[name] = evaluation
    if len(evaluations) < keyring.threshold:
        raise ReleaseRefused(
            f"too few approvals: {len(evaluations)} of the {len(keyring.keys)} consortium "
            f"keys approved, the threshold is {keyring.threshold}"
        )
    approvers = tuple(sorted(evaluations))
    reason = f"released: approved by {', '.join(approvers)}"
    return Verdict(True, reason, approvers, evaluations, proposal)


def _check_publisher(envelope: Envelope, keyring: Keyring) -> None:
    keys = keyring.by_keyid()
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is not None and envelope.signature_verifies(signature, key):
            return
    raise ReleaseRefused("the release envelope bears no valid signature by a consortium key")


def _check_weights(actual: WeightsDigest, named: WeightsDigest) -> None:
    if actual.size != named.size:
        raise ReleaseRefused(
            f"the weights file was modified: {actual.size} bytes, the release names {named.size}"
        )
    if not actual.same_content(named):
        raise ReleaseRefused(
            f"the weights file was modified: blake3 {actual.blake3[:16]}..., the release "
            f"names {named.blake3[:16]}..."
        )


def _check_approval(
    i: int, raw: Any, proposal: Proposal, keyring: Keyring
) -> tuple[str, dict[str, Any]]:
    """The approver's name and evaluation of approval `i`, or `ReleaseRefused`."""
    try:
        envelope = envelope_from_json(raw)
    except MalformedEnvelope as exc:
        raise ReleaseRefused(f"approval {i}: {exc}") from exc
    if len(envelope.signatures) != 1:
        raise ReleaseRefused(f"approval {i}: has {len(envelope.signatures)} signatures, not 1")
    (signature,) = envelope.signatures
    key = keyring.find(signature.keyid)
    if key is None:
        raise ReleaseRefused(
            f"approval {i}: signed by key {signature.keyid[:16]}..., which is not in the "
            "consortium's keyring"
        )
    if not envelope.signature_verifies(signature, key):
        raise ReleaseRefused(
            f"approval {i}: the signature of {key.name} does not verify (forged or altered)"
        )
    statement = _read_statement(envelope, APPROVAL_PREDICATE, f"approval {i}")
    predicate = statement["predicate"]
    if predicate.get("proposal") != proposal.to_json():
        raise ReleaseRefused(f"approval {i} by {key.name} approves another proposal")
    if statement["subject"] != [proposal.weights.subject()]:
        raise ReleaseRefused(f"approval {i} by {key.name} names other weights")
    if predicate.get("approver") != key.name:
        raise ReleaseRefused(
            f"approval {i}: names {predicate.get('approver')!r} but is signed by {key.name}"
        )
    evaluation = predicate.get("evaluation")
    if not isinstance(evaluation, dict):
        raise ReleaseRefused(f"approval {i} by {key.name} carries no evaluation summary")
    return key.name, evaluation


def _statement(proposal: Proposal, predicate_type: str, predicate: Any) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [proposal.weights.subject()],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def _read_statement(envelope: Envelope, predicate_type: str, what: str) -> dict[str, Any]:
    if envelope.payload_type != PAYLOAD_TYPE:
        raise ReleaseRefused(f"{what}: payload type {envelope.payload_type!r}, not in-toto")
    statement = envelope.payload_json()
    if statement.get("_type") != STATEMENT_TYPE:
        raise ReleaseRefused(f"{what}: not an in-toto Statement v1")
    if statement.get("predicateType") != predicate_type:
        raise ReleaseRefused(f"{what}: predicate {statement.get('predicateType')!r}")
    if not isinstance(statement.get("predicate"), dict):
        raise ReleaseRefused(f"{what}: no predicate")
    if not isinstance(statement.get("subject"), list):
        raise ReleaseRefused(f"{what}: no subject")
    return statement


def _field(document: Mapping[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReleaseRefused(f"the proposal's {name} is missing or not {kind.__name__}")
    if kind is int and value < 0:
        raise ReleaseRefused(f"the proposal's {name} is negative")
    return value

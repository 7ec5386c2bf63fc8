"""The hub's ingest rules: which message to accept, drop as a duplicate, or reject and why,
and when a delivery is complete. Pure: facts in, a verdict out.

The ledger (ingest/ledger.py) reads the facts from its SQLite store (ingest/store.py),
asks these rules, and makes the outcome durable. The same split as the barrier's
machine.py and store.py, so every decision is tested without a database.

What the hub accepts, in one place:

- a sender must be a configured participant, a member of the open step's cycle, and
  speak about the open step. A closed step is fine only for the very delta that was
  delivered in full (a restarted uploader asking again for its receipt);
- a step counts nothing before its release: the configured first step is not open until
  its release names the model, members and codec every delta is checked against (see
  "Releases and the running sum" below);
- step releases only move forward; the same release again is a duplicate, a second model
  for one step is refused;
- a manifest's weight must be the one the cycle agreed for its sender, as the release
  announced it (docs/format.md, "Agreed weights"); a release that announces none (a step
  opened by hand) fixes none;
- with the members' keyring configured, a manifest must carry its sender's Ed25519
  signature (docs/format.md, "Signed manifests");
- one manifest per (step, participant): the same bytes again are a duplicate, other bytes
  a conflict (a replay or a forgery). It must be computed against the released model and
  be in canonical encoding, because a manifest's id is the hash of its bytes;
- a chunk must fit its manifest (index, size, digest) and hash to the digest it claims.
  Marking a chunk present a second time counts a duplicate;
- a delivery is complete when no chunk of its manifest is missing; the first time only,
  it yields a receipt.

Releases and the running sum (docs/format.md, section 9.5). The aggregator's running sum
holds exactly the chunks the ledger counts for the open step, and is zeroed only when a
*new* step opens. That is safe only if no delivery of a step is counted before the step
is opened, and a step is opened once. Both are rules here: the first step is not open
until released (`check_sender`), and a step once released is never released again
(`release_verdict`). Counting a delta early and keeping it instead would need checks
against a release not yet seen (its model, members, codec): a delta counted and then found
wrong cannot be taken back once its receipt is out. An honest participant never sends
early: it trains from the release, which the barrier publishes to the hub's queue first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from foldfed.audit.signatures import manifest_signature_problem
from foldfed.codedvector import REFERENCE_CODING, CycleCoding
from foldfed.digests import short
from foldfed.domain import (
    Chunk,
    DeliveryReceipt,
    HaveReply,
    HaveRequest,
    Manifest,
    StepReleased,
)
from foldfed.errors import Reject
from foldfed.ingest.checks import check_body_size, check_chunk_body
from foldfed.signing import VerifyKey


@dataclass
class Effects:
    """What the service must publish once the ledger has made a message durable."""

    replies: list[HaveReply] = field(default_factory=list)
    receipts: list[DeliveryReceipt] = field(default_factory=list)
    released: list[StepReleased] = field(default_factory=list)
    duplicate: bool = False


@dataclass(frozen=True)
class OpenStep:
    """The step the hub takes deltas for, as its release named it."""

    step: int
    model_digest: bytes
    members: frozenset[str]
    coding: CycleCoding = REFERENCE_CODING  # what its deltas must be coded with
    # False only for the configured first step before its release: nothing counts yet.
    released: bool = True
    # (participant, agreed weight), sorted, as the release announced them; () = none fixed.
    weights: tuple[tuple[str, float], ...] = ()
    # The cycle's L2 bound on each delta as decoded (0.0: none), as the release announced.
    norm_bound: float = 0.0


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"


def check_sender(
    participants: frozenset[str],
    open_step: OpenStep,
    step: int,
    participant: str,
    *,
    delivered: bytes = b"",
    completed_id: bytes = b"",
) -> None:
    """Reject unknown participants and steps that are not open.

    `delivered`: a manifest id the message refers to; `completed_id`: the id of the
    manifest that `participant` delivered in full for `step` (b"" if none). If both are
    that very delta, a closed step is fine.
    """
    if participant not in participants:
        raise Reject(f"unknown participant {participant!r}")
    current = open_step.step
    if step < current and delivered and completed_id == delivered:
        return
    if step < current:
        raise Reject(f"step {step} is closed (step {current} is open): replay?")
    if step > current:
        raise Reject(f"unknown step {step}: step {current} is open")
    if not open_step.released:
        raise Reject(
            f"step {step} is not released yet: the hub counts a delta only once its "
            "step's release named the model, members and codec"
        )
    if participant not in open_step.members:
        raise Reject(
            f"{participant!r} is not a member of the cycle of step {current}: "
            "a participant joins at a cycle boundary"
        )


def coding_of(msg: StepReleased, next_ranges_digest: bytes) -> CycleCoding:
    """The coding a release asks of its step's deltas. `next_ranges_digest`: what the
    release's update manifest names (b"": the first step of a cycle, coded with the spec's
    `init` ranges, or a codec without shared ranges)."""
    return CycleCoding(msg.codec, msg.codec_seed, msg.cycle, next_ranges_digest, msg.codec_choices)


def release_verdict(open_step: OpenStep, msg: StepReleased) -> Verdict:
    """Whether `msg` opens a new step (ACCEPT) or repeats one (DUPLICATE).

    A step is released once: opening it again would zero the running sum under the
    deliveries already counted for it, so another model for a released step is refused,
    even when the first release named none (a step opened by hand)."""
    if msg.step < open_step.step:
        return Verdict.DUPLICATE
    if msg.step > open_step.step or not open_step.released:
        return Verdict.ACCEPT
    if msg.model_digest == open_step.model_digest:
        return Verdict.DUPLICATE
    raise Reject(
        f"step {msg.step} was already released with model "
        f"{short(open_step.model_digest) or '(none)'}"
    )


def manifest_verdict(
    m: Manifest,
    manifest_id: bytes,
    accepted_id: bytes | None,
    released_model: bytes,
    *,
    canonical: bool,
) -> Verdict:
    """Whether a manifest (already self-consistent, see checks.check_manifest) is new.

    `accepted_id`: the id of the manifest already accepted for (step, participant), if
    any; `canonical`: whether its bytes are what our encoder makes of it.
    """
    if accepted_id is not None:
        if accepted_id != manifest_id:
            raise Reject(
                f"conflicting manifest for step {m.step}: {short(accepted_id)} already "
                f"accepted, got {short(manifest_id)} (replay or forgery?)"
            )
        return Verdict.DUPLICATE
    if released_model and m.base_model_digest != released_model:
        raise Reject(
            f"delta was computed against model {short(m.base_model_digest) or '(none)'}, "
            f"but step {m.step} released {short(released_model)}"
        )
    if not canonical:
        # Ids are hashes of canonical bytes: anything else (unknown fields, another
        # encoder's ordering) would give one delta two ids.
        raise Reject("manifest is not in canonical form (unknown fields?)")
    return Verdict.ACCEPT


def check_weight(m: Manifest, open_step: OpenStep) -> None:
    """Reject a manifest whose weight is not the one the cycle agreed for its sender.

    Weights are agreed per cycle, never claimed per step: a sender that declared 1e9
    samples would otherwise decide the update alone."""
    if not open_step.weights:
        return
    agreed = dict(open_step.weights).get(m.participant)
    if agreed is None:
        raise Reject(f"the cycle agreed no weight for {m.participant!r}")
    if m.weight != agreed:
        raise Reject(
            f"manifest weight {m.weight!r} differs from the weight the cycle agreed for "
            f"{m.participant!r}: {agreed!r}"
        )


def check_signature(m: Manifest, unsigned: bytes, keys: Mapping[str, VerifyKey]) -> None:
    """Reject a manifest its sender did not sign with the key the hub's keyring holds for
    it. `unsigned`: its canonical bytes without the signature (what the signature covers).

    The AMQP identity says which connection sent it; the signature makes the contribution
    provable afterwards, to anyone with the keyring (`foldfed verify`)."""
    problem = manifest_signature_problem(m.participant, unsigned, m.signature, keys)
    if problem:
        raise Reject(problem)


def check_chunk(c: Chunk, manifest: Manifest | None, actual_digest: bytes) -> None:
    """Reject a chunk that does not fit its manifest (when known) or its own digest.

    A chunk may come before its manifest (redelivery reorders): it is then only checked
    against its digest, and the manifest counts it when it comes.
    """
    check_body_size(len(c.body))
    if manifest is not None:
        check_chunk_body(manifest, c.index, c.digest, len(c.body))
    if actual_digest != c.digest:
        raise Reject(
            f"digest mismatch: chunk {c.index} hashes to {short(actual_digest)}, "
            f"message claims {short(c.digest)}"
        )


def chunk_verdict(newly_present: bool) -> Verdict:
    """A chunk of a known manifest counts once; marking it again is a duplicate."""
    return Verdict.ACCEPT if newly_present else Verdict.DUPLICATE


def have_reply(
    r: HaveRequest, accepted_id: bytes | None, missing: tuple[int, ...]
) -> tuple[HaveReply, bool]:
    """The answer to a have-request, and whether to send the receipt again.

    Delivered already: the receipt goes again, the asker may have lost the first one (an
    uploader killed after completion). Receipts are idempotent.
    """
    if accepted_id is None or accepted_id != r.manifest_id:
        return HaveReply(
            r.step, r.participant, r.manifest_id, r.request_id, (), "unknown manifest"
        ), False
    return HaveReply(r.step, r.participant, r.manifest_id, r.request_id, missing), not missing


def is_complete(missing: int) -> bool:
    """A delivery is complete when no chunk of its manifest is missing."""
    return missing == 0


def receipt(
    m: Manifest, manifest_id: bytes, duplicates: int, completed_ms: int | None
) -> DeliveryReceipt:
    """The receipt for a complete delivery of `m`."""
    return DeliveryReceipt(
        step=m.step,
        participant=m.participant,
        manifest_id=manifest_id,
        payload_digest=m.payload_digest,
        chunk_count=len(m.chunk_digests),
        payload_size=m.payload_size,
        duplicate_chunks=duplicates,
        completed_unix_ms=completed_ms or 0,
    )

"""Rejection reasons fall into stable classes (foldfed.rejections): the words the hub's checks
use today each name their class, and a count per class is what services log and the
monitor shows."""

from __future__ import annotations

import pytest

from foldfed.rejections import OTHER, RejectionCounts, known_classes, reason_class

# Reasons as the hub's checks word them (values filled in), and the class each must get.
REASONS = {
    "forged sender: message claims participant 'org-b' but was published by user 'org-a'": (
        "forged-sender"
    ),
    "forged sender: report for 'org-b' from user 'org-a'": "forged-sender",
    "only the hub releases steps, not 'org-a'": "hub-only",
    "foldfed.v1.DeliveryReceipt from 'org-a': only the hub says so": "hub-only",
    "aggregator event from 'org-a': only the hub sends those": "hub-only",
    "foldfed.v1.Event does not belong on the ingest queue": "wrong-queue",
    "StepReleased does not belong on the events exchange": "wrong-queue",
    "unknown message type 'foldfed.v1.Nonsense'": "unknown-type",
    "malformed foldfed.v1.Chunk: Error parsing message": "malformed",
    "manifest weight nan must be finite and > 0": "bad-number",
    "tensor 'w' has 3 non-finite values (NaN or inf)": "bad-number",
    "unknown participant 'org-x'": "unknown-participant",
    "step 0 is closed (step 1 is open): replay?": "closed-step",
    "unknown step 7: step 1 is open": "unknown-step",
    "step 1 is not released yet: the hub counts a delta only once ...": "not-released",
    "'org-c' is not a member of the cycle of step 2: a participant joins ...": "not-member",
    "step 2 was already released with model 1a2b3c": "release-conflict",
    "conflicting manifest for step 1: aa already accepted, got bb (replay or forgery?)": (
        "conflicting-manifest"
    ),
    "delta was computed against model (none), but step 1 released 1a2b": "wrong-base-model",
    "manifest is not in canonical form (unknown fields?)": "non-canonical",
    "manifest weight 1000000000.0 differs from the weight the cycle agreed for 'org-a': 1.0": (
        "weight"
    ),
    "update norm over the bound: chunks so far reach L2 norm 3 > 1": "over-bound",
    "the hub runs secure aggregation: deltas must be masked (masked-ring)": "masking",
    "a masked delta, but the hub does not run secure aggregation": "masking",
    "manifest masks on a 32-bit ring; the hub's is 64": "masking",
    "manifest masks for cycle 5; the step's cycle is 6": "masking",
    "a masked manifest's ring_bits must be 32 or 64, not 0": "masking",
    "attested norm 3 is above the step's update bound 1": "masking",
    "masked payload of 8 bytes: 3 elements of 32 bits need 12": "masking",
    "masked tensor 'w' is not at its place in the model's order": "masking",
    "oversized chunk: 4194305 bytes > 4194304": "oversized",
    "payload_size 0 outside 1..1073741824 bytes": "oversized",
    "digest mismatch: chunk 0 hashes to aa, message claims bb": "digest-mismatch",
    "chunk 0 digest aabbcc is not the manifest's": "digest-mismatch",
    "chunk index 9 out of range: manifest has 2": "chunk-mismatch",
    "chunk 1 is 10 bytes; the manifest says 12": "chunk-mismatch",
    "manifest codec 'int8:v1' does not match the cycle's 'fp32:v1' (sent as ...)": "codec",
    "chunk 3 does not decode: truncated": "codec",
    "tensor 'x' is not part of the model": "layout",
    "shape mismatch for tensor 'w': expected [2], got [3]": "layout",
    "manifest lists no tensors": "invalid-field",
    "manifest lists 3 chunk digests; 10 bytes in chunks of 4 need 3": "invalid-field",
    "payload_digest must be 32 bytes, got 3": "invalid-field",
    "cannot finalize step 3: no delivery from ['org-b']": "finalize",
    "hub could not process it: OSError('disk full: unknown participant')": "hub-failure",
}


@pytest.mark.parametrize(("reason", "expected"), REASONS.items())
def test_each_reason_the_hub_gives_has_its_class(reason: str, expected: str) -> None:
    assert reason_class(reason) == expected


def test_an_unknown_reason_is_other_and_every_class_is_listed() -> None:
    assert reason_class("the moon is made of cheese") == OTHER
    assert set(REASONS.values()) | {OTHER} <= set(known_classes())
    assert known_classes()[-1] == OTHER


def test_counts_per_class() -> None:
    counts = RejectionCounts()
    assert counts.total == 0 and counts.as_dict() == {}
    assert counts.count("unknown step 7: step 1 is open") == "unknown-step"
    counts.count("unknown step 8: step 1 is open")
    counts.count("forged sender: ...")
    assert counts.total == 3
    assert counts.as_dict() == {"forged-sender": 1, "unknown-step": 2}
    assert list(counts.as_dict()) == sorted(counts.as_dict())

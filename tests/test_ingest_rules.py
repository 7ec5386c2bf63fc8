"""The ingest rules alone: every accept, duplicate and reject decision, with no SQLite, no
chunk store and no files (ingest/rules.py). tests/test_ledger.py runs them durably."""

from __future__ import annotations

import subprocess
import sys

import pytest

from foldfed.digests import digest_of
from foldfed.domain import (
    CODEC_SAFETENSORS,
    Chunk,
    HaveRequest,
    Manifest,
    StepReleased,
)
from foldfed.errors import Reject
from foldfed.format import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TensorSpan
from foldfed.ingest.rules import (
    OpenStep,
    Verdict,
    check_chunk,
    check_sender,
    check_weight,
    chunk_verdict,
    have_reply,
    is_complete,
    manifest_verdict,
    receipt,
    release_verdict,
)

PARTICIPANTS = frozenset({"org-a", "org-b", "org-c"})
MODEL = digest_of(b"theta_3")
OPEN = OpenStep(3, MODEL, frozenset({"org-a", "org-b"}))
BODY = b"\x01" * 64
ID = digest_of(b"manifest")
OTHER_ID = digest_of(b"another manifest")


def manifest(base: bytes = MODEL) -> Manifest:
    return Manifest(
        step=3,
        participant="org-a",
        weight=2.0,
        codec=CODEC_SAFETENSORS,
        tensors=(TensorSpan("w", "U8", (64,), 0, 64),),
        chunk_size=MIN_CHUNK_SIZE,
        payload_size=64,
        chunk_digests=(digest_of(BODY),),
        payload_digest=digest_of(BODY),
        base_model_digest=base,
    )


# ------------------------------------------------------------------------------- senders


def test_a_member_speaking_about_the_open_step_is_accepted() -> None:
    check_sender(PARTICIPANTS, OPEN, 3, "org-a")


@pytest.mark.parametrize(
    ("step", "participant", "reason"),
    [
        (3, "mallory", "unknown participant"),
        (2, "org-a", "step 2 is closed"),
        (4, "org-a", "unknown step 4"),
        (3, "org-c", "not a member of the cycle"),
    ],
)
def test_senders_outside_the_open_step_are_rejected(
    step: int, participant: str, reason: str
) -> None:
    with pytest.raises(Reject, match=reason):
        check_sender(PARTICIPANTS, OPEN, step, participant)


def test_a_closed_step_is_fine_only_for_the_delta_delivered_in_full() -> None:
    check_sender(PARTICIPANTS, OPEN, 2, "org-a", delivered=ID, completed_id=ID)
    with pytest.raises(Reject, match="closed"):
        check_sender(PARTICIPANTS, OPEN, 2, "org-a", delivered=OTHER_ID, completed_id=ID)
    with pytest.raises(Reject, match="closed"):
        check_sender(PARTICIPANTS, OPEN, 2, "org-a", delivered=ID, completed_id=b"")
    with pytest.raises(Reject, match="closed"):  # b"" never matches "nothing delivered"
        check_sender(PARTICIPANTS, OPEN, 2, "org-a", delivered=b"", completed_id=b"")


# ------------------------------------------------------------------------------- releases


def test_releases_only_move_forward() -> None:
    members = ("org-a", "org-b")
    assert release_verdict(OPEN, StepReleased(4, digest_of(b"t4"), members)) is Verdict.ACCEPT
    assert release_verdict(OPEN, StepReleased(3, MODEL, members)) is Verdict.DUPLICATE
    assert release_verdict(OPEN, StepReleased(2, b"", members)) is Verdict.DUPLICATE
    with pytest.raises(Reject, match="already released"):
        release_verdict(OPEN, StepReleased(3, digest_of(b"other"), members))
    # The first step opened by configuration has no model yet: its release names one.
    unnamed = OpenStep(1, b"", frozenset(members), released=False)
    assert release_verdict(unnamed, StepReleased(1, MODEL, members)) is Verdict.ACCEPT
    assert release_verdict(unnamed, StepReleased(1, b"", members)) is Verdict.ACCEPT


def test_a_released_step_is_never_released_again() -> None:
    """Opening a step again would zero its running sum under counted deliveries."""
    by_hand = OpenStep(1, b"", frozenset({"org-a"}))  # released without a model
    assert release_verdict(by_hand, StepReleased(1, b"", ("org-a",))) is Verdict.DUPLICATE
    with pytest.raises(Reject, match=r"already released with model \(none\)"):
        release_verdict(by_hand, StepReleased(1, MODEL, ("org-a",)))


def test_nothing_is_accepted_for_a_step_before_its_release() -> None:
    waiting = OpenStep(1, b"", PARTICIPANTS, released=False)
    for participant in sorted(PARTICIPANTS):
        with pytest.raises(Reject, match="step 1 is not released yet"):
            check_sender(PARTICIPANTS, waiting, 1, participant)
    with pytest.raises(Reject, match="unknown participant"):  # still the first check
        check_sender(PARTICIPANTS, waiting, 1, "mallory")


# ------------------------------------------------------------------------------- manifests


def test_a_new_canonical_manifest_on_the_released_model_is_accepted() -> None:
    assert manifest_verdict(manifest(), ID, None, MODEL, canonical=True) is Verdict.ACCEPT
    # No model named yet: any base goes.
    assert manifest_verdict(manifest(b""), ID, None, b"", canonical=True) is Verdict.ACCEPT


def test_the_same_manifest_again_is_a_duplicate_and_another_one_a_conflict() -> None:
    assert manifest_verdict(manifest(), ID, ID, MODEL, canonical=True) is Verdict.DUPLICATE
    with pytest.raises(Reject, match="conflicting manifest"):
        manifest_verdict(manifest(), OTHER_ID, ID, MODEL, canonical=True)


def test_a_manifest_on_another_model_or_not_canonical_is_rejected() -> None:
    with pytest.raises(Reject, match="computed against model"):
        manifest_verdict(manifest(digest_of(b"stale")), ID, None, MODEL, canonical=True)
    with pytest.raises(Reject, match=r"\(none\)"):
        manifest_verdict(manifest(b""), ID, None, MODEL, canonical=True)
    with pytest.raises(Reject, match="canonical"):
        manifest_verdict(manifest(), ID, None, MODEL, canonical=False)


# ------------------------------------------------------------------------------- chunks


def test_a_chunk_must_fit_its_manifest_and_its_digest() -> None:
    good = Chunk(3, "org-a", 0, digest_of(BODY), BODY)
    check_chunk(good, manifest(), digest_of(BODY))
    check_chunk(good, None, digest_of(BODY))  # before its manifest: the digest only
    with pytest.raises(Reject, match="digest mismatch"):
        check_chunk(good, None, digest_of(b"tampered"))
    with pytest.raises(Reject, match="out of range"):
        check_chunk(Chunk(3, "org-a", 1, digest_of(BODY), BODY), manifest(), digest_of(BODY))
    with pytest.raises(Reject, match="the manifest says 64"):
        check_chunk(Chunk(3, "org-a", 0, digest_of(b"x"), b"x"), manifest(), digest_of(b"x"))
    huge = b"\0" * (MAX_CHUNK_SIZE + 1)
    with pytest.raises(Reject, match="oversized"):
        check_chunk(Chunk(3, "org-a", 0, digest_of(huge), huge), None, digest_of(huge))


def test_a_chunk_counts_once() -> None:
    assert chunk_verdict(newly_present=True) is Verdict.ACCEPT
    assert chunk_verdict(newly_present=False) is Verdict.DUPLICATE


# ------------------------------------------------------------------------------- delivery


def test_a_have_request_is_answered_for_the_accepted_manifest_only() -> None:
    request = HaveRequest(3, "org-a", ID, "req-1")
    reply, resend = have_reply(request, ID, (1, 4))
    assert (reply.missing, reply.error, reply.request_id, resend) == ((1, 4), "", "req-1", False)
    reply, resend = have_reply(request, ID, ())
    assert (reply.missing, reply.error, resend) == ((), "", True)  # receipt goes again
    for accepted in (None, OTHER_ID):
        reply, resend = have_reply(request, accepted, (1,))
        assert (reply.missing, reply.error, resend) == ((), "unknown manifest", False)


def test_a_delivery_is_complete_when_nothing_is_missing() -> None:
    assert is_complete(0) and not is_complete(1)


def test_the_receipt_names_the_manifest_and_the_payload() -> None:
    m = manifest()
    r = receipt(m, ID, 2, 1234)
    assert (r.step, r.participant, r.manifest_id) == (3, "org-a", ID)
    assert r.payload_digest == digest_of(BODY)
    assert (r.chunk_count, r.payload_size) == (1, 64)
    assert (r.duplicate_chunks, r.completed_unix_ms) == (2, 1234)
    assert receipt(m, ID, 0, None).completed_unix_ms == 0


def test_the_rules_load_no_database_and_no_wire_code() -> None:
    probe = (
        "import sys, foldfed.ingest.rules; "
        "print(sorted(m for m in ('sqlite3', 'foldfed.v1', 'asyncio', 'torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- weights


def test_a_manifest_must_declare_the_weight_the_cycle_agreed() -> None:
    agreed = OpenStep(3, MODEL, frozenset({"org-a", "org-b"}), weights=(("org-a", 2.0),))
    check_weight(manifest(), agreed)  # manifest() declares 2.0
    forged = Manifest(**{**manifest().__dict__, "weight": 1e9})
    with pytest.raises(Reject) as info:
        check_weight(forged, agreed)
    assert info.value.reason == (
        "manifest weight 1000000000.0 differs from the weight the cycle agreed for 'org-a': 2.0"
    )
    check_weight(forged, OPEN)  # a step opened by hand fixes no weight
    other = Manifest(**{**manifest().__dict__, "participant": "org-b"})
    with pytest.raises(Reject, match="agreed no weight for 'org-b'"):
        check_weight(other, agreed)

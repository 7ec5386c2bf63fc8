"""The uploader's round planning alone (uploader/planning.py): which chunks travel, in
which order, given the hub's have-reply and the journal. No broker, no files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foldfed.digests import digest_of
from foldfed.domain import CODEC_SAFETENSORS, Manifest
from foldfed.errors import FoldfedError
from foldfed.format import MIN_CHUNK_SIZE, TensorSpan
from foldfed.uploader.planning import (
    chunk_length,
    journal_trusted,
    plan_round,
    resumes,
)

CHUNK = MIN_CHUNK_SIZE


def manifest(payload_size: int, step: int = 4, weight: float = 3.0) -> Manifest:
    count = -(-payload_size // CHUNK)
    return Manifest(
        step=step,
        participant="org-a",
        weight=weight,
        codec=CODEC_SAFETENSORS,
        tensors=(TensorSpan("w", "U8", (payload_size,), 0, payload_size),),
        chunk_size=CHUNK,
        payload_size=payload_size,
        chunk_digests=tuple(digest_of(bytes([i % 256, i // 256])) for i in range(count)),
        payload_digest=digest_of(b"payload"),
        base_model_digest=digest_of(b"theta"),
    )


FIVE = manifest(4 * CHUNK + 100)  # four whole chunks and a short one


def test_a_fresh_upload_sends_what_the_hub_lacks_in_index_order() -> None:
    plan = plan_round(FIVE, [3, 0, 4], set(), trust_journal=True)
    assert plan.send == (0, 3, 4)
    assert plan.send_bytes == 2 * CHUNK + 100
    assert (plan.held_by_hub, plan.journaled) == (2, 0)


def test_the_first_round_skips_what_the_broker_confirmed_later_rounds_do_not() -> None:
    first = plan_round(FIVE, [0, 1, 2, 3, 4], {1, 2}, trust_journal=True)
    assert (first.send, first.journaled, first.held_by_hub) == ((0, 3, 4), 2, 0)
    again = plan_round(FIVE, [1, 2], {1, 2}, trust_journal=False)
    assert (again.send, again.journaled, again.held_by_hub) == ((1, 2), 0, 3)
    assert journal_trusted(1) and not journal_trusted(2) and not journal_trusted(5)


def test_the_hubs_reply_wins_over_the_journal() -> None:
    # Confirmed but held by the hub: counted as held, never as journaled.
    plan = plan_round(FIVE, [4], {0, 1, 2, 3, 4}, trust_journal=True)
    assert (plan.send, plan.held_by_hub, plan.journaled) == ((), 4, 1)


def test_a_hub_that_names_a_chunk_the_manifest_lacks_is_an_error() -> None:
    with pytest.raises(FoldfedError, match=r"chunks \[5\], the manifest has 5"):
        plan_round(FIVE, [1, 5], set(), trust_journal=True)
    with pytest.raises(FoldfedError, match="-1"):
        plan_round(FIVE, [-1], set(), trust_journal=True)


def test_the_last_chunk_may_be_short() -> None:
    assert [chunk_length(FIVE, i) for i in range(5)] == [CHUNK] * 4 + [100]
    assert chunk_length(manifest(2 * CHUNK), 1) == CHUNK


@given(
    chunks=st.integers(1, 40),
    tail=st.integers(1, CHUNK),
    data=st.data(),
    trust=st.booleans(),
)
def test_every_chunk_is_sent_skipped_as_held_or_skipped_as_journaled_exactly_once(
    chunks: int, tail: int, data: st.DataObject, trust: bool
) -> None:
    m = manifest((chunks - 1) * CHUNK + tail)
    indices = st.integers(0, chunks - 1)
    missing = data.draw(st.lists(indices, max_size=60))
    confirmed = data.draw(st.sets(indices))
    plan = plan_round(m, missing, confirmed, trust_journal=trust)
    assert list(plan.send) == sorted(set(plan.send))  # ascending, no repeats
    assert set(plan.send) <= set(missing)
    assert not trust or not set(plan.send) & confirmed
    assert len(plan.send) + plan.held_by_hub + plan.journaled == chunks
    assert plan.send_bytes == sum(chunk_length(m, i) for i in plan.send)
    if not trust:
        assert set(plan.send) == set(missing) and plan.journaled == 0


def test_a_journaled_manifest_resumes_only_the_same_delivery() -> None:
    base = FIVE.base_model_digest
    same = {"step": 4, "participant": "org-a", "weight": 3.0, "base_model_digest": base}
    assert resumes(FIVE, **same)
    for key, other in [
        ("step", 5),
        ("participant", "org-b"),
        ("weight", 2.0),
        ("base_model_digest", b""),
    ]:
        assert not resumes(FIVE, **{**same, key: other}), key

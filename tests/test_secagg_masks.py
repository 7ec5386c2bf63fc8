"""Pairwise masks (foldfed.secagg): they cancel exactly in the sum, any chunking, any N;
they are seekable and deterministic; a masked vector alone looks nothing like its q."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.secagg.agreement import pair_keys, public_of, x25519_private, x25519_public
from foldfed.secagg.masks import (
    MaskRangeError,
    contribution_limit,
    mask_contribution,
    member_mask,
    pair_key,
    pair_mask,
    ring_reduce,
    words_from_bytes,
    words_to_sum_terms,
)
from foldfed.signing import SigningKey

NAMES = ["company-a", "company-b", "company-c", "company-d", "company-e"]
KEYS = {n: SigningKey(n, bytes([i + 1]) * 32) for i, n in enumerate(NAMES)}


def _pair_keys(members: list[str], cycle: int = 7, step: int = 3) -> dict[str, dict[str, bytes]]:
    publics = {n: KEYS[n].public for n in members}
    return {n: pair_keys(n, KEYS[n].seed, publics, cycle=cycle, step=step) for n in members}


def test_x25519_keys_derived_from_ed25519_agree() -> None:
    for key in KEYS.values():
        assert public_of(x25519_private(key.seed)) == x25519_public(key.public)
    keys = _pair_keys(NAMES[:2])
    assert keys[NAMES[0]][NAMES[1]] == keys[NAMES[1]][NAMES[0]]


def test_pair_keys_differ_per_cycle_step_and_pair() -> None:
    secret = b"s" * 32
    seen = {
        pair_key(secret, 1, 1, "a", "b"),
        pair_key(secret, 2, 1, "a", "b"),
        pair_key(secret, 1, 2, "a", "b"),
        pair_key(secret, 1, 1, "a", "c"),
        pair_key(secret, 1, 1, "ab", "c"),
        pair_key(secret, 1, 1, "a", "bc"),
    }
    assert len(seen) == 6
    with pytest.raises(ValueError):
        pair_key(secret, 1, 1, "b", "a")


@pytest.mark.parametrize("bits", [32, 64])
def test_pair_mask_is_seekable(bits: int) -> None:
    key = bytes(range(32))
    whole = pair_mask(key, 0, 1000, bits)
    for begin, end in [(0, 1), (1, 2), (3, 7), (37, 501), (999, 1000), (500, 500)]:
        assert np.array_equal(pair_mask(key, begin, end, bits), whole[begin:end])


@settings(max_examples=25, deadline=None)
@given(
    members=st.integers(2, 5),
    bits=st.sampled_from([32, 64]),
    size=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 700), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_masks_cancel_exactly_over_any_chunking(
    members: int, bits: int, size: int, cuts: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    names = NAMES[:members]
    keys = _pair_keys(names)
    limit = contribution_limit(bits, members)
    qs = {n: rng.integers(-limit, limit + 1, size, dtype=np.int64) for n in names}
    bounds = sorted({0, size, *(c for c in cuts if c < size)})
    total = np.zeros(size, dtype=np.int64)
    for name in names:  # each member cuts its vector its own way: masks are by element
        for begin, end in itertools.pairwise(bounds):
            mask = member_mask(name, keys[name], begin, end, bits)
            words = mask_contribution(qs[name][begin:end], mask, bits, members)
            wire = words_from_bytes(words.tobytes(), bits)
            np.add(total[begin:end], words_to_sum_terms(wire, bits), out=total[begin:end])
    assert np.array_equal(ring_reduce(total, bits), sum(qs.values()))


def test_masks_are_deterministic_per_cycle_step_pair() -> None:
    a = member_mask(NAMES[0], _pair_keys(NAMES[:3])[NAMES[0]], 0, 64, 32)
    again = member_mask(NAMES[0], _pair_keys(NAMES[:3])[NAMES[0]], 0, 64, 32)
    other_step = member_mask(NAMES[0], _pair_keys(NAMES[:3], step=4)[NAMES[0]], 0, 64, 32)
    assert np.array_equal(a, again)
    assert not np.array_equal(a, other_step)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_masked_vector_reveals_nothing_obvious(bits: int) -> None:
    rng = np.random.default_rng(0)
    q = np.round(rng.normal(0, 2**16, 1 << 16)).astype(np.int64)
    name = NAMES[0]
    mask = member_mask(name, _pair_keys(NAMES[:3])[name], 0, q.size, bits)
    words = mask_contribution(q, mask, bits, 3)
    signed = ring_reduce(words_to_sum_terms(words, bits), bits)
    assert not np.any(signed == q)  # P(one word equals its q) = 2**-bits per element
    assert abs(np.corrcoef(signed.astype(np.float64), q.astype(np.float64))[0, 1]) < 0.02
    # Uniform over the ring: the top bit is set about half the time.
    top = (words >> np.array(bits - 1, dtype=words.dtype)).astype(np.int64)
    assert abs(top.mean() - 0.5) < 0.01
    assert q.tobytes()[:32] not in words.tobytes()


def test_a_contribution_too_large_for_the_ring_is_refused() -> None:
    limit = contribution_limit(32, 4)
    q = np.array([limit + 1], dtype=np.int64)
    with pytest.raises(MaskRangeError, match="FOLDFED_SECAGG_RING_BITS=64"):
        mask_contribution(q, np.zeros(1, dtype="<u4"), 32, 4)
    mask_contribution(q - 1, np.zeros(1, dtype="<u4"), 32, 4)


def test_ring_reduce_reads_signed_words() -> None:
    total = np.array([0, 1, -1, (1 << 32) + 5, (3 << 32) - 7, (1 << 31) - 1], dtype=np.int64)
    assert ring_reduce(total, 32).tolist() == [0, 1, -1, 5, -7, (1 << 31) - 1]
    assert ring_reduce(total, 64).tolist() == total.tolist()

"""The retention policy's decisions (foldfed.retention), without any file: what a resume,
a crash replay or the audit trail needs is never deletable (docs/retention.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foldfed.retention import (
    HubHoldings,
    RetentionPolicy,
    hub_garbage,
    spent_downloads,
    spent_uploads,
)


def d(n: int) -> bytes:
    return n.to_bytes(32, "big")


def holdings(open_step: int, **kw: object) -> HubHoldings:
    steps = range(1, open_step + 2)
    base: dict[str, object] = {
        "open_step": open_step,
        "models": frozenset(steps),
        "updates": frozenset(range(1, open_step + 1)),
        "chunks": frozenset(),
        "manifest_digests": {},
    }
    return HubHoldings(**{**base, **kw})  # type: ignore[arg-type]


def test_the_hub_keeps_the_open_steps_base_and_the_update_that_made_it() -> None:
    garbage = hub_garbage(holdings(7), RetentionPolicy(keep_steps=1, checkpoint_every=0))
    assert garbage.models == (1, 2, 3, 4, 5, 6)  # θ_7 (base) and θ_8 (finalizing) stay
    assert garbage.updates == (1, 2, 3, 4, 5)  # U_6 (made θ_7) and U_7 stay


def test_every_kth_checkpoint_is_kept() -> None:
    garbage = hub_garbage(holdings(12), RetentionPolicy(keep_steps=1, checkpoint_every=5))
    assert 5 not in garbage.models and 10 not in garbage.models
    assert 4 in garbage.models and 11 in garbage.models


def test_live_chunks_are_the_open_steps_manifests_and_its_shared_ranges() -> None:
    held = holdings(
        3,
        chunks=frozenset(d(i) for i in range(10)),
        manifest_digests={2: [d(0), d(1)], 3: [d(2), d(3)]},
        pinned=frozenset({d(4)}),
    )
    garbage = hub_garbage(held, RetentionPolicy(keep_steps=1))
    assert set(garbage.chunks) == {d(0), d(1), *(d(i) for i in range(5, 10))}
    wider = hub_garbage(held, RetentionPolicy(keep_steps=2))
    assert set(wider.chunks) == {d(i) for i in range(5, 10)}


def test_a_chunk_shared_by_an_old_and_a_live_manifest_stays() -> None:
    held = holdings(3, chunks=frozenset({d(1)}), manifest_digests={2: [d(1)], 3: [d(1)]})
    assert hub_garbage(held, RetentionPolicy()).chunks == ()


def test_retention_off_deletes_nothing() -> None:
    held = holdings(9, chunks=frozenset({d(1)}))
    assert not hub_garbage(held, RetentionPolicy(keep_steps=0))
    assert spent_uploads([1, 2, 3], RetentionPolicy(keep_steps=0)) == ()
    assert spent_downloads(frozenset({d(1)}), [d(1)], [], [], RetentionPolicy(0)) == ()


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(keep_steps=-1)


@given(
    open_step=st.integers(1, 200),
    keep=st.integers(1, 5),
    every=st.integers(0, 10),
)
def test_the_hub_never_deletes_what_finalize_or_a_repeat_needs(
    open_step: int, keep: int, every: int
) -> None:
    garbage = hub_garbage(holdings(open_step), RetentionPolicy(keep, every))
    assert open_step not in garbage.models and open_step + 1 not in garbage.models
    assert open_step - 1 not in garbage.updates and open_step not in garbage.updates
    assert all(s < open_step for s in garbage.models)


def test_a_participant_keeps_its_newest_sent_deltas() -> None:
    assert spent_uploads([3, 1, 2, 4], RetentionPolicy(keep_steps=1)) == (1, 2, 3)
    assert spent_uploads([3, 1, 2, 4], RetentionPolicy(keep_steps=3)) == (1,)
    assert spent_uploads([], RetentionPolicy(keep_steps=1)) == ()


def test_downloads_go_once_written_but_unsent_ranges_stay() -> None:
    stored = frozenset(d(i) for i in range(6))
    spent = spent_downloads(
        stored,
        written_update=[d(0), d(1), d(9)],  # d(9) was never stored
        ranges_of_sent=[d(2)],
        ranges_of_unsent=[d(3), d(1)],  # a range chunk equal to an update chunk stays
        policy=RetentionPolicy(),
    )
    assert spent == (d(0), d(2))

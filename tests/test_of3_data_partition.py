"""The held-out and company rule of the OpenFold3 sample (pure, no files, no OpenFold3)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.demo.main import participant_names
from foldfed.errors import ConfigError
from foldfed.of3.data import partition
from foldfed.of3.data.partition import assign, cluster_id, company_names

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def _protein(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(AMINO) for _ in range(n))


def _entries(n: int, seed: int = 0) -> dict[str, str]:
    """n entries over fewer proteins (some complexes share a protein), as cluster ids."""
    rng = random.Random(seed)
    proteins = [_protein(rng, rng.randint(80, 400)) for _ in range(max(1, n * 4 // 5))]
    out = {}
    for i in range(n):
        chains = [rng.choice(proteins)]
        if rng.random() < 0.2:
            chains.append(rng.choice(proteins))
        out[f"{i:04d}"] = cluster_id(chains, f"{i:04d}")
    return out


def test_cluster_id_depends_on_the_proteins_only() -> None:
    rng = random.Random(1)
    a, b = _protein(rng, 250), _protein(rng, 120)
    assert cluster_id([a, b], "x") == cluster_id([b.lower(), a, a], "y")
    assert cluster_id([a], "x") != cluster_id([b], "x")
    assert cluster_id([], "1abc") == "entry:1abc"
    assert cluster_id(["MKV"], "x") == cluster_id(["mkv "], "y")  # shorter than k


def test_cluster_id_mostly_survives_another_construct() -> None:
    """MinHash: same id with probability = Jaccard similarity of the k-mer sets (~0.96
    for 3 residues cut and 3 added on 250), and unrelated proteins never share one."""
    rng = random.Random(2)
    proteins = [_protein(rng, 250) for _ in range(200)]
    same = sum(cluster_id([p], "x") == cluster_id([p[3:] + "GSH"], "x") for p in proteins)
    assert same >= 180, same
    assert len({cluster_id([p], "x") for p in proteins}) == len(proteins)


def test_company_names_match_the_demo() -> None:
    assert company_names(5) == participant_names(5)
    with pytest.raises(ConfigError):
        company_names(0)


@pytest.mark.parametrize("companies", [3, 5])
def test_partition_properties_on_thirty_entries(companies: int) -> None:
    clusters = _entries(30)
    result = assign(clusters, companies)
    assert sorted(result) == sorted(clusters)

    train_clusters = {a.cluster for a in result.values() if a.split == "train"}
    held_clusters = {a.cluster for a in result.values() if a.split == "heldout"}
    assert not train_clusters & held_clusters  # no cluster on both sides, any company
    held = [a for a in result.values() if a.split == "heldout"]
    assert len(held) >= 5, f"only {len(held)} held out"
    for name in company_names(companies):
        assert any(a.company == name and a.split == "train" for a in result.values())
    sizes = [
        sum(1 for a in result.values() if a.company == n and a.split == "train")
        for n in company_names(companies)
    ]
    assert max(sizes) - min(sizes) <= 1

    # stable when run twice and independent of input order
    shuffled = list(clusters.items())
    random.Random(7).shuffle(shuffled)
    assert assign(dict(shuffled), companies) == result
    assert assign(clusters, companies) == result


def test_heldout_is_decided_per_cluster_without_the_others() -> None:
    clusters = _entries(30)
    key = partition.derive_key(partition.DEFAULT_KEY)
    full = assign(clusters, 3)
    for entry_id, a in full.items():
        alone = partition.is_heldout(a.cluster, key, partition.DEFAULT_HELDOUT_FRACTION)
        assert alone == (a.split == "heldout")
        # the same decision when the entry is the only one a company holds
        assert assign({entry_id: a.cluster}, 3)[entry_id].split == a.split


def test_key_and_fraction() -> None:
    clusters = _entries(60, seed=3)
    a = assign(clusters, 3, key="consortium-1")
    b = assign(clusters, 3, key="consortium-2")
    assert a != b
    assert all(x.split == "train" for x in assign(clusters, 3, heldout_fraction=0.0).values())
    with pytest.raises(ConfigError):
        assign(clusters, 3, heldout_fraction=1.0)
    with pytest.raises(ConfigError):
        assign(clusters, 3, key="")


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="0123456789abcdef", min_size=4, max_size=4),
        st.sampled_from([f"c{i}" for i in range(12)]),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=1, max_value=6),
    st.floats(min_value=0.0, max_value=0.9),
)
def test_no_cluster_leaks_for_any_input(
    clusters: dict[str, str], companies: int, fraction: float
) -> None:
    result = assign(clusters, companies, "k", fraction)
    by_split: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for a in result.values():
        by_split[a.split].add(a.cluster)
    assert not by_split["train"] & by_split["heldout"]
    n_train = sum(1 for a in result.values() if a.split == "train")
    companies_with_train = {a.company for a in result.values() if a.split == "train"}
    assert len(companies_with_train) == min(companies, n_train)

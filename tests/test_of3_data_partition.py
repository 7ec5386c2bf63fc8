"""The held-out and company rule of the OpenFold3 sample (pure, no files, no OpenFold3)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.demo.main import participant_names
from foldfed.errors import ConfigError
from foldfed.of3.data import partition
from foldfed.of3.data.components import connected_components
from foldfed.of3.data.partition import Assignment, assign, cluster_id, company_names

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


# ---------------------------------------------------------------------------------------
# split_by="clusters": whole components of entries sharing a protein cluster or a scaffold


def _portfolio(n: int, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    """n entries over fewer proteins and fewer scaffolds: cluster ids and scaffold ids."""
    rng = random.Random(seed)
    clusters = _entries(n, seed)
    scaffolds = {
        e: rng.sample([f"murcko:s{i}" for i in range(n)], rng.randint(0, 2)) for e in clusters
    }
    return clusters, scaffolds


def _sides(result: dict[str, Assignment], scaffolds: dict[str, list[str]]) -> dict[str, set[str]]:
    """Side ("heldout" or a company's training set) -> the clusters and scaffolds it holds."""
    held: dict[str, set[str]] = {}
    for a in result.values():
        side = "heldout" if a.split == "heldout" else a.company
        held.setdefault(side, set()).update({a.cluster, *scaffolds.get(a.entry_id, ())})
    return held


def test_connected_components_join_through_shared_labels() -> None:
    labels = {"a": ["p1"], "b": ["p1", "s1"], "c": ["s1"], "d": ["p2"], "e": []}
    assert connected_components(labels) == [("a", "b", "c"), ("d",), ("e",)]
    reversed_labels = dict(reversed(list(labels.items())))
    assert connected_components(reversed_labels) == connected_components(labels)


def test_clusters_rule_keeps_families_and_series_apart() -> None:
    clusters, scaffolds = _portfolio(60)
    result = assign(clusters, 3, split_by="clusters", scaffolds=scaffolds)
    assert sorted(result) == sorted(clusters)
    sides = _sides(result, scaffolds)
    for a, b in [(a, b) for a in sides for b in sides if a < b]:
        assert not sides[a] & sides[b], (a, b)  # Jaccard 0 between any two sides
    # a component's entries share its name and its side
    by_component: dict[str, set[tuple[str, str]]] = {}
    for a in result.values():
        by_component.setdefault(a.component, set()).add((a.company, a.split))
    assert all(len(v) == 1 for v in by_component.values())
    # order-free, and the default rule is untouched by scaffolds
    shuffled = list(clusters.items())
    random.Random(5).shuffle(shuffled)
    assert assign(dict(shuffled), 3, split_by="clusters", scaffolds=scaffolds) == result
    assert assign(clusters, 3, scaffolds=scaffolds) == assign(clusters, 3)


def test_clusters_rule_without_shared_scaffolds_holds_out_as_today() -> None:
    """A component of one protein cluster is named by it: the held-out set is today's."""
    clusters = _entries(40, seed=4)
    today = assign(clusters, 3)
    by_clusters = assign(clusters, 3, split_by="clusters")
    assert {e: a.split for e, a in by_clusters.items()} == {e: a.split for e, a in today.items()}


def test_split_by_is_checked() -> None:
    with pytest.raises(ConfigError, match="split by"):
        assign({"a": "c"}, 2, split_by="proteins")


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="0123456789abcdef", min_size=4, max_size=4),
        st.tuples(
            st.sampled_from([f"c{i}" for i in range(15)]),
            st.lists(st.sampled_from([f"murcko:s{i}" for i in range(15)]), max_size=3),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=1, max_value=6),
    st.floats(min_value=0.0, max_value=0.9),
)
def test_clusters_rule_shares_nothing_for_any_input(
    entries: dict[str, tuple[str, list[str]]], companies: int, fraction: float
) -> None:
    clusters = {e: c for e, (c, _) in entries.items()}
    scaffolds = {e: s for e, (_, s) in entries.items()}
    result = assign(clusters, companies, "k", fraction, split_by="clusters", scaffolds=scaffolds)
    sides = _sides(result, scaffolds)
    names = sorted(sides)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sides[a] & sides[b], (a, b)  # no cluster, no scaffold on two sides
    train = [a for a in result.values() if a.split == "train"]
    components = {a.component for a in train}
    assert len({a.company for a in train}) == min(companies, len(components))
    loads = [sum(1 for a in train if a.company == n) for n in company_names(companies)]
    largest = max((sum(1 for a in train if a.component == c) for c in components), default=0)
    assert max(loads) - min(loads) <= largest  # greedy, largest first

"""Who owns which complex, and which complexes nobody trains on (pure; no I/O).

The rule, which every company computes alone from its own structures and the shared key:

1. **Cluster id** of an entry (`cluster_id`): the MinHash of its protein sequences: the
   smallest blake3 digest over every k-mer (k = 8) of every protein chain's canonical
   one-letter sequence (upper case). Identical proteins get the same id; near-identical
   ones (another construct, a point mutant) get it with probability equal to the Jaccard
   similarity of their k-mer sets (~0.95 for one mutation in 300 residues); unrelated
   proteins practically never. It needs no other entry, unlike identity clustering over
   the whole set, which no company can run on the others' data. A complex of proteins A
   and B shares A-alone's id with probability |A| / |A or B| (k-mers): an approximation,
   said out loud. An entry without a protein chain is its own cluster ("entry:<id>").
2. **Held out** iff `unit(key, "heldout", cluster id) < heldout_fraction`, where `unit` is
   the first 8 bytes of blake3 keyed with the key, read as a fraction of 2^64. The
   decision depends on the cluster alone, so every entry of a cluster lands on the same
   side: no cluster is in one company's training set and anyone's held-out set.
3. **Company** (a stand-in for "each company owns its own structures"): within each split,
   entries are ordered by `unit(key, "company", entry id)` and dealt round-robin to
   company-a, company-b, ... Every company gets a share (differing by at most one), so
   with at least N training entries each of N companies trains on at least one.

Rules 2 and 3 are the default, `split_by="entries"`: companies hold the same protein
families and chemical series, dealt entry by entry, so they look alike. With
`split_by="clusters"` companies differ as pharma portfolios do, each with its own protein
families and chemical series:

4. **Component**: entries that share a protein cluster id **or** a ligand scaffold id (the
   Bemis-Murcko scaffolds of their qualifying ligands, which the caller extracts; see
   `scaffold`) are joined, transitively, into connected components (`components`). A
   component is named by the smallest protein cluster id among its entries (unique: two
   components never share a cluster), so a component of one cluster is named by it.
5. **Held out** iff `unit(key, "heldout", component name) < heldout_fraction`: rule 2 with
   the component in place of the cluster. The held-out set then shares no protein cluster
   and no scaffold with any company's training set.
6. **Company**: within each split, whole components go to companies, largest first (ties
   by `unit(key, "company", component name)`, then name), each to the company holding the
   fewest entries so far (ties to the first company). Two companies never share a cluster
   or a scaffold; entry counts differ by at most the largest component's size, and with at
   least N training components each of N companies trains on at least one entry. The
   fraction held out is a fraction of components, so of entries only on average: one
   large component can tip it.

The key (any string) is shared by the consortium; changing it redraws the partition.
Everything is a function of the set of entries (not their order) and the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import blake3

from foldfed.errors import ConfigError
from foldfed.of3.data.components import connected_components

KMER = 8
DEFAULT_KEY = "foldfed-of3-sample-v1"
DEFAULT_HELDOUT_FRACTION = 0.3
_KEY_CONTEXT = "foldfed of3 sample partition v1"

Split = Literal["train", "heldout"]
SplitBy = Literal["entries", "clusters"]
SPLIT_BY: tuple[SplitBy, ...] = ("entries", "clusters")
DEFAULT_SPLIT_BY: SplitBy = "entries"


def company_names(n: int) -> tuple[str, ...]:
    """company-a, company-b, ... (the names `foldfed demo` gives its participants)."""
    if not 1 <= n <= 26:
        raise ConfigError(f"companies must be in [1, 26], got {n}")
    return tuple(f"company-{chr(ord('a') + i)}" for i in range(n))


def cluster_id(protein_sequences: Iterable[str], entry_id: str, k: int = KMER) -> str:
    """The MinHash cluster id of an entry's proteins (see the module docstring)."""
    sequences = sorted({s.strip().upper() for s in protein_sequences if s.strip()})
    if not sequences:
        return f"entry:{entry_id}"
    best: bytes | None = None
    for seq in sequences:
        kmers = [seq[i : i + k] for i in range(len(seq) - k + 1)] or [seq]
        for kmer in kmers:
            digest = blake3.blake3(kmer.encode()).digest(length=16)
            if best is None or digest < best:
                best = digest
    assert best is not None
    return f"minhash{k}:{best.hex()}"


def derive_key(key: str) -> bytes:
    """The 32-byte blake3 key behind a consortium's key string."""
    if not key:
        raise ConfigError("the partition key must not be empty")
    return blake3.blake3(key.encode(), derive_key_context=_KEY_CONTEXT).digest()


def unit(key: bytes, *parts: str) -> float:
    """A keyed hash of `parts` as a number in [0, 1)."""
    h = blake3.blake3(key=key)
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return int.from_bytes(h.digest(length=8), "big") / 2**64


def is_heldout(cluster: str, key: bytes, fraction: float) -> bool:
    return unit(key, "heldout", cluster) < fraction


def check_split_by(split_by: str) -> SplitBy:
    """`split_by` as a SplitBy, or ConfigError naming the known rules."""
    for known in SPLIT_BY:
        if split_by == known:
            return known
    raise ConfigError(f"split by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")


def components(
    clusters: Mapping[str, str], scaffolds: Mapping[str, Iterable[str]]
) -> list[tuple[str, ...]]:
    """Rule 4's components: entries joined by a shared cluster or scaffold id."""
    # Namespaced labels: a cluster id and a scaffold id never join by accident.
    return connected_components(
        {
            e: [f"cluster {c}", *(f"scaffold {s}" for s in scaffolds.get(e, ()))]
            for e, c in clusters.items()
        }
    )


@dataclass(frozen=True)
class Assignment:
    entry_id: str
    cluster: str
    company: str
    split: Split
    component: str = ""  # the held-out unit: the cluster, or the component's name


def assign(
    clusters: Mapping[str, str],
    companies: int,
    key: str = DEFAULT_KEY,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    *,
    split_by: str = DEFAULT_SPLIT_BY,
    scaffolds: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Assignment]:
    """{entry id: cluster id} → {entry id: Assignment}, sorted by entry id.

    `scaffolds` ({entry id: its ligand scaffold ids}, missing = none) is read only when
    `split_by` is "clusters"."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    rule = check_split_by(split_by)
    names = company_names(companies)
    k = derive_key(key)
    if rule == "clusters":
        out = _by_component(clusters, scaffolds or {}, names, k, heldout_fraction)
    else:
        out = _by_entry(clusters, names, k, heldout_fraction)
    return dict(sorted(out.items()))


def _by_entry(
    clusters: Mapping[str, str], names: tuple[str, ...], k: bytes, fraction: float
) -> dict[str, Assignment]:
    """Rules 2 and 3: held out by cluster, companies dealt round-robin by entry."""
    splits: dict[Split, list[str]] = {"train": [], "heldout": []}
    for entry_id, cluster in clusters.items():
        splits["heldout" if is_heldout(cluster, k, fraction) else "train"].append(entry_id)
    out: dict[str, Assignment] = {}
    for split, members in splits.items():
        ordered = sorted(members, key=lambda e: (unit(k, "company", e), e))
        for i, entry_id in enumerate(ordered):
            cluster = clusters[entry_id]
            out[entry_id] = Assignment(entry_id, cluster, names[i % len(names)], split, cluster)
    return out


def _by_component(
    clusters: Mapping[str, str],
    scaffolds: Mapping[str, Iterable[str]],
    names: tuple[str, ...],
    k: bytes,
    fraction: float,
) -> dict[str, Assignment]:
    """Rules 4 to 6: whole components, held out by name, greedily to the least loaded."""
    splits: dict[Split, list[tuple[str, tuple[str, ...]]]] = {"train": [], "heldout": []}
    for members in components(clusters, scaffolds):
        name = min(clusters[e] for e in members)
        splits["heldout" if is_heldout(name, k, fraction) else "train"].append((name, members))
    out: dict[str, Assignment] = {}
    for split, groups in splits.items():
        # Largest first onto the least loaded company (LPT): balances entry counts far
        # better than a keyed order alone, which may end on one large component.
        groups.sort(key=lambda g: (-len(g[1]), unit(k, "company", g[0]), g[0]))
        loads = [0] * len(names)
        for name, members in groups:
            i = min(range(len(names)), key=lambda j: (loads[j], j))
            loads[i] += len(members)
            for e in members:
                out[e] = Assignment(e, clusters[e], names[i], split, name)
    return out

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

The key (any string) is shared by the consortium; changing it redraws the partition.
Everything is a function of the set of entries (not their order) and the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import blake3

from foldfed.errors import ConfigError

KMER = 8
DEFAULT_KEY = "foldfed-of3-sample-v1"
DEFAULT_HELDOUT_FRACTION = 0.3
_KEY_CONTEXT = "foldfed of3 sample partition v1"

Split = Literal["train", "heldout"]


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


@dataclass(frozen=True)
class Assignment:
    entry_id: str
    cluster: str
    company: str
    split: Split


def assign(
    clusters: Mapping[str, str],
    companies: int,
    key: str = DEFAULT_KEY,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> dict[str, Assignment]:
    """{entry id: cluster id} → {entry id: Assignment}, sorted by entry id."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    names = company_names(companies)
    k = derive_key(key)
    splits: dict[Split, list[str]] = {"train": [], "heldout": []}
    for entry_id, cluster in clusters.items():
        splits["heldout" if is_heldout(cluster, k, heldout_fraction) else "train"].append(entry_id)
    out: dict[str, Assignment] = {}
    for split, members in splits.items():
        ordered = sorted(members, key=lambda e: (unit(k, "company", e), e))
        for i, entry_id in enumerate(ordered):
            out[entry_id] = Assignment(entry_id, clusters[entry_id], names[i % companies], split)
    return dict(sorted(out.items()))

"""Connected components of entries that share a label (union-find; pure, no I/O).

Entries are the nodes; two entries are joined when they carry a common label (here a
protein cluster id or a ligand scaffold id), and joins are transitive: A shares a protein
with B, B a scaffold with C, so A, B and C are one component. Union-find with path halving
and union by size is near-linear in the number of (entry, label) pairs.

The result depends on the set of (entry, labels) pairs only, not on their order: each
component is returned as a sorted tuple of entry ids, and the components in the order of
their smallest entry id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self._parent = {item: item for item in items}
        self._size = dict.fromkeys(self._parent, 1)

    def find(self, item: str) -> str:
        parent = self._parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]


def connected_components(labels: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """{entry id: its labels} → the components (sorted entry ids), by smallest entry id.

    An entry without labels is a component of its own."""
    uf = _UnionFind(labels)
    first_holder: dict[str, str] = {}
    for entry_id, entry_labels in labels.items():
        for label in entry_labels:
            holder = first_holder.setdefault(label, entry_id)
            uf.union(holder, entry_id)
    groups: dict[str, list[str]] = {}
    for entry_id in labels:
        groups.setdefault(uf.find(entry_id), []).append(entry_id)
    return sorted(tuple(sorted(members)) for members in groups.values())

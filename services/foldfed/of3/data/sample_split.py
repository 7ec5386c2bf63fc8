"""A prepared sample's split: its table, how far its companies differ, and the same entries
reassigned by another rule.

`summary_table(sample)` is the table `foldfed data sample` and `foldfed data summary`
print: entries per company and split, tokens, the partition lines, skips and failures.
`repartition(sample, split_by)` assigns the sample's entries by `partition`'s rule
`split_by` ("entries" or "clusters") with the sample's own key, held-out fraction and
companies, in memory: sample.json is not rewritten, so one featurized pool serves both rules
(`bench/federation_payoff.py --split-by`). `partition_lines(sample)` is the summary's
account of the split: the components, and the largest Jaccard index of protein clusters and
of ligand scaffolds between two companies' training sets and between a training set and
the held-out set (0 and 0 by construction under "clusters").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from foldfed.of3.data import partition
from foldfed.of3.data.sample import Sample, SampleEntry


def repartition(sample: Sample, split_by: str) -> Sample:
    """The sample's entries assigned by rule `split_by` with the sample's own key, held-out
    fraction and companies, in memory (sample.json is not rewritten). A sample prepared
    before scaffolds were recorded has them read from its feature files' headers."""
    rule = partition.check_split_by(split_by)
    if rule == sample.split_by:
        return sample
    from foldfed.of3.data.features import read_feature_info
    from foldfed.of3.data.scaffold import entry_scaffolds, scaffold_rule

    scaffolds = {
        e.entry_id: (
            e.scaffolds
            if e.scaffolds is not None
            else entry_scaffolds(read_feature_info(e.features).ligands)
        )
        for e in sample.entries
    }
    terms = sample.manifest["partition"]
    assignments = partition.assign(
        {e.entry_id: e.cluster for e in sample.entries},
        len(sample.companies),
        str(terms["key"]),
        float(terms["heldout_fraction"]),
        split_by=rule,
        scaffolds=scaffolds,
    )
    entries = tuple(
        replace(
            e,
            company=assignments[e.entry_id].company,
            split=assignments[e.entry_id].split,
            component=assignments[e.entry_id].component,
            scaffolds=scaffolds[e.entry_id],
        )
        for e in sample.entries
    )
    manifest = {
        **sample.manifest,
        "partition": {**terms, "split_by": rule, "scaffold": scaffold_rule()},
    }
    return replace(sample, entries=entries, manifest=manifest)


def summary_table(sample: Sample) -> str:
    """A readable table: entries per company and split, tokens, then skips and failures."""
    lines = [f"{'company':<12} {'train':>5} {'heldout':>7}  train entries / heldout entries"]
    for company in sample.companies:
        train = sample.of(company, "train")
        held = sample.of(company, "heldout")
        names = " ".join(e.entry_id for e in train) + " / " + " ".join(e.entry_id for e in held)
        lines.append(f"{company:<12} {len(train):>5} {len(held):>7}  {names}")
    n_train = sum(1 for e in sample.entries if e.split == "train")
    lines.append(f"{'total':<12} {n_train:>5} {len(sample.heldout()):>7}")
    tokens = sorted(e.n_tokens for e in sample.entries)
    if tokens:
        lines.append(
            f"tokens per example after the crop: min {tokens[0]}, median "
            f"{tokens[len(tokens) // 2]}, max {tokens[-1]}"
        )
    clusters = {e.cluster for e in sample.entries}
    lines.append(f"{len(sample.entries)} entries in {len(clusters)} protein clusters")
    lines.extend(partition_lines(sample))
    for title, rows in (("skipped", sample.skipped), ("failures", sample.failures)):
        lines.append(f"{title}: {len(rows)}")
        lines.extend(f"  {row['entry_id']}: {row['reason']}" for row in rows)
    return "\n".join(lines)


def partition_lines(sample: Sample) -> list[str]:
    """How far the companies differ: components, and what two training sets (or a
    training set and the held-out set) share, as the largest Jaccard index over pairs."""
    recorded = [e for e in sample.entries if e.scaffolds is not None]
    if not recorded:
        return [f"split by {sample.split_by} (no scaffolds recorded)"]
    groups = partition.components(
        {e.entry_id: e.cluster for e in recorded},
        {e.entry_id: e.scaffolds or () for e in recorded},
    )
    n_scaffolds = len({s for e in recorded for s in e.scaffolds or ()})
    lines = [
        f"split by {sample.split_by}: {n_scaffolds} ligand scaffolds, {len(groups)} components "
        f"(clusters or scaffolds shared; largest {max(map(len, groups))} entries)"
    ]
    train = {
        c: [e for e in recorded if e.company == c and e.split == "train"] for c in sample.companies
    }
    heldout = [e for e in recorded if e.split == "heldout"]
    for what, of in (("clusters", _clusters_of), ("scaffolds", _scaffolds_of)):
        sets = [of(rows) for rows in train.values()]
        held = of(heldout)
        between = [_jaccard(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        lines.append(
            f"{what}: max Jaccard between companies' training sets "
            f"{max(between, default=0.0):.3f}, between a training set and the held-out set "
            f"{max((_jaccard(a, held) for a in sets), default=0.0):.3f}"
        )
    return lines


def _clusters_of(entries: Iterable[SampleEntry]) -> set[str]:
    return {e.cluster for e in entries}


def _scaffolds_of(entries: Iterable[SampleEntry]) -> set[str]:
    return {s for e in entries for s in e.scaffolds or ()}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0

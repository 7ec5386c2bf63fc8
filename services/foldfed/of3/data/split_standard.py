"""The blind-split reference hash: proof that every party runs the same split standard.

Each company splits its own structures alone (`partition`): a keyed cluster id decides
what is held out, and the key is the consortium's secret. Nobody sees another party's
split, so nobody could tell if one party used another key, another held-out fraction or
another rule; its "held-out" structures might then be in someone else's training set.
MELLODDY's answer, taken here: each party computes locally, and publishes, a hash of

1. its **split configuration**, the public part only (`SplitConfig`): the standard's
   version (the rules of `partition` and their key derivation), the data schema version,
   the cluster rule (MinHash, k), the rule `split_by`, the held-out fraction, the number
   of companies and, for `split_by="clusters"`, the scaffold rule. Never the key;
2. the **assignment of a shared reference set**: `REFERENCE_SET`, a small public list of
   entries (protein sequences and ligand scaffold ids, shipped here) run through the very
   split function with the party's key. Same key, same code, same configuration: same
   assignment, byte for byte. The assignment shows the key's effect, never the key.

    config_digest     = blake3(canonical JSON of the config)
    assignment_digest = blake3(canonical JSON of [[entry, cluster, company, split,
                                                   component], ...] sorted by entry)
    reference_hash    = blake3(canonical JSON of {"standard", "config_digest",
                                                  "assignment_digest"})

The consortium config (TOML, `[split]`) holds the public configuration and the expected
`reference_hash`; the readiness check (gate/checks.py, `split`) compares them, and a
mismatch says which: a configuration field (named, with both values) or, with equal
configurations, the key (or foldfed's split code). Canonical JSON: sorted keys, no
whitespace, UTF-8, floats as `repr` does (0.3 is "0.3"). Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import blake3

from foldfed.errors import ConfigError
from foldfed.of3.data import partition
from foldfed.of3.data.schema import SCHEMA_VERSION

STANDARD = "foldfed.split/1"
KEY_DERIVATION = "blake3 derive_key('foldfed of3 sample partition v1')"

# The shared reference set: public, made-up entries with real-looking sequences. Point
# mutants of one protein (ref-01/02/03) and shared scaffolds (ref-07/08) exercise the
# cluster and component rules; entries without a protein (ref-12) their fallback.
_UBQ = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
_LYZ = "KVFGRCELAAAMKRHGLDNYRGYSLGNWVCAAKFESNFNTQATNRNTDGSTDYGILQINSRWWCNDGRTPGSRNLCNI"
_GFP = "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHM"
_KIN = "GAMDPSSPNYDKWEMERTDITMKHKLGGGQYGEVYEGVWKKYSLTVAVKTLKEDTMEVEEFLKEAAVMKEIKHPNLV"
_PRO = "PQITLWQRPLVTIKIGGQLKEALLDTGADDTVLEEMSLPGRWKPKMIGGIGGFIKVRQYDQILIEICGHKAIGTVLV"
REFERENCE_SET: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (entry id, protein sequences, ligand scaffold ids)
    ("ref-01", (_UBQ,), ("murcko:ref-a",)),
    ("ref-02", (_UBQ.replace("LVLRL", "LVARL"),), ("murcko:ref-b",)),
    ("ref-03", (_UBQ[:60],), ()),
    ("ref-04", (_LYZ,), ("murcko:ref-c",)),
    ("ref-05", (_LYZ, _UBQ), ("murcko:ref-d",)),
    ("ref-06", (_GFP,), ("murcko:ref-e",)),
    ("ref-07", (_KIN,), ("murcko:ref-f",)),
    ("ref-08", (_KIN.replace("MKHKL", "MKHRL"),), ("murcko:ref-f",)),
    ("ref-09", (_PRO,), ("murcko:ref-g",)),
    ("ref-10", (_PRO[::-1],), ("murcko:ref-h",)),
    ("ref-11", (_GFP[10:], _PRO[:40]), ("murcko:ref-e", "murcko:ref-i")),
    ("ref-12", (), ("murcko:ref-j",)),
    ("ref-13", (_LYZ[5:], ), ()),
    ("ref-14", (_KIN[::-1],), ("murcko:ref-k",)),
    ("ref-15", (_GFP[::-1],), ()),
    ("ref-16", (_UBQ[::-1], _LYZ[::-1]), ("murcko:ref-l",)),
)  # fmt: skip


@dataclass(frozen=True)
class SplitConfig:
    """The public part of a party's split configuration (module docstring, item 1)."""

    split_by: str
    heldout_fraction: float
    companies: int
    scaffold: str = ""  # the scaffold rule; read only with split_by="clusters"
    cluster: str = f"minhash{partition.KMER}"
    schema_version: str = SCHEMA_VERSION
    standard: str = STANDARD
    key_derivation: str = KEY_DERIVATION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.split_by != "clusters":
            out["scaffold"] = ""  # not part of the "entries" rule: it cannot differ
        return out


@dataclass(frozen=True)
class SplitReference:
    """What a party publishes: its public configuration and the three digests (hex)."""

    config: SplitConfig
    config_digest: str
    assignment_digest: str
    reference_hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_hash": self.reference_hash,
            "config_digest": self.config_digest,
            "assignment_digest": self.assignment_digest,
            "config": self.config.to_json(),
        }


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hex(value: Any) -> str:
    return blake3.blake3(canonical(value)).hexdigest()


def reference_assignment(config: SplitConfig, key: str) -> list[list[str]]:
    """`REFERENCE_SET` split by `config` with `key`: [entry, cluster, company, split,
    component] rows, sorted by entry id."""
    clusters = {e: partition.cluster_id(seqs, e) for e, seqs, _ in REFERENCE_SET}
    scaffolds = {e: s for e, _, s in REFERENCE_SET}
    assigned = partition.assign(
        clusters,
        config.companies,
        key,
        config.heldout_fraction,
        split_by=config.split_by,
        scaffolds=scaffolds,
    )
    return [[a.entry_id, a.cluster, a.company, a.split, a.component] for a in assigned.values()]


def split_reference(config: SplitConfig, key: str) -> SplitReference:
    """The reference hash of `config` run with `key` (module docstring)."""
    config_digest = _hex(config.to_json())
    assignment_digest = _hex(reference_assignment(config, key))
    reference_hash = _hex(
        {
            "standard": config.standard,
            "config_digest": config_digest,
            "assignment_digest": assignment_digest,
        }
    )
    return SplitReference(config, config_digest, assignment_digest, reference_hash)


# ---------------------------------------------------------------------- documents


def config_from_partition(block: Mapping[str, Any]) -> tuple[SplitConfig, str]:
    """(config, key) of a local split configuration: the `partition` block of sample.json
    (`foldfed data sample`), whose `companies` is the list of names, or the same keys
    with `companies` a count. ConfigError names a missing or bad field."""
    key = block.get("key")
    if not isinstance(key, str) or not key:
        raise ConfigError("split configuration: partition.key (the split key) is missing")
    companies = block.get("companies")
    count = len(companies) if isinstance(companies, list) else companies
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError("split configuration: partition.companies must be a list or a count")
    return _config(block, count, "partition"), key


def expected_from_consortium(config: Mapping[str, Any]) -> tuple[SplitConfig, str] | None:
    """(config, expected reference hash) of a parsed consortium TOML's `[split]` table, or
    None without one. ConfigError names a missing or bad field."""
    table = config.get("split")
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("consortium config: [split] must be a table")
    expected = table.get("reference_hash")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ConfigError("consortium config: split.reference_hash must be 64 hex digits")
    count = table.get("companies")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError("consortium config: split.companies must be an integer >= 1")
    return _config(table, count, "split"), expected.lower()


def _config(table: Mapping[str, Any], companies: int, where: str) -> SplitConfig:
    fraction = table.get("heldout_fraction", partition.DEFAULT_HELDOUT_FRACTION)
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        raise ConfigError(f"{where}.heldout_fraction must be a number")
    split_by = partition.check_split_by(str(table.get("split_by", partition.DEFAULT_SPLIT_BY)))
    return SplitConfig(
        split_by=split_by,
        heldout_fraction=float(fraction),
        companies=companies,
        scaffold=str(table.get("scaffold", "")),
        cluster=str(table.get("cluster", f"minhash{partition.KMER}")),
        schema_version=str(table.get("schema_version", SCHEMA_VERSION)),
        standard=str(table.get("standard", STANDARD)),
    )


def differences(local: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The configuration fields that differ, as "field: local here, expected in the
    consortium's config", in field order."""
    return [
        f"{k}: {local.get(k)!r} here, {expected.get(k)!r} in the consortium's config"
        for k in expected
        if local.get(k) != expected.get(k)
    ]


def consortium_table(reference: SplitReference) -> str:
    """The `[split]` table a consortium config carries for `reference` (TOML)."""
    c = reference.config
    lines = [
        "[split]",
        f'standard = "{c.standard}"',
        f'split_by = "{c.split_by}"',
        f"heldout_fraction = {c.heldout_fraction!r}",
        f"companies = {c.companies}",
    ]
    if c.split_by == "clusters":
        lines.append(f'scaffold = "{c.scaffold}"')
    lines.append(f'reference_hash = "{reference.reference_hash}"')
    return "\n".join(lines)

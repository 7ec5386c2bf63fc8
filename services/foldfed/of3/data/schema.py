"""The consortium data schema: its version, every check with its threshold, the inclusion
criteria, and the pure rules that judge a structure's metadata.

A schema version names one fixed set of checks and thresholds (`CHECKS`, `Thresholds`):
every party that validates against `foldfed.data/1` runs the same checks with the same
limits, so their data cards can be compared. Changing a threshold or a check makes a new
version. The inclusion criteria (`InclusionCriteria`) are the consortium's choice and come
from its config file (`[data]` table, see docs/data_schema.md); their digest goes into the
data card, so parties can see they applied the same criteria.

Each check ends in one `Outcome`: passed, failed (with the reason), or skipped (not
applicable, e.g. no R-free in an NMR entry; the reason says why). A structure is valid
when no check failed. Pure: no I/O, no chemistry library; the adapters (`structure_file`,
`plausibility`) turn a file into `EntryMetadata` and check results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from foldfed.digests import digest_of
from foldfed.errors import ConfigError

SCHEMA_VERSION = "foldfed.data/1"


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckSpec:
    """One check of the schema: its stable id, group, what it asks and its threshold."""

    id: str
    group: str  # structure | quality | posebusters | inclusion
    question: str
    threshold: str  # human-readable limit ("" when the check is yes/no)


@dataclass(frozen=True)
class Thresholds:
    """The PLINDER quality thresholds (fixed per schema version)."""

    max_resolution_a: float = 3.5
    max_r_free: float = 0.45
    max_r_gap: float = 0.05  # |R_work - R_free|
    max_unresolved_ligand_heavy_atoms: int = 0


THRESHOLDS = Thresholds()

# The order is the report's and the table's order.
CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("parse", "structure", "the mmCIF parses and holds atoms", ""),
    CheckSpec("elements", "structure", "every element is real and ligand elements match CCD", ""),
    CheckSpec("chains", "structure", "at least one polymer chain holds atoms", ">= 1"),
    CheckSpec("ligand_sanitization", "structure", "each ligand sanitizes with RDKit", ""),
    CheckSpec("resolution", "quality", "resolution", f"<= {THRESHOLDS.max_resolution_a} A"),
    CheckSpec("r_free", "quality", "R-free", f"<= {THRESHOLDS.max_r_free}"),
    CheckSpec("r_gap", "quality", "|R - R-free|", f"<= {THRESHOLDS.max_r_gap}"),
    CheckSpec(
        "ligand_completeness",
        "quality",
        "unresolved ligand heavy atoms",
        f"<= {THRESHOLDS.max_unresolved_ligand_heavy_atoms}",
    ),
    CheckSpec("pb_bond_lengths", "posebusters", "bond lengths within bounds", "PoseBusters"),
    CheckSpec("pb_bond_angles", "posebusters", "bond angles within bounds", "PoseBusters"),
    CheckSpec("pb_internal_clash", "posebusters", "no internal steric clash", "PoseBusters"),
    CheckSpec("pb_aromatic_flatness", "posebusters", "aromatic rings flat", "<= 0.25 A"),
    CheckSpec("pb_protein_clash", "posebusters", "no protein-ligand clash", "> 0.75 x vdW"),
    CheckSpec("pb_volume_overlap", "posebusters", "volume overlap with protein", "<= 7.5 %"),
    CheckSpec("method", "inclusion", "experimental method allowed", "consortium config"),
    CheckSpec("ligand_present", "inclusion", "a qualifying ligand is present", "config"),
    CheckSpec("release_date", "inclusion", "released on or before the cutoff", "config"),
    CheckSpec("polymer_chains", "inclusion", "polymer chains at most", "config"),
)
CHECK_IDS: tuple[str, ...] = tuple(c.id for c in CHECKS)


@dataclass(frozen=True)
class CheckResult:
    check: str
    outcome: Outcome
    reason: str = ""  # why it failed or was skipped; stays local

    def __post_init__(self) -> None:
        if self.check not in CHECK_IDS:
            raise ValueError(f"unknown check {self.check!r}")


def passed(check: str) -> CheckResult:
    return CheckResult(check, Outcome.PASSED)


def failed(check: str, reason: str) -> CheckResult:
    return CheckResult(check, Outcome.FAILED, reason)


def skipped(check: str, reason: str) -> CheckResult:
    return CheckResult(check, Outcome.SKIPPED, reason)


# ---------------------------------------------------------------------------------------
# Inclusion criteria: the consortium's config


@dataclass(frozen=True)
class InclusionCriteria:
    """Which structures the consortium trains on (config `[data]` table)."""

    methods: tuple[str, ...] = (
        "X-RAY DIFFRACTION",
        "NEUTRON DIFFRACTION",
        "ELECTRON MICROSCOPY",
        "SOLUTION NMR",
    )
    min_ligand_heavy_atoms: int = 6
    max_ligand_heavy_atoms: int = 150
    max_polymer_chains: int = 20
    release_date_cutoff: str = ""  # ISO date; "" = no cutoff

    def digest(self) -> str:
        """blake3 of the canonical JSON form: equal criteria give equal digests."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return digest_of(text.encode()).hex()


_CRITERIA_KEYS = frozenset(InclusionCriteria.__dataclass_fields__)


def criteria_from_config(config: Mapping[str, Any]) -> InclusionCriteria:
    """The criteria of a parsed consortium config (`{"data": {...}}`); absent keys take
    the defaults. ConfigError names a wrong key or value."""
    data = config.get("data", {})
    if not isinstance(data, Mapping):
        raise ConfigError("consortium config: [data] must be a table")
    unknown = sorted(set(data) - _CRITERIA_KEYS)
    if unknown:
        raise ConfigError(
            f"consortium config: unknown key data.{unknown[0]} "
            f"(known: {', '.join(sorted(_CRITERIA_KEYS))})"
        )
    values: dict[str, Any] = {}
    for key in ("min_ligand_heavy_atoms", "max_ligand_heavy_atoms", "max_polymer_chains"):
        if key in data:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"consortium config: data.{key} must be an integer >= 1")
            values[key] = value
    if "methods" in data:
        methods = data["methods"]
        if not isinstance(methods, Sequence) or isinstance(methods, str) or not methods:
            raise ConfigError("consortium config: data.methods must be a non-empty list")
        values["methods"] = tuple(str(m).upper() for m in methods)
    if "release_date_cutoff" in data:
        cutoff = str(data["release_date_cutoff"])
        if cutoff and not _is_iso_date(cutoff):
            raise ConfigError("consortium config: data.release_date_cutoff must be YYYY-MM-DD")
        values["release_date_cutoff"] = cutoff
    criteria = InclusionCriteria(**values)
    if criteria.min_ligand_heavy_atoms > criteria.max_ligand_heavy_atoms:
        raise ConfigError("consortium config: data.min_ligand_heavy_atoms > max_ligand_heavy_atoms")
    return criteria


def _is_iso_date(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and len(parts[0]) == 4


# ---------------------------------------------------------------------------------------
# Metadata rules


@dataclass(frozen=True)
class LigandCensus:
    """One ligand instance (a non-polymer chain that is not solvent)."""

    instance: str  # label_asym_id
    component: str  # CCD id (residues joined by "+" for a multi-residue ligand)
    heavy_atoms: int  # resolved heavy atoms
    unresolved_heavy_atoms: tuple[str, ...] = ()  # CCD heavy atoms absent or at occupancy 0


@dataclass(frozen=True)
class EntryMetadata:
    """What the quality and inclusion rules read from one structure file."""

    method: str = ""
    resolution: float | None = None
    r_work: float | None = None
    r_free: float | None = None
    release_date: str = ""
    polymer_chains: int = 0
    ligands: tuple[LigandCensus, ...] = field(default_factory=tuple)


def qualifying_ligands(meta: EntryMetadata, criteria: InclusionCriteria) -> list[LigandCensus]:
    """The ligands the schema checks: heavy atoms within the consortium's range."""
    low, high = criteria.min_ligand_heavy_atoms, criteria.max_ligand_heavy_atoms
    return [x for x in meta.ligands if low <= x.heavy_atoms <= high]


def quality_checks(
    meta: EntryMetadata, criteria: InclusionCriteria, limits: Thresholds = THRESHOLDS
) -> list[CheckResult]:
    """The PLINDER thresholds, where the metadata exists (else skipped, with why)."""
    results = []
    if meta.resolution is None or not math.isfinite(meta.resolution):
        results.append(skipped("resolution", "no resolution in the file"))
    elif meta.resolution > limits.max_resolution_a:
        results.append(
            failed("resolution", f"resolution {meta.resolution} A > {limits.max_resolution_a} A")
        )
    else:
        results.append(passed("resolution"))
    if meta.r_free is None:
        results.append(skipped("r_free", "no R-free in the file"))
        results.append(skipped("r_gap", "no R-free in the file"))
    else:
        if meta.r_free > limits.max_r_free:
            results.append(failed("r_free", f"R-free {meta.r_free} > {limits.max_r_free}"))
        else:
            results.append(passed("r_free"))
        if meta.r_work is None:
            results.append(skipped("r_gap", "no R-work in the file"))
        elif abs(meta.r_work - meta.r_free) > limits.max_r_gap:
            gap = abs(meta.r_work - meta.r_free)
            results.append(failed("r_gap", f"|R - R-free| = {gap:.4f} > {limits.max_r_gap}"))
        else:
            results.append(passed("r_gap"))
    results.append(_ligand_completeness(meta, criteria, limits))
    return results


def _ligand_completeness(
    meta: EntryMetadata, criteria: InclusionCriteria, limits: Thresholds
) -> CheckResult:
    ligands = qualifying_ligands(meta, criteria)
    if not ligands:
        return skipped("ligand_completeness", "no qualifying ligand")
    bad = [
        f"{x.component} ({x.instance}): {len(x.unresolved_heavy_atoms)} unresolved "
        f"({' '.join(x.unresolved_heavy_atoms[:8])})"
        for x in ligands
        if len(x.unresolved_heavy_atoms) > limits.max_unresolved_ligand_heavy_atoms
    ]
    if bad:
        return failed("ligand_completeness", "; ".join(bad))
    return passed("ligand_completeness")


def inclusion_checks(meta: EntryMetadata, criteria: InclusionCriteria) -> list[CheckResult]:
    """The consortium's inclusion criteria."""
    results = []
    methods = {m.strip().upper() for m in meta.method.split(",") if m.strip()}
    if not methods:
        results.append(skipped("method", "no experimental method in the file"))
    elif methods <= set(criteria.methods):
        results.append(passed("method"))
    else:
        results.append(failed("method", f"method {meta.method} not in {list(criteria.methods)}"))
    if qualifying_ligands(meta, criteria):
        results.append(passed("ligand_present"))
    else:
        low, high = criteria.min_ligand_heavy_atoms, criteria.max_ligand_heavy_atoms
        sizes = ", ".join(f"{x.component}:{x.heavy_atoms}" for x in meta.ligands) or "none"
        results.append(
            failed("ligand_present", f"no ligand with {low}..{high} heavy atoms ({sizes})")
        )
    if not criteria.release_date_cutoff:
        results.append(skipped("release_date", "no cutoff in the consortium config"))
    elif not meta.release_date:
        results.append(skipped("release_date", "no release date in the file"))
    elif meta.release_date > criteria.release_date_cutoff:
        results.append(
            failed(
                "release_date",
                f"released {meta.release_date} after {criteria.release_date_cutoff}",
            )
        )
    else:
        results.append(passed("release_date"))
    if meta.polymer_chains > criteria.max_polymer_chains:
        results.append(
            failed(
                "polymer_chains",
                f"{meta.polymer_chains} polymer chains > {criteria.max_polymer_chains}",
            )
        )
    else:
        results.append(passed("polymer_chains"))
    return results


def skip_all(checks: Sequence[str], reason: str) -> list[CheckResult]:
    """Every check in `checks` skipped for one reason (e.g. the file did not parse)."""
    return [skipped(c, reason) for c in checks]


def is_valid(results: Sequence[CheckResult]) -> bool:
    """A structure is valid when no check failed."""
    return all(r.outcome is not Outcome.FAILED for r in results)

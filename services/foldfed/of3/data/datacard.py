"""The data card: the only thing about a party's data that leaves it, aggregates only.

A card holds the schema version, how many structures were validated and how many are
valid, per check the counts passed/failed/skipped and the pass rate (passed over passed +
failed; a skipped check is not applicable and counts for neither), the digest of the
inclusion criteria applied, and the digest of the local manifest. It never holds a file
name, an entry id, a per-file digest or a failure reason: those stay in the local report.

The manifest digest is blake3 over the sorted 32-byte blake3 digests of the input files,
concatenated. Sorting makes it independent of file names and of the order files were
read; any changed byte in any input changes it, so a party can later show which data a
card describes without revealing the data. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from foldfed.digests import digest_of
from foldfed.of3.data.schema import (
    CHECKS,
    SCHEMA_VERSION,
    CheckResult,
    InclusionCriteria,
    Outcome,
    is_valid,
)

DATACARD_FORMAT = "foldfed.datacard/1"
# No helper signs participant documents yet: the card says so instead of a signature.
UNSIGNED = "unsigned: no participant signing key helper yet (see docs/data_schema.md)"


def manifest_digest(file_digests: Iterable[bytes]) -> str:
    """blake3 (hex) over the sorted file digests: the local manifest's fingerprint."""
    return digest_of(b"".join(sorted(file_digests))).hex()


def check_counts(reports: Sequence[Sequence[CheckResult]]) -> dict[str, dict[str, Any]]:
    """Per check (schema order): passed, failed, skipped and the pass rate (None if the
    check applied to no structure)."""
    counts: dict[str, dict[str, Any]] = {}
    for spec in CHECKS:
        tally = {o.value: 0 for o in Outcome}
        for results in reports:
            for r in results:
                if r.check == spec.id:
                    tally[r.outcome.value] += 1
        judged = tally["passed"] + tally["failed"]
        tally_out: dict[str, Any] = dict(tally)
        tally_out["pass_rate"] = round(tally["passed"] / judged, 4) if judged else None
        counts[spec.id] = tally_out
    return counts


def build_card(
    reports: Sequence[Sequence[CheckResult]],
    file_digests: Sequence[bytes],
    criteria: InclusionCriteria,
    tools: Mapping[str, str],
) -> dict[str, Any]:
    """The data card of one validation run (see the module docstring)."""
    if len(reports) != len(file_digests):
        raise ValueError("one report per file digest")
    valid = sum(1 for results in reports if is_valid(results))
    return {
        "format": DATACARD_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "structures": len(reports),
        "valid": valid,
        "valid_rate": round(valid / len(reports), 4) if reports else None,
        "checks": check_counts(reports),
        "inclusion_criteria_blake3": criteria.digest(),
        "manifest_blake3": manifest_digest(file_digests),
        "tools": dict(sorted(tools.items())),
        "signature": None,
        "signature_status": UNSIGNED,
    }


def pass_rate_table(card: Mapping[str, Any]) -> str:
    """The card's per-check pass rates as a readable table."""
    lines = [
        f"{'check':<22} {'group':<12} {'pass':>5} {'fail':>5} {'skip':>5} {'rate':>7}  threshold"
    ]
    for spec in CHECKS:
        c = card["checks"][spec.id]
        rate = "-" if c["pass_rate"] is None else f"{100 * c['pass_rate']:.1f}%"
        lines.append(
            f"{spec.id:<22} {spec.group:<12} {c['passed']:>5} {c['failed']:>5} "
            f"{c['skipped']:>5} {rate:>7}  {spec.threshold}"
        )
    lines.append(
        f"{card['valid']} of {card['structures']} structures valid "
        f"(schema {card['schema_version']}, manifest blake3 {card['manifest_blake3'][:16]}...)"
    )
    return "\n".join(lines)

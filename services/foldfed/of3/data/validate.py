"""`foldfed data validate DIR`: every structure file in DIR checked against the schema,
the local report written, and the aggregate-only data card built.

Structure files are `*.cif`, `*.mmcif` and their `.gz`, found recursively (a
`foldfed data sample` folder keeps its mmCIFs in `cif/`). Per file: parse, elements,
chains (`structure_file`); RDKit sanitization and PoseBusters per qualifying ligand
(`plausibility`); the PLINDER thresholds and the inclusion criteria (`schema`). A file
that does not parse has every other check skipped. The output folder receives:

- `report.json`: per file its path, blake3, validity and every check with its reason;
- `report.csv`: one row per failed or skipped check (file, check, outcome, reason);
- `manifest.txt`: `<blake3>  <path>` per file (local: it names the files);
- `datacard.json`: aggregates only (`datacard`), the one file meant to leave.
"""

from __future__ import annotations

import csv
import io
import json
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foldfed.digests import digest_of
from foldfed.durable import atomic_write
from foldfed.errors import ConfigError
from foldfed.of3.data import datacard
from foldfed.of3.data.schema import (
    CHECK_IDS,
    SCHEMA_VERSION,
    CheckResult,
    InclusionCriteria,
    criteria_from_config,
    failed,
    inclusion_checks,
    is_valid,
    passed,
    qualifying_ligands,
    quality_checks,
    skip_all,
    skipped,
)
from foldfed.signing import SigningKey

SUFFIXES = (".cif", ".mmcif", ".cif.gz", ".mmcif.gz")
PB_IDS = tuple(c for c in CHECK_IDS if c.startswith("pb_"))
MAX_REASONS = 5  # per check, the rest is counted


@dataclass(frozen=True)
class FileReport:
    path: str  # relative to DIR
    blake3: bytes
    results: tuple[CheckResult, ...]

    @property
    def valid(self) -> bool:
        return is_valid(self.results)


@dataclass(frozen=True)
class ValidationRun:
    files: tuple[FileReport, ...]
    card: dict[str, Any]
    out: Path


def load_criteria(path: Path | None) -> InclusionCriteria:
    """The inclusion criteria of a consortium TOML file, or the defaults without one."""
    if path is None:
        return InclusionCriteria()
    try:
        config = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"consortium config {path}: unreadable ({exc})") from exc
    return criteria_from_config(config)


def structure_files(root: Path) -> list[Path]:
    """Every structure file under `root`, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    found = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_structure(data: bytes, criteria: InclusionCriteria) -> list[CheckResult]:
    """Every schema check on one file's bytes, in schema order."""
    from foldfed.of3.data.structure_file import (
        StructureParseError,
        element_problems,
        read_structure,
    )

    try:
        parsed = read_structure(data)
    except StructureParseError as exc:
        not_parsed = skip_all(CHECK_IDS[1:], "the file did not parse")
        return [failed("parse", f"not a readable mmCIF: {exc}"), *not_parsed]
    results = [passed("parse")]
    problems = element_problems(parsed)
    results.append(failed("elements", _join(problems)) if problems else passed("elements"))
    if parsed.polymer_chains:
        results.append(passed("chains"))
    else:
        results.append(failed("chains", "no polymer chain holds atoms"))
    results += _ligand_checks(parsed, criteria)
    results += quality_checks(parsed.metadata, criteria)
    results += inclusion_checks(parsed.metadata, criteria)
    order = {c: i for i, c in enumerate(CHECK_IDS)}
    return sorted(results, key=lambda r: order[r.check])


def _ligand_checks(parsed: Any, criteria: InclusionCriteria) -> list[CheckResult]:
    """Sanitization and PoseBusters per qualifying ligand; a check fails when any of the
    entry's ligands fails it, and the reason names each failing ligand."""
    from foldfed.of3.data.plausibility import (
        ChemistryError,
        pocket_molecule,
        posebusters_verdicts,
        sanitized_ligand,
    )
    from foldfed.of3.data.structure_file import ligand_atoms, pocket_atoms

    ligands = qualifying_ligands(parsed.metadata, criteria)
    if not ligands:
        return skip_all(("ligand_sanitization", *PB_IDS), "no qualifying ligand")
    unsanitized: list[str] = []
    pb_failures: dict[str, list[str]] = {c: [] for c in PB_IDS}
    checked = 0
    for ligand in ligands:
        name = f"{ligand.component} ({ligand.instance})"
        atoms = ligand_atoms(parsed, ligand.instance)
        try:
            mol = sanitized_ligand(atoms)
        except ChemistryError as exc:
            unsanitized.append(f"{name}: {exc}")
            continue
        pocket = pocket_atoms(parsed, ligand.instance)
        try:
            verdicts = posebusters_verdicts(mol, pocket_molecule(pocket))
        except Exception as exc:  # PoseBusters may raise anything; not checked = not valid
            for check in PB_IDS:
                pb_failures[check].append(f"{name}: PoseBusters could not run ({exc})")
            continue
        checked += 1
        for check, (ok, detail) in verdicts.items():
            if not ok:
                pb_failures[check].append(f"{name}: {detail}" if detail else name)
    results = [
        failed("ligand_sanitization", _join(unsanitized))
        if unsanitized
        else passed("ligand_sanitization")
    ]
    for check in PB_IDS:
        if pb_failures[check]:
            results.append(failed(check, _join(pb_failures[check])))
        elif checked:
            results.append(passed(check))
        else:
            results.append(skipped(check, "no ligand sanitized"))
    return results


def _join(reasons: Sequence[str]) -> str:
    shown = "; ".join(reasons[:MAX_REASONS])
    more = len(reasons) - MAX_REASONS
    return f"{shown}; and {more} more" if more > 0 else shown


def tool_versions() -> dict[str, str]:
    """The versions that decide the checks' outcomes (they go into the data card)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("posebusters", "rdkit", "biotite"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def validate_dir(
    root: Path,
    out: Path,
    criteria: InclusionCriteria,
    progress: Callable[[Sequence[Path]], Iterable[Path]] | None = None,
    signing_key: SigningKey | None = None,
) -> ValidationRun:
    """Check every structure file under `root`, write the reports and the card to `out`;
    the card is signed with `signing_key` when one is given."""
    root, out = Path(root), Path(out)
    files = [p for p in structure_files(root) if not p.is_relative_to(out)]
    if not files:
        raise ConfigError(f"no structure files ({', '.join(SUFFIXES)}) under {root}")
    reports = []
    for path in progress(files) if progress is not None else files:
        data = path.read_bytes()
        results = tuple(check_structure(data, criteria))
        reports.append(FileReport(path.relative_to(root).as_posix(), digest_of(data), results))
    card = datacard.build_card(
        [r.results for r in reports], [r.blake3 for r in reports], criteria, tool_versions()
    )
    if signing_key is not None:
        card = datacard.sign_card(card, signing_key)
    _write_outputs(out, reports, card, criteria)
    return ValidationRun(tuple(reports), card, out)


def _write_outputs(
    out: Path, reports: Sequence[FileReport], card: dict[str, Any], criteria: InclusionCriteria
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "schema_version": SCHEMA_VERSION,
        "inclusion_criteria": criteria.__dict__,
        "files": [
            {
                "path": r.path,
                "blake3": r.blake3.hex(),
                "valid": r.valid,
                "checks": [
                    {"check": c.check, "outcome": c.outcome.value, "reason": c.reason}
                    for c in r.results
                ],
            }
            for r in reports
        ],
    }
    atomic_write(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["file", "check", "outcome", "reason"])
    for r in reports:
        for c in r.results:
            if c.outcome.value != "passed":
                writer.writerow([r.path, c.check, c.outcome.value, c.reason])
    atomic_write(out / "report.csv", rows.getvalue().encode())
    manifest = "".join(f"{r.blake3.hex()}  {r.path}\n" for r in reports)
    atomic_write(out / "manifest.txt", manifest.encode())
    atomic_write(out / "datacard.json", (json.dumps(card, indent=1) + "\n").encode())

"""`foldfed data validate`: the consortium data schema on real plinder complexes.

The real files come from the plinder 0.2.27 sdist (cached in ~/.cache/foldfed or
$FOLDFED_CACHE_DIR, as in test_of3_data). Hand-damaged copies each fail with the right
reason; the data card holds aggregates only and its manifest digest follows the bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from foldfed.errors import ConfigError
from foldfed.of3.data import plinder
from foldfed.of3.data.datacard import build_card, check_counts, manifest_digest
from foldfed.of3.data.schema import (
    CHECK_IDS,
    SCHEMA_VERSION,
    EntryMetadata,
    InclusionCriteria,
    LigandCensus,
    Outcome,
    criteria_from_config,
    failed,
    inclusion_checks,
    passed,
    quality_checks,
    skipped,
)

ENTRIES = ("7bqu", "2hyy", "3g32")  # the complexes test_of3_data's sample uses
CLASH_ENTRY = "2hyy"  # imatinib (STI) on ABL kinase
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sdist = plinder.fetch_sdist(plinder.default_cache_dir())
    return plinder.extract_entries(sdist, tmp_path_factory.mktemp("plinder-cif"))


@pytest.fixture(scope="module")
def good_dir(cifs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "cif"
    folder.mkdir()
    for entry in ENTRIES:
        shutil.copy(cifs[entry], folder / f"{entry}.cif")
    return folder.parent


def _validate_one(tmp_path: Path, name: str, data: bytes) -> dict[str, tuple[str, str]]:
    from foldfed.of3.data.validate import validate_dir

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / name).write_bytes(data)
    run = validate_dir(folder, tmp_path / "out", InclusionCriteria())
    (report,) = run.files
    return {r.check: (r.outcome.value, r.reason) for r in report.results}


# ---------------------------------------------------------------------------------------
# The command on the real sample


@pytest.mark.slow
def test_validate_command_prints_pass_rates_and_writes_a_card(good_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "services"))
    done = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", "data", "validate", str(good_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-2000:]
    for check in CHECK_IDS:
        assert re.search(rf"^{check}\s", done.stdout, re.M), check
    assert "pb_protein_clash" in done.stdout and "%" in done.stdout
    assert f"of 3 structures valid (schema {SCHEMA_VERSION}" in done.stdout
    out = good_dir / "validation"
    card = json.loads((out / "datacard.json").read_text())
    assert card["structures"] == 3 and card["schema_version"] == SCHEMA_VERSION
    # The real complexes parse, hold chains and their ligands sanitize and are plausible.
    for check in ("parse", "elements", "chains", "ligand_sanitization", "pb_protein_clash"):
        assert card["checks"][check]["pass_rate"] == 1.0, check
    report = json.loads((out / "report.json").read_text())
    assert sorted(f["path"] for f in report["files"]) == sorted(f"cif/{e}.cif" for e in ENTRIES)
    assert (out / "report.csv").read_text().startswith("file,check,outcome,reason")
    assert len((out / "manifest.txt").read_text().splitlines()) == 3


@pytest.mark.slow
def test_the_card_is_aggregate_only_and_follows_the_bytes(
    good_dir: Path, cifs: dict[str, Path], tmp_path: Path
) -> None:
    from foldfed.of3.data.validate import validate_dir

    first = validate_dir(good_dir, tmp_path / "a", InclusionCriteria())
    text = (tmp_path / "a" / "datacard.json").read_text()
    for entry in ENTRIES:
        assert entry not in text.lower()
    for name in (".cif", "cif/", "STI", "EF2", "company"):
        assert name not in text
    for report in first.files:  # no per-file digest either
        assert report.blake3.hex() not in text
    card = json.loads(text)
    assert set(card) == {
        "format", "schema_version", "structures", "valid", "valid_rate", "checks",
        "inclusion_criteria_blake3", "manifest_blake3", "tools", "signature",
        "signature_status",
    }  # fmt: skip
    for counts in card["checks"].values():
        assert set(counts) == {"passed", "failed", "skipped", "pass_rate"}
    # One changed byte in one input: another manifest digest, the same aggregates.
    changed = tmp_path / "changed"
    shutil.copytree(good_dir / "cif", changed)
    (changed / "7bqu.cif").write_bytes(cifs["7bqu"].read_bytes() + b"#\n")
    second = validate_dir(changed, tmp_path / "b", InclusionCriteria())
    assert second.card["manifest_blake3"] != first.card["manifest_blake3"]
    assert second.card["checks"] == first.card["checks"]
    # Renaming files does not change it: it depends on contents only.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, path in enumerate(sorted((good_dir / "cif").iterdir())):
        shutil.copy(path, renamed / f"x{i}.cif")
    third = validate_dir(renamed, tmp_path / "c", InclusionCriteria())
    assert third.card["manifest_blake3"] == first.card["manifest_blake3"]


# ---------------------------------------------------------------------------------------
# Hand-damaged files, each failing with the right reason


@pytest.mark.slow
def test_a_truncated_mmcif_fails_to_parse(cifs: dict[str, Path], tmp_path: Path) -> None:
    data = cifs["7bqu"].read_bytes()
    results = _validate_one(tmp_path, "cut.cif", data[: len(data) * 2 // 3])
    outcome, reason = results["parse"]
    assert outcome == "failed" and "not a readable mmCIF" in reason
    assert all(results[c] == ("skipped", "the file did not parse") for c in CHECK_IDS[1:])


@pytest.mark.slow
def test_a_wrong_element_symbol_fails(cifs: dict[str, Path], tmp_path: Path) -> None:
    lines = cifs[CLASH_ENTRY].read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("HETATM") and " STI " in line)
    fields = lines[at].split(" ")
    assert fields[2] == "C" and fields[3] == "C1"  # type_symbol, label_atom_id
    fields[2] = "N"
    lines[at] = " ".join(fields)
    results = _validate_one(tmp_path, "element.cif", "".join(lines).encode())
    outcome, reason = results["elements"]
    assert outcome == "failed"
    assert "STI" in reason and "atom C1: element 'N', the CCD says 'C'" in reason
    assert results["parse"][0] == "passed"


@pytest.mark.slow
def test_a_ligand_moved_onto_the_protein_clashes(cifs: dict[str, Path], tmp_path: Path) -> None:
    import biotite.structure.io.pdbx as pdbx
    import numpy as np

    cif = pdbx.CIFFile.read(str(cifs[CLASH_ENTRY]))
    site = cif.block["atom_site"]
    asym = site["label_asym_id"].as_array(str)
    comp = site["label_comp_id"].as_array(str)
    xyz = np.stack([site[f"Cartn_{a}"].as_array(float) for a in "xyz"], axis=1)
    ligand = (comp == "STI") & (asym == asym[comp == "STI"][0])
    protein = (asym == "A") & (site["group_PDB"].as_array(str) == "ATOM")
    xyz[ligand] += xyz[protein].mean(axis=0) - xyz[ligand].mean(axis=0)
    for i, axis in enumerate("xyz"):
        site[f"Cartn_{axis}"] = np.round(xyz[:, i], 3)
    cif.write(str(tmp_path / "moved.cif"))
    results = _validate_one(tmp_path, "clash.cif", (tmp_path / "moved.cif").read_bytes())
    for check in ("pb_protein_clash", "pb_volume_overlap"):
        outcome, reason = results[check]
        assert outcome == "failed", (check, results[check])
        assert reason.startswith("STI (")
    assert "smallest_distance_protein" in results["pb_protein_clash"][1]
    # the ligand itself is intact: only its place is wrong
    assert results["ligand_sanitization"][0] == "passed"
    assert results["pb_bond_lengths"][0] == "passed"


# ---------------------------------------------------------------------------------------
# Pure rules


def _meta(**kwargs: object) -> EntryMetadata:
    base: dict[str, object] = {
        "method": "X-RAY DIFFRACTION",
        "resolution": 2.0,
        "r_work": 0.20,
        "r_free": 0.24,
        "polymer_chains": 1,
        "ligands": (LigandCensus("B", "STI", 37),),
    }
    return EntryMetadata(**(base | kwargs))  # type: ignore[arg-type]


def _outcomes(results: list) -> dict[str, str]:
    return {r.check: r.outcome.value for r in results}


def test_quality_thresholds_at_and_beyond_the_limits() -> None:
    criteria = InclusionCriteria()
    ok = _outcomes(quality_checks(_meta(resolution=3.5, r_free=0.45, r_work=0.40), criteria))
    assert ok == {
        "resolution": "passed", "r_free": "passed", "r_gap": "passed",
        "ligand_completeness": "passed",
    }  # fmt: skip
    bad = quality_checks(
        _meta(
            resolution=3.51,
            r_free=0.46,
            r_work=0.30,
            ligands=(LigandCensus("B", "STI", 35, ("C1", "N2")),),
        ),
        criteria,
    )
    assert all(r.outcome is Outcome.FAILED for r in bad)
    reasons = {r.check: r.reason for r in bad}
    assert "3.51 A > 3.5 A" in reasons["resolution"]
    assert "|R - R-free| = 0.1600 > 0.05" in reasons["r_gap"]
    assert "STI (B): 2 unresolved (C1 N2)" in reasons["ligand_completeness"]
    missing = _outcomes(quality_checks(_meta(resolution=None, r_free=None), criteria))
    assert missing["resolution"] == missing["r_free"] == missing["r_gap"] == "skipped"


def test_inclusion_criteria_from_the_consortium_config() -> None:
    criteria = criteria_from_config(
        {"data": {"methods": ["x-ray diffraction"], "release_date_cutoff": "2020-01-01"}}
    )
    assert criteria.methods == ("X-RAY DIFFRACTION",)
    got = _outcomes(
        inclusion_checks(_meta(method="SOLUTION NMR", release_date="2021-05-05"), criteria)
    )
    assert got == {
        "method": "failed", "ligand_present": "passed", "release_date": "failed",
        "polymer_chains": "passed",
    }  # fmt: skip
    small = inclusion_checks(_meta(ligands=(LigandCensus("B", "GOL", 6),)), criteria)
    assert _outcomes(small)["ligand_present"] == "passed"
    tiny = inclusion_checks(_meta(ligands=(LigandCensus("B", "ACT", 4),)), criteria)
    assert "ACT:4" in next(r.reason for r in tiny if r.check == "ligand_present")
    assert InclusionCriteria().digest() == criteria_from_config({}).digest()
    assert criteria.digest() != InclusionCriteria().digest()
    for bad in (
        {"data": {"max_resolution": 3}},
        {"data": {"min_ligand_heavy_atoms": 0}},
        {"data": {"methods": "X-RAY"}},
        {"data": {"release_date_cutoff": "yesterday"}},
        {"data": {"min_ligand_heavy_atoms": 50, "max_ligand_heavy_atoms": 10}},
    ):
        with pytest.raises(ConfigError, match="consortium config"):
            criteria_from_config(bad)


def test_card_counts_rates_and_manifest_digest() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    assert manifest_digest([a, b]) == manifest_digest([b, a]) != manifest_digest([a])
    reports = [
        [passed("parse"), passed("resolution")],
        [passed("parse"), failed("resolution", "4.0 A")],
        [failed("parse", "cut"), skipped("resolution", "did not parse")],
    ]
    counts = check_counts(reports)
    assert counts["parse"] == {"passed": 2, "failed": 1, "skipped": 0, "pass_rate": 0.6667}
    assert counts["resolution"]["pass_rate"] == 0.5 and counts["resolution"]["skipped"] == 1
    assert counts["r_free"]["pass_rate"] is None
    card = build_card(reports, [a, b, a], InclusionCriteria(), {"posebusters": "0.6.5"})
    assert card["valid"] == 1 and card["structures"] == 3
    assert card["signature"] is None and "unsigned" in card["signature_status"]
    assert "4.0 A" not in json.dumps(card) and "cut" not in json.dumps(card)

"""Ligand scaffolds from the CCD, and a sample reassigned by the "clusters" rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from foldfed.errors import ConfigError, StoreError
from foldfed.of3.data.example import LigandInfo
from foldfed.of3.data.sample import open_sample
from foldfed.of3.data.sample_split import partition_lines, repartition
from foldfed.of3.data.scaffold import (
    component_scaffold,
    entry_scaffolds,
    ligand_scaffold,
    scaffold_id,
)


def _ligand(*residues: str, qualifies: bool = True) -> LigandInfo:
    return LigandInfo("1", residues[0], tuple(residues), 20, qualifies)


def test_component_scaffolds_from_the_ccd() -> None:
    # imatinib: the rings and their linkers, the methyl and the piperazine's N-methyl cut
    assert component_scaffold("STI") == "O=C(Nc1cccc(Nc2nccc(-c3cccnc3)n2)c1)c1ccc(CN2CCNCC2)cc1"
    assert component_scaffold("NAG") == component_scaffold("A2G") == "C1CCOCC1"  # sugars
    assert component_scaffold("GDP") == component_scaffold("GTP")  # phosphates are side chains
    assert component_scaffold("ATP") != component_scaffold("GTP")
    assert component_scaffold("POV") == ""  # POPC: no ring
    assert component_scaffold("NOTINCCD") == "component:NOTINCCD"


def test_ligand_and_entry_scaffolds() -> None:
    assert ligand_scaffold(["NAG", "NAG", "FUC"]) == "C1CCOCC1"
    assert ligand_scaffold(["PRO", "PHE"]) == "C1CCNC1.c1ccccc1"
    ids = entry_scaffolds(
        [
            _ligand("ATP"),
            _ligand("GTP"),
            _ligand("GDP"),
            _ligand("POV"),
            _ligand("STI", qualifies=False),
        ]
    )
    assert ids == tuple(sorted({scaffold_id(component_scaffold(c)) for c in ("ATP", "GTP")}))
    assert all(i.startswith("murcko:") and len(i) == len("murcko:") + 32 for i in ids)
    assert entry_scaffolds([_ligand("POV")]) == ()


def _write_sample(root: Path, rows: list[dict[str, object]], split_by: str) -> None:
    (root / "features").mkdir(parents=True)
    entries = []
    for row in rows:
        name = f"features/{row['entry_id']}.safetensors"
        (root / name).write_bytes(b"x")
        entries.append({"features": name, "n_tokens": 64, **row})
    manifest = {
        "format": "foldfed.of3.sample/1",
        "partition": {
            "key": "k",
            "heldout_fraction": 0.3,
            "companies": ["company-a", "company-b"],
            "split_by": split_by,
        },
        "entries": entries,
    }
    (root / "sample.json").write_text(json.dumps(manifest))


def test_repartition_gives_each_company_its_own_series(tmp_path: Path) -> None:
    # a..d: four proteins; a and b share scaffold s1, c and d share s2; e alone
    rows: list[dict[str, object]] = [
        {"entry_id": e, "company": c, "split": "train", "cluster": f"p{e}", "scaffolds": s}
        for e, c, s in (
            ("a", "company-a", ["s1"]),
            ("b", "company-b", ["s1"]),
            ("c", "company-a", ["s2"]),
            ("d", "company-b", ["s2"]),
            ("e", "company-a", []),
        )
    ]
    _write_sample(tmp_path / "today", rows, "entries")
    today = open_sample(tmp_path / "today")
    assert "scaffolds: max Jaccard between companies' training sets 1.000" in "\n".join(
        partition_lines(today)
    )
    split = repartition(today, "clusters")
    assert split.split_by == "clusters" and repartition(split, "clusters") is split
    side = {e.entry_id: (e.company, e.split) for e in split.entries}
    assert side["a"] == side["b"] and side["c"] == side["d"]
    lines = "\n".join(partition_lines(split))
    assert "3 components" in lines and "1.000" not in lines
    with pytest.raises(ConfigError):
        repartition(today, "families")

    # a sample that says "clusters" but shares a scaffold is refused
    rows[1]["company"], rows[0]["company"] = "company-b", "company-a"
    _write_sample(tmp_path / "bad", rows, "clusters")
    with pytest.raises(StoreError, match="scaffolds shared"):
        open_sample(tmp_path / "bad")


def test_repartition_reads_scaffolds_from_real_feature_files(tmp_path: Path) -> None:
    """The 12-entry test sample, its scaffolds dropped from sample.json (as a sample made
    before they were recorded): they are read from the feature headers. 1qz5 (ATP) and
    4jvn (A3P) share the adenosine scaffold, so they land on the same side."""
    from foldfed.of3.testing import prepared_sample

    root = tmp_path / "old"
    shutil.copytree(prepared_sample(), root)
    manifest = json.loads((root / "sample.json").read_text())
    for e in manifest["entries"]:
        e.pop("scaffolds", None)
    manifest["partition"].pop("split_by", None)
    (root / "sample.json").write_text(json.dumps(manifest))
    split = repartition(open_sample(root), "clusters")
    side = {e.entry_id: (e.company, e.split, e.component) for e in split.entries}
    assert side["1qz5"] == side["4jvn"]
    assert {s for e in split.entries for s in e.scaffolds or ()}
    lines = "\n".join(partition_lines(split))
    assert "between companies' training sets 0.000" in lines

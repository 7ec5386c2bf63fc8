"""The larger pool: pinned PyPI archives' test data as real experimental PDB entries.

Header rules and PDB-id deduplication are checked on small texts; one session fixture
gathers two real sources (MDAnalysisTests and pele-platform: fetched once, then cached in
~/.cache/foldfed/pool or $FOLDFED_CACHE_DIR) and puts three new entries from them and one
mmCIF entry from biopython through the same featurization the plinder entries go through.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from foldfed.errors import ConfigError
from foldfed.of3.data import plinder, pool_sources
from foldfed.of3.data.features import load_batch, read_feature_info
from foldfed.of3.data.pdb_format import pdb_to_mmcif, release_date, with_release_history
from foldfed.of3.data.pool import Header, gather_pool, header_verdict, read_header
from foldfed.of3.data.sample import Sample, prepare_sample

BUDGET = 48
# Two PDB-format sources (one with its ligand renamed LIG, which is dropped) and mmCIF.
NEW = {"1hvr": "mdanalysistests", "1a28": "mdanalysistests", "4qnr": "pele-platform"}
PDB_HEADER = (
    "HEADER    HYDROLASE/HYDROLASE INHIBITOR           14-FEB-94   1HVR              \n"
    "REVDAT   2   24-FEB-09 1HVR    1       VERSN                                    \n"
    "REVDAT   1   26-JAN-95 1HVR    0                                                \n"
    "EXPDTA    X-RAY DIFFRACTION                                                     \n"
)


def test_headers_decide_what_is_an_experimental_entry() -> None:
    header = read_header(PDB_HEADER.encode(), "pdb")
    assert header == Header("1hvr", ("X-RAY DIFFRACTION",))
    assert header_verdict(header) is None
    model = PDB_HEADER.replace("X-RAY DIFFRACTION", "THEORETICAL MODEL")
    assert "predicted" in str(header_verdict(read_header(model.encode(), "pdb")))
    no_id = "ATOM      1  N   MET A   1      0.0   0.0   0.0  1.00  0.00           N\n"
    assert "no header" in str(header_verdict(read_header(no_id.encode(), "pdb")))
    cif = "data_X\n_entry.id 8FAV\n_exptl.method 'ELECTRON MICROSCOPY'\n"
    assert read_header(cif.encode(), "cif") == Header("8fav", ("ELECTRON MICROSCOPY",))
    nameless = "data_s\n_exptl.method 'X-RAY DIFFRACTION'\n"
    assert "no header" in str(header_verdict(read_header(nameless.encode(), "cif")))
    assert release_date(PDB_HEADER) == "1995-01-26"  # the original release, not a revision


def test_assembly_size_counts_operators() -> None:
    from foldfed.of3.data.pool import _operator_count

    assert _operator_count("1") == 1 and _operator_count("1,2") == 2
    assert _operator_count("(1-60)") == 60 and _operator_count("(1-5)(6,7)") == 10


def test_source_table_pins_every_archive() -> None:
    names = pool_sources.source_names()
    assert names[0] == "plinder" and len(set(names)) == len(names)
    for source in pool_sources.SOURCES:
        assert "==" in source.requirement and len(source.sha256) == 64
        assert source.archive.startswith(
            source.requirement.split("==")[0].lower().replace("-", "_")
        )


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory):
    dest = tmp_path_factory.mktemp("pool-cif")
    return gather_pool(
        ["mdanalysistests", "pele-platform"],
        plinder.default_cache_dir(),
        dest,
        taken={"1a28"},  # as if plinder had it: the pool must leave it out
    )


def test_pool_dedups_by_pdb_id_and_reports_every_file(pool) -> None:
    counts = pool.counts()
    print(counts)
    assert counts["mdanalysistests"] >= 5 and counts["pele-platform"] >= 10
    assert "1a28" not in pool.cifs
    assert any(s["reason"] == "duplicate: 1a28 is in plinder's entries" for s in pool.skipped)
    # pele ships two 1dyi files; exactly one is kept
    assert pool.entries["1dyi"].source == "pele-platform"
    assert any(s["reason"].startswith("duplicate: 1dyi kept from") for s in pool.skipped)
    assert pool.entries["4qnr"].dropped == ("LIG",)  # renamed ligand, not the CCD's
    assert all(s["reason"] for s in pool.skipped)
    for path in pool.cifs.values():
        assert path.read_bytes().startswith(b"data_")


@pytest.fixture(scope="session")
def new_sample(tmp_path_factory: pytest.TempPathFactory, pool) -> Sample:
    """New entries from three sources through the plinder entries' featurization."""
    cifs = {e: pool.cifs[e] for e in NEW if e in pool.cifs}
    other = gather_pool(
        ["mdanalysistests"], plinder.default_cache_dir(), tmp_path_factory.mktemp("a28")
    )
    cifs["1a28"] = other.cifs["1a28"]
    biopython = pool_sources.by_name("biopython")
    archive = pool_sources.fetch_archive(biopython, plinder.default_cache_dir())
    member = next(
        m
        for m in pool_sources.structure_members(biopython, archive)
        if m.member.endswith("Tests/PDB/4CUP.cif")
    )
    cifs["4cup"] = tmp_path_factory.mktemp("bio") / "4cup.cif"
    cifs["4cup"].write_bytes(with_release_history(member.data))  # as gather_pool does
    out = tmp_path_factory.mktemp("new-sample")
    return prepare_sample(out, 2, token_budget=BUDGET, cifs=cifs).sample


def test_new_entries_featurize_like_plinders(new_sample: Sample) -> None:
    assert not new_sample.failures, new_sample.failures
    got = {e.entry_id for e in new_sample.entries}
    assert got == {*NEW, "4cup"}, new_sample.skipped
    for entry in new_sample.entries:
        info = read_feature_info(entry.features)
        batch = load_batch(entry.features)
        print(entry.entry_id, info.primary_ligand.component, info.experimental_method)
        assert info.n_tokens == BUDGET and info.primary_ligand.qualifies
        assert info.experimental_method == "X-RAY DIFFRACTION" and info.resolution
        assert info.release_date
        assert int(batch["token_mask"].sum()) == info.n_tokens
        assert torch.isfinite(batch["ground_truth"]["atom_positions"]).any()
    ligands = {
        e.entry_id: read_feature_info(e.features).primary_ligand.component
        for e in new_sample.entries
    }
    assert ligands["1hvr"] == "XK2" and ligands["1a28"] == "STR"


def test_pdb_conversion_keeps_sequences_and_types(pool) -> None:
    text = pool.cifs["1hvr"].read_text()
    assert "_entity_poly.pdbx_seq_one_letter_code_can" in text
    assert "_pdbx_audit_revision_history.revision_date" in text
    assert "'L-PEPTIDE LINKING'" in text.upper() or "L-PEPTIDE LINKING" in text.upper()
    with pytest.raises(Exception, match="date"):
        pdb_to_mmcif(
            "ATOM      1  N   MET A   1       0.000   0.000   0.000  1.00  0.00           N\n",
            "0abc",
        )


def test_unknown_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown source"):
        prepare_sample(tmp_path, 2, sources=["plinder", "nope"])


def test_pool_manifest_lists_sources(tmp_path: Path, pool) -> None:
    from foldfed.of3.data.pool import write_pool_manifest

    path = write_pool_manifest(tmp_path, ["7bqu"], pool, ["7bqu", "1hvr"], {"1bo0": "no ligand"})
    doc = json.loads(path.read_text())
    assert doc["format"] == "foldfed.of3.pool/1"
    assert {a["source"] for a in doc["archives"]} == {"mdanalysistests", "pele-platform"}
    assert doc["entries"][0] == {"entry_id": "7bqu", "source": "plinder"}
    assert doc["not_featurized"] == {"1bo0": "no ligand"}
    assert doc["skipped_files"] == pool.skipped

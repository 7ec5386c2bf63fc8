"""A PDB-format entry rewritten as the mmCIF OpenFold3's preprocessing reads.

OpenFold3 parses mmCIF only, and needs more than the coordinates: entities with integer
ids, `entity_poly` with the canonical one-letter sequence, `entity_poly_seq` (to add
unresolved residues), `struct_asym`, `exptl` (X-ray entries get extra cleanup),
`refine` (the resolution) and `pdbx_audit_revision_history` (the release date). gemmi
(installed with pdbeccdutils) builds all but the last two from the PDB records (SEQRES,
EXPDTA, REMARK 2, HELIX/SHEET, LINK, assemblies from REMARK 350). The release date is the
earliest REVDAT date (the original release), else the HEADER deposition date.

Hetero residues the chemical-components dictionary does not describe are dropped and
named: test data often renames a ligand (`LIG`, `UNL`) or keeps atom names of its own,
and OpenFold3 would build the wrong molecule from the CCD entry of that name. A residue
is kept when the CCD knows it and every one of its heavy atoms' names is the CCD's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from foldfed.errors import FoldfedError

_PAREN = re.compile(r"\(([^)]*)\)")


class PdbFormatError(FoldfedError):
    """The PDB text cannot be read or converted; the message says why."""


@dataclass(frozen=True)
class ConvertedEntry:
    cif: bytes  # the mmCIF text, data block named by the PDB id
    dropped: tuple[str, ...]  # hetero residue names removed as not matching the CCD


def pdb_to_mmcif(text: str, pdb_id: str) -> ConvertedEntry:
    """Convert one PDB-format entry (see the module docstring)."""
    import gemmi

    try:
        st = gemmi.read_pdb_string(text)
    except (RuntimeError, ValueError) as exc:
        raise PdbFormatError(f"gemmi: {exc}") from exc
    st.name = pdb_id.upper()
    st.setup_entities()
    dropped = _drop_non_ccd_hetero(st)
    if dropped:
        st.setup_entities()  # entities and subchains again, without the dropped residues
    _sequences_from_model(st)
    st.assign_label_seq_id()
    for number, entity in enumerate(st.entities, start=1):
        entity.name = str(number)  # OpenFold3 reads entity ids as integers
    doc = st.make_mmcif_document()
    block = doc.sole_block()
    block.name = pdb_id.upper()
    _add_canonical_sequences(block)
    _chem_comp_from_ccd(block)
    # Prepared files keep REMARK 2 (gemmi reads it) but not REMARK 3, where gemmi's
    # writer takes `refine` from.
    if st.resolution > 0 and not block.find_value("_refine.ls_d_res_high"):
        block.set_pair("_refine.ls_d_res_high", f"{st.resolution:g}")
    release = release_date(text) or block.find_value(
        "_pdbx_database_status.recvd_initial_deposition_date"
    )
    if not release:
        raise PdbFormatError("no release or deposition date in the header")
    _set_release(block, release)
    return ConvertedEntry(cif=doc.as_string().encode(), dropped=tuple(sorted(dropped)))


def with_release_history(cif: bytes) -> bytes:
    """An mmCIF entry with `pdbx_audit_revision_history`, which entries written before
    2008's remediation lack: their release date is the earliest `database_PDB_rev.date`,
    else the deposition date. Files that have it are returned unchanged."""
    import gemmi

    doc = gemmi.cif.read_string(cif.decode("utf-8", errors="replace"))
    block = doc.sole_block()
    if block.find_values("_pdbx_audit_revision_history.revision_date"):
        return cif
    dates = sorted(
        str(gemmi.cif.as_string(v))
        for tag in ("_database_PDB_rev.date", "_pdbx_database_status.recvd_initial_deposition_date")
        for v in block.find_values(tag)
        if gemmi.cif.as_string(v) not in ("", "?", ".")
    )
    if not dates:
        raise PdbFormatError("no release or deposition date in the header")
    _set_release(block, dates[0])
    return doc.as_string().encode()


def _set_release(block: object, date: str) -> None:
    block.set_mmcif_category(  # type: ignore[attr-defined]
        "_pdbx_audit_revision_history.",
        {
            "ordinal": ["1"],
            "data_content_type": ["Structure model"],
            "major_revision": ["1"],
            "minor_revision": ["0"],
            "revision_date": [date],
        },
    )


def release_date(text: str) -> str | None:
    """The earliest REVDAT date as YYYY-MM-DD, or None without REVDAT records."""
    dates = []
    for line in text.splitlines():
        if line.startswith("REVDAT") and line[13:22].strip():
            try:
                dates.append(datetime.strptime(line[13:22].strip(), "%d-%b-%y").date())
            except ValueError:
                continue
    return min(dates).isoformat() if dates else None


def _drop_non_ccd_hetero(st: object) -> set[str]:
    """Remove hetero residues the CCD does not describe (module docstring); their names."""
    from foldfed.of3.data.structure_file import ccd_elements

    dropped: set[str] = set()
    for model in st:  # type: ignore[attr-defined]
        for chain in model:
            for index in reversed(range(len(chain))):
                residue = chain[index]
                if residue.het_flag != "H" or residue.name in ("HOH", "WAT", "DOD"):
                    continue
                names = ccd_elements(residue.name)
                heavy = [a.name for a in residue if a.element.name not in ("H", "D")]
                if not names or any(name not in names for name in heavy):
                    dropped.add(residue.name)
                    del chain[index]
    return dropped


def _sequences_from_model(st: object) -> None:
    """Without SEQRES (prepared files drop it) a polymer's sequence is its modelled
    residues, in order: unresolved residues are then unknown, not added."""
    for entity in st.entities:  # type: ignore[attr-defined]
        if entity.full_sequence or not entity.subchains:
            continue
        polymer = st[0].get_subchain(entity.subchains[0])  # type: ignore[index]
        entity.full_sequence = [residue.name for residue in polymer]


def _chem_comp_from_ccd(block: object) -> None:
    """`chem_comp.type` from the CCD: gemmi writes '.' for components it does not
    tabulate, and OpenFold3 types a chain's molecule (protein, ligand, ...) by it."""
    from biotite.structure.info.ccd import get_from_ccd

    table = block.find_mmcif_category("_chem_comp.")  # type: ignore[attr-defined]
    if not table:
        return
    ids = [_unquote(v) for v in table.find_column("_chem_comp.id")]
    types = []
    for component in ids:
        found = get_from_ccd("chem_comp", component, "type")
        types.append(str(found.as_item()) if found is not None else "NON-POLYMER")
    block.set_mmcif_category(  # type: ignore[attr-defined]
        "_chem_comp.", {"id": ids, "type": types}
    )


def _add_canonical_sequences(block: object) -> None:
    """`entity_poly.pdbx_seq_one_letter_code_can`: gemmi writes the non-canonical code
    only, with modified residues as `(CSO)`; the canonical one maps each to its parent's
    letter from the CCD, else X."""
    from biotite.structure.info import one_letter_code

    table = block.find_mmcif_category("_entity_poly.")  # type: ignore[attr-defined]
    if not table or "_entity_poly.pdbx_seq_one_letter_code" not in table.tags:
        return
    column = table.find_column("_entity_poly.pdbx_seq_one_letter_code")
    canonical = []
    for value in column:
        raw = _unquote(value)

        def parent(match: re.Match[str]) -> str:
            letter = one_letter_code(match.group(1))
            return letter.upper() if letter else "X"

        canonical.append(_PAREN.sub(parent, raw).replace("\n", "").replace(";", ""))
    values = {tag: [_unquote(v) for v in table.find_column(tag)] for tag in table.tags}
    values["_entity_poly.pdbx_seq_one_letter_code_can"] = canonical
    block.set_mmcif_category(  # type: ignore[attr-defined]
        "_entity_poly.", {tag.split(".", 1)[1]: v for tag, v in values.items()}
    )


def _unquote(value: str) -> str:
    import gemmi

    return str(gemmi.cif.as_string(value)).strip()

"""One structure file read for validation: the atoms, the schema's metadata, and the
element and chain facts, with biotite (and its bundled chemical-components dictionary).

`read_structure(data)` parses mmCIF bytes (plain or gzip) into a `ParsedStructure`, or
raises `StructureParseError` with the parser's reason. Chains are named by
`label_asym_id`, so each ligand instance is its own chain. Ligands are the non-polymer
and branched chains that are not water, solvent, buffer or crystallization aid (the list
the sample's ligand rule uses, `pocket.excluded_components`).
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from functools import cache
from typing import Any

from foldfed.errors import FoldfedError
from foldfed.of3.data.schema import EntryMetadata, LigandCensus

WATERS = frozenset({"HOH", "DOD", "WAT"})
HYDROGENS = ("H", "D")
# The periodic table, upper case as mmCIF writes type_symbol (D for deuterium).
ELEMENTS = frozenset(
    """H D HE LI BE B C N O F NE NA MG AL SI P S CL AR K CA SC TI V CR MN FE CO NI CU ZN GA
    GE AS SE BR KR RB SR Y ZR NB MO TC RU RH PD AG CD IN SN SB TE I XE CS BA LA CE PR ND PM
    SM EU GD TB DY HO ER TM YB LU HF TA W RE OS IR PT AU HG TL PB BI PO AT RN FR RA AC TH PA
    U NP PU AM CM BK CF ES FM MD NO LR RF DB SG BH HS MT DS RG CN NH FL MC LV TS OG""".split()
)
POLYMER_TYPES = frozenset({"polymer"})
LIGAND_TYPES = frozenset({"non-polymer", "branched"})


class StructureParseError(FoldfedError):
    """The file is not a readable mmCIF structure; the message says why."""


@dataclass(frozen=True)
class ParsedStructure:
    atoms: Any  # biotite AtomArray: model 1, one altloc, bonds from the CCD, occupancy
    metadata: EntryMetadata
    polymer_chains: tuple[str, ...]
    ligand_chains: tuple[str, ...]  # every ligand instance, also too small or too big


def read_structure(data: bytes) -> ParsedStructure:
    """Parse mmCIF bytes (gzip accepted); StructureParseError names the failure."""
    import biotite.structure.io.pdbx as pdbx

    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise StructureParseError(f"gzip: {exc}") from exc
    try:
        cif = pdbx.CIFFile.read(io.StringIO(data.decode("utf-8")))
        block = cif.block
        atoms = pdbx.get_structure(
            block,
            model=1,
            include_bonds=True,
            extra_fields=["occupancy", "charge"],
            use_author_fields=False,
        )
    except Exception as exc:  # biotite raises many kinds; the reason is what matters
        raise StructureParseError(f"{type(exc).__name__}: {exc}") from exc
    if atoms.array_length() == 0:
        raise StructureParseError("no atoms in atom_site")
    entity_of_chain = _entity_types(block)
    chains = list(dict.fromkeys(atoms.chain_id.tolist()))
    polymers = tuple(c for c in chains if entity_of_chain.get(c) in POLYMER_TYPES)
    ligand_chains = tuple(
        c
        for c in chains
        if entity_of_chain.get(c) in LIGAND_TYPES
        and not set(atoms.res_name[atoms.chain_id == c].tolist()) <= WATERS | _excluded()
    )
    meta = EntryMetadata(
        method=", ".join(_column(block, "exptl", "method")),
        resolution=_resolution(block),
        r_work=_first_float(block, "refine", ("ls_R_factor_R_work", "ls_R_factor_obs")),
        r_free=_first_float(block, "refine", ("ls_R_factor_R_free",)),
        release_date=min(
            _column(block, "pdbx_audit_revision_history", "revision_date"), default=""
        ),
        polymer_chains=len(polymers),
        ligands=tuple(_census(atoms, c) for c in ligand_chains),
    )
    return ParsedStructure(atoms, meta, polymers, ligand_chains)


def _excluded() -> frozenset[str]:
    from foldfed.of3.data.pocket import excluded_components

    return excluded_components()


def _column(block: Any, category: str, column: str) -> list[str]:
    """A column's values as text, without mmCIF's '?' and '.' (unknown, not applicable)."""
    if category not in block or column not in block[category]:
        return []
    values = block[category][column].as_array(str).tolist()
    return [v for v in values if v not in ("?", ".", "")]


def _first_float(block: Any, category: str, columns: tuple[str, ...]) -> float | None:
    for column in columns:
        for value in _column(block, category, column):
            try:
                return float(value)
            except ValueError:
                continue
    return None


def _resolution(block: Any) -> float | None:
    for category, column in (
        ("refine", "ls_d_res_high"),
        ("reflns", "d_resolution_high"),
        ("em_3d_reconstruction", "resolution"),
    ):
        value = _first_float(block, category, (column,))
        if value is not None:
            return value
    return None


def _entity_types(block: Any) -> dict[str, str]:
    """label_asym_id -> entity type ("polymer", "non-polymer", "branched", "water")."""
    types = dict(
        zip(_column(block, "entity", "id"), _column(block, "entity", "type"), strict=False)
    )
    asym = zip(
        _column(block, "struct_asym", "id"),
        _column(block, "struct_asym", "entity_id"),
        strict=False,
    )
    return {chain: types.get(entity, "") for chain, entity in asym}


def _census(atoms: Any, chain: str) -> LigandCensus:
    """A ligand chain's resolved heavy atoms and the CCD heavy atoms it lacks."""
    import numpy as np

    mine = atoms[atoms.chain_id == chain]
    present = mine[~np.isin(mine.element, HYDROGENS) & (mine.occupancy > 0)]
    residues = list(dict.fromkeys(mine.res_name.tolist()))
    missing: list[str] = []
    for res_id in np.unique(mine.res_id):
        in_res = present[present.res_id == res_id]
        name = str(mine.res_name[mine.res_id == res_id][0])
        have = set(in_res.atom_name.tolist())
        missing += [a for a in ccd_heavy_atoms(name) if a not in have]
    return LigandCensus(
        instance=chain,
        component="+".join(residues),
        heavy_atoms=int(present.array_length()),
        unresolved_heavy_atoms=tuple(missing),
    )


@cache
def ccd_elements(component: str) -> dict[str, str]:
    """Atom name -> element symbol (upper case) for a CCD component; {} if unknown."""
    from biotite.structure.info.ccd import get_from_ccd

    names = get_from_ccd("chem_comp_atom", component, "atom_id")
    symbols = get_from_ccd("chem_comp_atom", component, "type_symbol")
    if names is None or symbols is None:
        return {}
    return dict(zip(names.as_array(str).tolist(), symbols.as_array(str).tolist(), strict=True))


@cache
def ccd_heavy_atoms(component: str) -> tuple[str, ...]:
    """The CCD's heavy atoms of a component, without leaving atoms (lost on bonding)."""
    from biotite.structure.info.ccd import get_from_ccd

    elements = ccd_elements(component)
    leaving = get_from_ccd("chem_comp_atom", component, "pdbx_leaving_atom_flag")
    flags = leaving.as_array(str).tolist() if leaving is not None else ["N"] * len(elements)
    return tuple(
        name
        for (name, element), flag in zip(elements.items(), flags, strict=True)
        if element not in HYDROGENS and flag.upper() != "Y"
    )


def element_problems(parsed: ParsedStructure) -> list[str]:
    """Atoms whose element is not a real one, or (ligands) differs from the CCD's."""
    atoms = parsed.atoms
    problems = []
    for symbol in sorted(
        {str(e) for e in atoms.element.tolist() if str(e).upper() not in ELEMENTS}
    ):
        count = int((atoms.element == symbol).sum())
        problems.append(f"unknown element {symbol!r} on {count} atom(s)")
    for chain in parsed.ligand_chains:
        mine = atoms[atoms.chain_id == chain]
        for name, atom, symbol in zip(mine.res_name, mine.atom_name, mine.element, strict=True):
            expected = ccd_elements(str(name)).get(str(atom))
            element = str(symbol)
            if expected is not None and expected.upper() != element.upper():
                problems.append(
                    f"ligand {name} ({chain}) atom {atom}: element {element!r}, "
                    f"the CCD says {expected!r}"
                )
    return problems


@cache
def ccd_charges(component: str) -> dict[str, int]:
    """Atom name -> formal charge for a CCD component; {} if unknown."""
    from biotite.structure.info.ccd import get_from_ccd

    names = get_from_ccd("chem_comp_atom", component, "atom_id")
    charges = get_from_ccd("chem_comp_atom", component, "charge")
    if names is None or charges is None:
        return {}
    out = {}
    for name, charge in zip(names.as_array(str), charges.as_array(str), strict=True):
        try:
            out[str(name)] = int(charge)
        except ValueError:
            out[str(name)] = 0
    return out


def ligand_atoms(parsed: ParsedStructure, chain: str) -> Any:
    """A ligand instance's heavy atoms at occupancy > 0, formal charges from the CCD
    (deposited files often leave pdbx_formal_charge empty, e.g. NAD's pyridinium N+)."""
    import numpy as np

    atoms = parsed.atoms
    mine = atoms[atoms.chain_id == chain]
    mine = mine[~np.isin(mine.element, HYDROGENS) & (mine.occupancy > 0)]
    for i, (res, name) in enumerate(zip(mine.res_name, mine.atom_name, strict=True)):
        charge = ccd_charges(str(res)).get(str(name))
        if charge is not None:
            mine.charge[i] = charge
    return mine


def pocket_atoms(parsed: ParsedStructure, chain: str, radius: float = 10.0) -> Any:
    """The polymer heavy atoms within `radius` Å of a ligand instance, without the atoms
    covalently bound to it (glycosylation, covalent inhibitors, metal coordination in
    struct_conn) nor their bonded neighbours: those sit closer than van der Waals radii
    by design and are no clash."""
    import numpy as np

    atoms = parsed.atoms
    is_ligand = atoms.chain_id == chain
    bonded = _bonded_to(atoms, np.flatnonzero(is_ligand), depth=2)
    keep = np.isin(atoms.chain_id, parsed.polymer_chains) & ~np.isin(atoms.element, HYDROGENS)
    keep[list(bonded)] = False
    polymer = atoms[keep]
    ligand = atoms[is_ligand & ~np.isin(atoms.element, HYDROGENS)]
    if polymer.array_length() == 0 or ligand.array_length() == 0:
        return polymer[:0]
    deltas = polymer.coord[:, None, :] - ligand.coord[None, :, :]
    nearest = np.sqrt((deltas**2).sum(axis=-1)).min(axis=1)
    return polymer[nearest <= radius]


def _bonded_to(atoms: Any, start: Any, depth: int) -> set[int]:
    """Indices within `depth` bonds of the atoms `start` (outside `start`)."""
    seen = {int(i) for i in start}
    frontier = set(seen)
    found: set[int] = set()
    for _ in range(depth):
        nxt: set[int] = set()
        for i in frontier:
            partners, _types = atoms.bonds.get_bonds(i)
            nxt.update(int(j) for j in partners if int(j) not in seen)
        seen |= nxt
        found |= nxt
        frontier = nxt
    return found

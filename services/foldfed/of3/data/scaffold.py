"""Ligand scaffolds of an entry: the Bemis-Murcko scaffolds of its qualifying ligands.

The scaffolds are the chemical-series half of `partition`'s "clusters" rule: two entries
whose ligands share a scaffold belong to one series, and one company.

How a ligand is read. A qualifying ligand (`LigandInfo.qualifies`) is known by the CCD
codes of its residues (`LigandInfo.residues`), and its chemistry is read from the CCD
entry of each code (biotite's bundled CCD, offline), not from the deposited coordinates:
the same molecule OpenFold3 builds its reference conformer from (a PDB-format residue that
does not match the CCD entry of its name is dropped before featurization, see
`pdb_format`), with the CCD's bond orders and charges instead of bonds guessed from
distances. Per
residue: the CCD atoms and bonds as an RDKit molecule (`biotite.interface.rdkit`),
hydrogens removed, sanitized, then `MurckoScaffold.GetScaffoldForMol` (ring systems and
the linkers between them, side chains cut) as RDKit's canonical SMILES.

- An acyclic residue (a fatty acid, a free glycine) has the empty scaffold.
- A residue the CCD lacks, or that RDKit cannot sanitize, stands for itself:
  `component:<code>` (entries holding that very component still join).
- A ligand of several residues (a glycan, a short peptide) is the sorted, distinct,
  non-empty scaffolds of its residues joined by "." (the linkage between residues is not
  read: NAG-NAG and NAG alone share a scaffold, a sugar series).
- A ligand whose every residue is acyclic has no scaffold and joins nothing.

An entry's scaffolds are the distinct ligand scaffolds of its qualifying ligands, each as
`murcko:` + the first 16 bytes (hex) of the blake3 digest of its text, sorted. Canonical
SMILES may change between RDKit releases, so `SCAFFOLD_RULE` names the version in use
(sample.json records it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import cache

import blake3

from foldfed.of3.data.example import LigandInfo

PREFIX = "murcko:"


def scaffold_rule() -> str:
    """The rule and the RDKit release behind the scaffold ids, e.g. "murcko/rdkit-2025.09.6"."""
    import rdkit

    return f"murcko/rdkit-{rdkit.__version__}"


@cache
def component_scaffold(component: str) -> str:
    """The canonical SMILES of a CCD component's Murcko scaffold ("" when acyclic), or
    `component:<code>` when the CCD lacks it or RDKit cannot read it."""
    from biotite.interface.rdkit import to_mol
    from biotite.structure import info
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    try:
        atoms = info.residue(component)
    except KeyError:
        return f"component:{component}"
    RDLogger.DisableLog("rdApp.*")  # a failed sanitization is handled, not printed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mol = to_mol(atoms, explicit_hydrogen=True)
        mol = Chem.RemoveHs(mol, sanitize=False)
        Chem.SanitizeMol(mol)
        return str(Chem.MolToSmiles(MurckoScaffold.GetScaffoldForMol(mol)))
    except (ValueError, RuntimeError, KeyError):  # RDKit's MolSanitizeException is a ValueError
        return f"component:{component}"
    finally:
        RDLogger.EnableLog("rdApp.*")


def ligand_scaffold(residues: Iterable[str]) -> str:
    """One ligand's scaffold text from its residues' CCD codes ("" when acyclic)."""
    return ".".join(sorted({s for s in (component_scaffold(r) for r in residues) if s}))


def scaffold_id(text: str) -> str:
    """The id of a scaffold text (`murcko:` + 32 hex digits)."""
    return PREFIX + blake3.blake3(text.encode()).digest(length=16).hex()


def entry_scaffolds(ligands: Iterable[LigandInfo]) -> tuple[str, ...]:
    """The sorted, distinct scaffold ids of an entry's qualifying ligands."""
    texts = {ligand_scaffold(x.residues) for x in ligands if x.qualifies}
    return tuple(sorted(scaffold_id(t) for t in texts if t))

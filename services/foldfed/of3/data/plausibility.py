"""A ligand's chemistry and pose: RDKit sanitization, then the PoseBusters checks on the
complex (ligand against its protein pocket).

The ligand becomes an RDKit molecule from its observed atoms and the CCD's bonds
(biotite's `to_mol`, no hydrogens: X-ray structures rarely hold them, RDKit adds them
implicitly). PoseBusters runs its `dock_fast` configuration cut to the modules the schema
names (`POSEBUSTERS_CHECKS`), with PoseBusters' own thresholds: the schema version pins
the package version (`POSEBUSTERS_VERSION`), so every party judges with the same limits.
"""

from __future__ import annotations

from functools import cache
from typing import Any

POSEBUSTERS_VERSION = "0.6.5"

# schema check id -> PoseBusters output column.
POSEBUSTERS_CHECKS: dict[str, str] = {
    "pb_bond_lengths": "bond_lengths",
    "pb_bond_angles": "bond_angles",
    "pb_internal_clash": "internal_steric_clash",
    "pb_aromatic_flatness": "aromatic_ring_flatness",
    "pb_protein_clash": "minimum_distance_to_protein",
    "pb_volume_overlap": "volume_overlap_with_protein",
}
# The dock_fast modules that compute them (by their name in PoseBusters' config).
_MODULES = frozenset(
    {"Loading", "Geometry", "Ring flatness", "Distance to protein", "Volume overlap with protein"}
)
# Full-report columns that say by how much a check failed (shown in the local reason).
_DETAILS: dict[str, tuple[str, ...]] = {
    "pb_bond_lengths": ("number_bonds", "number_valid_bonds"),
    "pb_bond_angles": ("number_angles", "number_valid_angles"),
    "pb_internal_clash": ("number_noncov_pairs", "number_valid_noncov_pairs"),
    "pb_aromatic_flatness": ("aromatic_ring_maximum_distance_from_plane",),
    "pb_protein_clash": ("smallest_distance_protein", "num_pairwise_clashes_protein"),
    "pb_volume_overlap": ("volume_overlap_protein",),
}


class ChemistryError(ValueError):
    """The ligand cannot become a sanitized RDKit molecule; the message says why."""


def sanitized_ligand(atoms: Any) -> Any:
    """An RDKit molecule of the ligand's heavy atoms with their coordinates, sanitized.
    ChemistryError carries RDKit's reason (valence, kekulization, unknown element...)."""
    from biotite.interface.rdkit import to_mol
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # the reason travels in the exception instead
    try:
        atoms = atoms.copy()
        # Kekulé bonds from the CCD, aromaticity perceived by RDKit: without hydrogens an
        # aromatic N-H (pyrrole, imidazole) cannot be kekulized from aromatic bond flags.
        atoms.bonds.remove_aromaticity()
        mol = to_mol(atoms, explicit_hydrogen=False)
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit and biotite raise many kinds
        raise ChemistryError(f"{type(exc).__name__}: {exc}".strip()) from exc
    return mol


def pocket_molecule(atoms: Any) -> Any:
    """The protein pocket as an unsanitized RDKit molecule (PoseBusters reads its atoms
    and coordinates only; partial residues would not sanitize)."""
    from biotite.interface.rdkit import to_mol

    return to_mol(atoms, explicit_hydrogen=False)


@cache
def _busters() -> Any:
    from pathlib import Path

    import posebusters
    import yaml

    path = Path(posebusters.__file__).parent / "config" / "dock_fast.yml"
    config = yaml.safe_load(path.read_text())
    config["modules"] = [m for m in config["modules"] if m["name"] in _MODULES]
    return posebusters.PoseBusters(config=config)


def posebusters_verdicts(ligand: Any, pocket: Any) -> dict[str, tuple[bool, str]]:
    """Schema check id -> (passed, detail) for one ligand against its pocket."""
    import math

    table = _busters().bust(mol_pred=ligand, mol_cond=pocket, full_report=True)
    row = table.iloc[0]
    verdicts = {}
    for check, column in POSEBUSTERS_CHECKS.items():
        ok = bool(row.get(column, False))
        details = []
        for key in _DETAILS[check]:
            value = row.get(key)
            if isinstance(value, float) and math.isfinite(value):
                details.append(f"{key}={value:.3g}")
            elif value is not None and not isinstance(value, float):
                details.append(f"{key}={value}")
        verdicts[check] = (ok, ", ".join(details))
    return verdicts

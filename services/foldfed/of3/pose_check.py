"""PoseBusters validity of a predicted pose: the ligand and pocket of an evaluation fold,
rebuilt as molecules from the structure's features and judged by the data schema's checks.

The schema's checks (of3/data/plausibility.py, what `foldfed data validate` runs on the
deposited complexes) take RDKit molecules. A prediction is coordinates in the features'
atom order, so the molecules are rebuilt from the features themselves:

- atom names and elements from `ref_atom_name_chars` (4 characters, each one-hot over
  ASCII 32..95) and `ref_element` (one-hot, index = atomic number - 1);
- the ligand: the crop's largest ligand (by `ref_space_uid`, one id per molecule), its
  heavy atoms at their predicted positions, bonds and bond orders from the CCD entry of
  the component the sample names (biotite's bundled CCD, by atom name), formal charges
  from the CCD;
- the pocket: the predicted protein heavy atoms within 10 Å of the predicted ligand.

The pose is judged in memory: the checks read molecules, so no file needs to be written.
A structure is *assessed* only when its ligand rebuilds and sanitizes (a ligand cut by the
crop, or one RDKit refuses, says nothing about the model); its pose is *valid* when every
PoseBusters check passes. Verdicts never leave the site: `PoseTally` keeps counts only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

POCKET_RADIUS = 10.0  # Å, as of3/data/structure_file.py's pocket of a deposited ligand
_HYDROGEN = 1  # atomic number


@dataclass(frozen=True)
class PoseVerdict:
    """One structure's verdict (stays local). `checks`: schema check id -> passed."""

    assessed: bool
    reason: str = ""  # why not assessed, or which checks failed
    checks: Mapping[str, bool] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.assessed and all(self.checks.values())


@dataclass
class PoseTally:
    """Counts over a held-out set; `summary` is all that may leave the site."""

    assessed: int = 0
    not_assessed: int = 0
    valid: int = 0
    passed: dict[str, int] = field(default_factory=dict)

    def add(self, verdict: PoseVerdict) -> None:
        if not verdict.assessed:
            self.not_assessed += 1
            return
        self.assessed += 1
        self.valid += verdict.valid
        for check, ok in verdict.checks.items():
            self.passed[check] = self.passed.get(check, 0) + int(ok)

    def summary(self) -> dict[str, float]:
        """pb_valid_rate (over assessed poses), each check's pass rate, and the counts."""
        out = {
            "pb_assessed_count": float(self.assessed),
            "pb_not_assessed_count": float(self.not_assessed),
        }
        if self.assessed:
            out["pb_valid_rate"] = self.valid / self.assessed
            for check, n in sorted(self.passed.items()):
                out[f"{check}_rate"] = n / self.assessed
        return out


def judge_pose(features: Mapping[str, Any], predicted: torch.Tensor, component: str) -> PoseVerdict:
    """PoseBusters' verdict on the predicted pose of structure 0 of `features` (the batch as
    loaded, before the model edited it); `predicted`: (N_atoms, 3) for the same atoms."""
    from foldfed.of3.data.plausibility import (
        ChemistryError,
        pocket_molecule,
        posebusters_verdicts,
        sanitized_ligand,
    )

    try:
        ligand, pocket = _pose_atoms(features, predicted, component)
    except _NotAssessable as exc:
        return PoseVerdict(False, str(exc))
    try:
        mol = sanitized_ligand(ligand)
    except ChemistryError as exc:
        return PoseVerdict(False, f"ligand does not sanitize: {exc}")
    try:
        verdicts = posebusters_verdicts(mol, pocket_molecule(pocket))
    except Exception as exc:  # PoseBusters may raise anything: not judged, not valid
        return PoseVerdict(False, f"PoseBusters could not run: {type(exc).__name__}: {exc}")
    failed = [f"{c} ({d})" if d else c for c, (ok, d) in verdicts.items() if not ok]
    return PoseVerdict(True, "; ".join(failed), {c: ok for c, (ok, _) in verdicts.items()})


class _NotAssessable(ValueError):
    pass


def _pose_atoms(features: Mapping[str, Any], predicted: torch.Tensor, component: str) -> Any:
    import numpy as np
    from openfold3.core.utils.atomize_utils import broadcast_token_feat_to_atoms

    def per_atom(name: str) -> Any:
        values = broadcast_token_feat_to_atoms(
            features["token_mask"], features["num_atoms_per_token"], features[name]
        )
        return values[0].bool().cpu().numpy()

    present = features["atom_mask"][0].bool().cpu().numpy()
    elements = features["ref_element"][0].argmax(-1).cpu().numpy() + 1
    heavy = present & (elements != _HYDROGEN)
    coords = predicted.detach().double().cpu().numpy()
    if coords.shape != (len(present), 3):
        raise _NotAssessable(f"prediction has shape {coords.shape}, features {len(present)} atoms")
    uid = features["ref_space_uid"][0].cpu().numpy()
    on_ligand = heavy & per_atom("is_ligand")
    if not on_ligand.any():
        raise _NotAssessable("no ligand atom in the crop")
    ids, counts = np.unique(uid[on_ligand], return_counts=True)
    ligand_index = np.flatnonzero(on_ligand & (uid == ids[counts.argmax()]))
    names = _atom_names(features)
    ligand = _ligand_array(component, names, elements, coords, ligand_index)
    protein_index = np.flatnonzero(heavy & per_atom("is_protein"))
    near = np.sqrt(
        ((coords[protein_index, None, :] - coords[None, ligand_index, :]) ** 2).sum(-1)
    ).min(axis=1)
    pocket_index = protein_index[near <= POCKET_RADIUS]
    return ligand, _array("UNK", names, elements, coords, pocket_index, hetero=False)


def _atom_names(features: Mapping[str, Any]) -> list[str]:
    chars = features["ref_atom_name_chars"][0].argmax(-1).cpu().tolist()
    return ["".join(chr(c + 32) for c in row).strip() for row in chars]


def _ligand_array(component: str, names: list[str], elements: Any, coords: Any, index: Any) -> Any:
    """The ligand with its CCD bonds; _NotAssessable when it is not the whole component."""
    import biotite.structure as struc
    import biotite.structure.info as info

    from foldfed.of3.data.structure_file import ccd_charges, ccd_heavy_atoms

    expected = set(ccd_heavy_atoms(component))
    found = [names[i] for i in index]
    missing = sorted(expected - set(found))
    if not expected or missing:
        raise _NotAssessable(
            f"the crop's ligand is not a whole {component!r} (missing {missing[:3]}, "
            f"{len(missing)} of {len(expected)} heavy atoms)"
        )
    atoms = _array(component, names, elements, coords, index, hetero=True)
    position = {name: i for i, name in enumerate(found)}
    bonds = [
        (position[a], position[b], int(kind))
        for (a, b), kind in info.bonds_in_residue(component).items()
        if a in position and b in position
    ]
    atoms.bonds = struc.BondList(len(found), _bond_rows(bonds))
    charges = ccd_charges(component)
    for i, name in enumerate(found):
        atoms.charge[i] = charges.get(name, 0)
    return atoms


def _bond_rows(bonds: list[tuple[int, int, int]]) -> Any:
    import numpy as np

    return np.array(bonds, dtype=np.int64).reshape(-1, 3)


def _array(
    res_name: str, names: list[str], elements: Any, coords: Any, index: Any, *, hetero: bool
) -> Any:
    import biotite.structure as struc
    import numpy as np
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    atoms = struc.AtomArray(len(index))
    atoms.coord = coords[index].astype(np.float32)
    atoms.atom_name = np.array([names[i] for i in index])
    atoms.element = np.array([table.GetElementSymbol(int(elements[i])).upper() for i in index])
    atoms.res_name[:] = res_name
    atoms.chain_id[:] = "L" if hetero else "P"
    atoms.res_id[:] = 1
    atoms.hetero[:] = hetero
    atoms.add_annotation("charge", dtype=int)
    atoms.bonds = struc.BondList(len(index))
    return atoms

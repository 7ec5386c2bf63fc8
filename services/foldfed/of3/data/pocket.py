"""The pocket crop: which ligand an example is built around, and which tokens it keeps.

The *primary ligand* (`select_primary_ligand`): among the qualifying ligands (not solvent,
buffer or crystallization aid; enough resolved heavy atoms), the largest that fits in half
the token budget, so the crop keeps protein context; if none fits, the smallest.

The crop (`pocket_crop`): every token is ranked by its distance to the nearest atom of the
ligand (ties: distance to the ligand's centroid, then index), and the `token_budget`
nearest are kept: the whole ligand (when it fits) and the closest residues, the binding
pocket. It is OpenFold3's spatial crop (AF3 SI 2.7.2) with the ligand as the reference
instead of one random atom, so it is deterministic. `set_pocket_crop_mask` applies it to a
tokenized atom array where OpenFold3 applies its own; assemblies within the budget are
kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from foldfed.of3.data.example import FeaturizationError, LigandInfo

if TYPE_CHECKING:
    import numpy as np

# Components that never make a chain the primary ligand: AlphaFold3's ligand exclusion
# list (SI Table 10) and crystallization aids, as OpenFold3 ships them, plus
# trifluoroacetate (a purification counter-ion).
EXTRA_SOLVENTS = frozenset({"TFA"})


def excluded_components() -> frozenset[str]:
    """Component ids that are solvent, buffer or crystallization aid (never a ligand)."""
    from openfold3.core.data.resources.lists import CRYSTALLIZATION_AIDS, LIGAND_EXCLUSION_LIST

    return frozenset(LIGAND_EXCLUSION_LIST) | frozenset(CRYSTALLIZATION_AIDS) | EXTRA_SOLVENTS


def select_primary_ligand(ligands: Sequence[LigandInfo], token_budget: int) -> LigandInfo:
    """The ligand the crop is built around.

    Among the qualifying ligands (`LigandInfo.qualifies`): the largest (resolved heavy
    atoms) that fits in half the token budget, so the crop keeps protein context; if none
    fits, the smallest. Ties go to the first chain in the structure's order.
    """
    qualifying = [x for x in ligands if x.qualifies]
    if not qualifying:
        raise FeaturizationError("no qualifying ligand")
    fitting = [x for x in qualifying if x.heavy_atoms <= token_budget // 2]
    if fitting:
        best = max(x.heavy_atoms for x in fitting)
        return next(x for x in fitting if x.heavy_atoms == best)
    least = min(x.heavy_atoms for x in qualifying)
    return next(x for x in qualifying if x.heavy_atoms == least)


def pocket_crop(
    token_centers: np.ndarray, ligand_atoms: np.ndarray, token_budget: int
) -> np.ndarray:
    """Indices of the `token_budget` token centres nearest the ligand (pure).

    `token_centers` (N, 3): one resolved atom per token; `ligand_atoms` (M, 3): the
    ligand's resolved atoms. Rank: distance to the nearest ligand atom, then distance to
    the ligand's centroid (so a ligand larger than the budget keeps its middle), then
    index. Returned in ascending index order.
    """
    import numpy as np

    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if len(ligand_atoms) == 0:
        raise ValueError("the ligand has no resolved atoms")
    diff = token_centers[:, None, :] - ligand_atoms[None, :, :]
    nearest = np.sqrt((diff**2).sum(-1)).min(axis=1)
    centroid = np.sqrt(((token_centers - ligand_atoms.mean(axis=0)) ** 2).sum(-1))
    order = np.lexsort((np.arange(len(token_centers)), centroid, nearest))
    return np.sort(order[:token_budget])


def set_pocket_crop_mask(atom_array: Any, ligand_chain: str, token_budget: int) -> str:
    """Set OpenFold3's `crop_mask` annotation to the pocket crop around `ligand_chain`
    (all tokens when the assembly fits in the budget). Returns OpenFold3's name of the
    crop strategy: "whole" or "spatial"."""
    import numpy as np

    if len(np.unique(atom_array.token_id)) <= token_budget:
        atom_array.set_annotation("crop_mask", np.ones(len(atom_array), dtype=bool))
        return "whole"
    resolved = np.isfinite(atom_array.coord).all(axis=1) & (atom_array.occupancy > 0)
    centers = atom_array.token_center_atom & resolved
    ligand = (atom_array.chain_id == ligand_chain) & resolved & (atom_array.element != "H")
    chosen = pocket_crop(atom_array.coord[centers], atom_array.coord[ligand], token_budget)
    keep = atom_array.token_id[centers][chosen]
    atom_array.set_annotation("crop_mask", np.isin(atom_array.token_id, keep))
    return "spatial"

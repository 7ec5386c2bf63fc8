"""Structure preprocessing: one mmCIF → OpenFold3's cleaned structure and its ligand census.

`preprocess_structure` runs `preprocess_structure_and_write_outputs_of3` on the entry:
parse the first bioassembly, clean it up (AF3 SI 2.5.4: waters, hydrogens,
crystallization aids, clashing chains, ...), write the cleaned structure (npz), the
canonical sequences (FASTA) and one reference molecule (SDF with a fallback conformer) per
component. The CCD is `OfflineCcd`. It then reads the cleaned structure back and lists
every ligand chain with its resolved heavy atoms and whether it passes the ligand rule
(`LigandInfo.qualifies`), which the pocket crop chooses from.

Everything is written under a work folder the caller owns (and deletes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.of3.data.example import FeatureSettings, FeaturizationError, LigandInfo
from foldfed.of3.data.pipeline_context import quiet_openfold3, seeded
from foldfed.of3.data.pocket import excluded_components

if TYPE_CHECKING:
    from foldfed.of3.data.ccd import OfflineCcd


@dataclass(frozen=True)
class CleanedStructure:
    """OpenFold3's preprocessing output for one entry, as the featurizers read it."""

    pdb_id: str
    entry: dict[str, Any]  # OpenFold3's metadata of the entry: status, chains, resolution, ...
    reference_metadata: dict[str, Any]  # per reference molecule: conformer strategy, SMILES
    structures: Path  # <structures>/<pdb_id>/<pdb_id>.npz, the layout OpenFold3's reader wants
    reference_dir: Path  # one SDF per reference molecule
    atom_array: Any  # the cleaned structure (biotite AtomArray)
    ligands: tuple[LigandInfo, ...]  # every ligand chain, in the structure's order
    protein_sequences: tuple[str, ...]  # canonical one-letter sequences, sorted, unique


def preprocess_structure(
    cif: Path, ccd: OfflineCcd, settings: FeatureSettings, work: Path
) -> CleanedStructure:
    """Clean one entry with OpenFold3's preprocessing and take its ligand census.

    Raises FeaturizationError when OpenFold3 does not report success."""
    from openfold3.core.data.io.structure.atom_array import read_atomarray_from_npz
    from openfold3.core.data.io.utils import encode_numpy_types
    from openfold3.core.data.pipelines.preprocessing.structure import (
        preprocess_structure_and_write_outputs_of3,
    )

    ref_dir = work / "reference_molecules"
    ref_dir.mkdir()
    with seeded(settings.seed), quiet_openfold3():
        metadata, ref_metadata = preprocess_structure_and_write_outputs_of3(
            input_cif=cif,
            ccd=ccd,
            out_dir=work / "structure",
            reference_mol_out_dir=ref_dir,
            output_formats=["npz"],
            random_seed=settings.seed,
        )
    # Through JSON: numpy scalars become plain numbers, as in OpenFold3's dataset cache.
    metadata = json.loads(json.dumps(metadata, default=encode_numpy_types))
    ref_metadata = json.loads(json.dumps(ref_metadata, default=encode_numpy_types))
    (pdb_id, entry), *_ = metadata.items()
    if entry.get("status") != "success":
        raise FeaturizationError(f"OpenFold3 preprocessing: {entry.get('status')}")

    # OpenFold3's structure reader wants <dir>/<pdb_id>/<pdb_id>.npz
    structures = work / "structures"
    (structures / pdb_id).mkdir(parents=True)
    (work / "structure" / f"{pdb_id}.npz").rename(structures / pdb_id / f"{pdb_id}.npz")
    atom_array = read_atomarray_from_npz(structures / pdb_id / f"{pdb_id}.npz")
    return CleanedStructure(
        pdb_id=pdb_id,
        entry=entry,
        reference_metadata=ref_metadata,
        structures=structures,
        reference_dir=ref_dir,
        atom_array=atom_array,
        ligands=_ligand_census(entry["chains"], atom_array, settings.min_ligand_heavy_atoms),
        protein_sequences=_protein_sequences(
            work / "structure" / f"{pdb_id}.fasta", entry["chains"]
        ),
    )


def _ligand_census(
    chains: Mapping[str, Any], atom_array: Any, min_heavy_atoms: int
) -> tuple[LigandInfo, ...]:
    """Every ligand chain with its resolved heavy atoms and whether it qualifies."""
    import numpy as np

    excluded = excluded_components()
    ligands = []
    for chain_id, chain in chains.items():
        if chain["molecule_type"] != "LIGAND":
            continue
        in_chain = atom_array.chain_id == chain_id
        heavy = int(
            np.sum(
                (atom_array.element[in_chain] != "H")
                & np.isfinite(atom_array.coord[in_chain]).all(axis=1)
            )
        )
        residues = tuple(sorted(set(atom_array.res_name[in_chain].tolist())))
        ligands.append(
            LigandInfo(
                chain_id=chain_id,
                component=str(chain.get("reference_mol_id") or residues[0]),
                residues=residues,
                heavy_atoms=heavy,
                qualifies=heavy >= min_heavy_atoms and not set(residues) <= excluded,
            )
        )
    return tuple(ligands)


def _protein_sequences(fasta: Path, chains: Mapping[str, Any]) -> tuple[str, ...]:
    sequences: dict[str, str] = {}
    name = None
    for line in fasta.read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].strip()
            sequences[name] = ""
        elif name is not None:
            sequences[name] += line.strip()
    return tuple(
        sorted(
            {
                seq
                for chain_id, seq in sequences.items()
                if chains.get(chain_id, {}).get("molecule_type") == "PROTEIN" and seq
            }
        )
    )

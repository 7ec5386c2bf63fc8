"""Feature assembly: one protein-ligand complex (mmCIF) → one OpenFold3 training example.

The pipeline is OpenFold3's own, step for step as its training dataset
(`BaseOF3Dataset.create_all_features`) runs it, with local inputs instead of a dataset
cache:

1. `preprocess.preprocess_structure`: OpenFold3's cleanup of the first bioassembly, its
   reference molecules, and the census of ligand chains.
2. Pick the *primary ligand* and crop around it (`pocket`), applied where
   `process_target_structure_of3` applies its own crop (component ids, tokens, crop mask,
   symmetry labels, unique atom names). The crop is deterministic; the other random
   choices (RDKit conformer seeds, the random rotation of reference conformers) come from
   `seed` (`pipeline_context.seeded`).
3. `get_reference_conformer_data_of3`, `separate_cropped_and_gt`, `add_token_positions`,
   `featurize_target_gt_structure_of3` (features and ground truth, with the symmetry
   permutation data the loss needs), `featurize_reference_conformers_of3`.
4. MSA features in single-sequence mode (no MSA databases offline: the query row only)
   and empty template features, through OpenFold3's own featurizers; loss weights by
   `set_loss_weights` (confidence losses off for entries without a resolution, e.g. NMR).

The result is a `Featurized` (`example`); `features` stores it, `cache` keeps one file
per cache key.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.of3.data.cachekey import cache_key, versions
from foldfed.of3.data.example import (
    FeatureInfo,
    FeatureSettings,
    FeaturizationError,
    Featurized,
    NoLigandError,
)
from foldfed.of3.data.pipeline_context import quiet_openfold3, seeded
from foldfed.of3.data.pocket import select_primary_ligand, set_pocket_crop_mask
from foldfed.of3.data.preprocess import CleanedStructure, preprocess_structure

if TYPE_CHECKING:
    from foldfed.of3.data.ccd import OfflineCcd


def build_features(
    cif: Path,
    ccd: OfflineCcd,
    *,
    token_budget: int = 64,
    seed: int = 0,
    min_ligand_heavy_atoms: int = 6,
) -> Featurized:
    """Featurize one mmCIF (plain text, not gzip). Raises FeaturizationError with the
    reason when the entry cannot be used (no qualifying ligand, OpenFold3 rejects it)."""
    settings = FeatureSettings(token_budget, seed, min_ligand_heavy_atoms)
    try:
        cif_bytes = Path(cif).read_bytes()
    except OSError as exc:
        raise FeaturizationError(f"cannot read {cif}: {exc}") from exc
    key = cache_key(cif_bytes, settings)
    with tempfile.TemporaryDirectory(prefix="foldfed-of3-") as tmp:
        try:
            return _build(Path(cif), ccd, settings, key, Path(tmp))
        except FeaturizationError:
            raise
        except Exception as exc:  # OpenFold3/biotite/RDKit raise anything; keep the reason
            reason = _short(str(exc))
            raise FeaturizationError(f"{type(exc).__name__}: {reason}") from exc


def _build(
    cif: Path, ccd: OfflineCcd, settings: FeatureSettings, key: str, work: Path
) -> Featurized:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    structure = preprocess_structure(cif, ccd, settings, work)
    timings["preprocess"] = time.perf_counter() - t0
    ligands = structure.ligands
    try:
        primary = select_primary_ligand(ligands, settings.token_budget)
    except FeaturizationError:
        found = ", ".join(f"{x.component}({x.heavy_atoms})" for x in ligands) or "none"
        raise NoLigandError(
            f"no non-solvent ligand with >= {settings.min_ligand_heavy_atoms} heavy atoms "
            f"(ligands: {found})"
        ) from None

    t1 = time.perf_counter()
    with seeded(settings.seed), quiet_openfold3():
        features, crop_strategy, n_tokens_padded, atom_array_cropped = _featurize(
            structure, primary.chain_id, settings
        )
    timings["featurize"] = time.perf_counter() - t1

    entry = structure.entry
    in_crop = atom_array_cropped.chain_id == primary.chain_id
    n_tokens = int(features["token_mask"].sum().item())
    info = FeatureInfo(
        entry_id=structure.pdb_id.lower(),
        key=key,
        settings=asdict(settings),
        versions=versions(),
        n_tokens=n_tokens,
        padded_tokens=int(n_tokens_padded),
        n_atoms=int(features["atom_mask"].sum().item()),
        full_tokens=int(entry["token_count"]),
        crop_strategy=str(crop_strategy),
        primary_ligand=primary,
        ligand_tokens_in_crop=len(set(atom_array_cropped.token_id[in_crop].tolist())),
        ligands=tuple(ligands),
        protein_sequences=structure.protein_sequences,
        resolution=None if entry.get("resolution") is None else float(entry["resolution"]),
        experimental_method=str(entry.get("experimental_method") or ""),
        release_date=str(entry.get("release_date") or ""),
    )
    if info.ligand_tokens_in_crop == 0:
        raise FeaturizationError(f"the crop around ligand {primary.component} lost the ligand")
    return Featurized(features=features, info=info, timings_s=timings)


def _featurize(
    structure: CleanedStructure, ligand_chain: str, settings: FeatureSettings
) -> tuple[dict[str, Any], str, int, Any]:
    """OpenFold3's featurizers over the pocket crop: (features, crop strategy, padded
    tokens, the cropped atom array)."""
    from openfold3.core.config.msa_pipeline_configs import MsaSampleProcessorInputTrain
    from openfold3.core.data.io.structure.cif import parse_target_structure
    from openfold3.core.data.pipelines.featurization.conformer import (
        featurize_reference_conformers_of3,
    )
    from openfold3.core.data.pipelines.featurization.loss_weights import set_loss_weights
    from openfold3.core.data.pipelines.featurization.msa import (
        MsaFeaturizerOF3,
        MsaFeaturizerOF3Config,
    )
    from openfold3.core.data.pipelines.featurization.structure import (
        featurize_target_gt_structure_of3,
    )
    from openfold3.core.data.pipelines.featurization.template import (
        featurize_template_structures_of3,
    )
    from openfold3.core.data.pipelines.sample_processing.conformer import (
        get_reference_conformer_data_of3,
    )
    from openfold3.core.data.pipelines.sample_processing.msa import MsaSampleProcessorTrain
    from openfold3.core.data.pipelines.sample_processing.template import (
        process_template_structures_of3,
    )
    from openfold3.core.data.primitives.caches.format import (
        DatasetReferenceMoleculeData,
        PDBChainData,
    )
    from openfold3.core.data.primitives.permutation.mol_labels import (
        assign_mol_permutation_ids,
        separate_cropped_and_gt,
    )
    from openfold3.core.data.primitives.structure.component import (
        assign_component_ids_from_metadata,
    )
    from openfold3.core.data.primitives.structure.labels import assign_uniquified_atom_names
    from openfold3.core.data.primitives.structure.tokenization import (
        add_token_positions,
        tokenize_atom_array,
    )
    from openfold3.projects.of3_all_atom.config.dataset_config_components import (
        LossConfig,
        MSASettings,
        TemplateSettings,
    )

    chains = {
        chain_id: PDBChainData(
            label_asym_id=c["label_asym_id"],
            auth_asym_id=c["auth_asym_id"],
            entity_id=c["entity_id"],
            molecule_type=c["molecule_type"],
            reference_mol_id=c.get("reference_mol_id"),
            alignment_representative_id=None,
            template_ids=[],
        )
        for chain_id, c in structure.entry["chains"].items()
    }
    references = {
        mol_id: DatasetReferenceMoleculeData(
            conformer_gen_strategy=m["conformer_gen_strategy"],
            fallback_conformer_pdb_id=m["fallback_conformer_pdb_id"],
            canonical_smiles=m["canonical_smiles"],
            set_fallback_to_nan=False,
            fallback_conformer_source=m.get("fallback_conformer_source"),
        )
        for mol_id, m in structure.reference_metadata.items()
    }

    # process_target_structure_of3, with the pocket crop in place of its sampled one
    atom_array_gt = parse_target_structure(structure.structures, structure.pdb_id, "npz")
    assign_component_ids_from_metadata(atom_array_gt, chains)
    tokenize_atom_array(atom_array=atom_array_gt)
    crop_strategy = set_pocket_crop_mask(atom_array_gt, ligand_chain, settings.token_budget)
    n_tokens = settings.token_budget
    atom_array_gt = assign_mol_permutation_ids(atom_array_gt, retokenize=True)
    atom_array_gt = assign_uniquified_atom_names(atom_array_gt)

    reference_molecules = get_reference_conformer_data_of3(
        atom_array=atom_array_gt,
        per_chain_metadata=chains,
        reference_mol_metadata=references,
        reference_mol_dir=structure.reference_dir,
    )
    atom_array_cropped, atom_array_gt = separate_cropped_and_gt(
        atom_array_gt=atom_array_gt,
        crop_strategy=crop_strategy,
        processed_ref_mol_list=reference_molecules,
    )
    add_token_positions(atom_array_cropped)
    features: dict[str, Any] = {}
    features.update(
        featurize_target_gt_structure_of3(
            atom_array=atom_array_cropped, atom_array_gt=atom_array_gt, n_tokens=n_tokens
        )
    )
    features.update(featurize_reference_conformers_of3(processed_ref_mol_list=reference_molecules))

    # Single-sequence mode: no chain type asks for an MSA, so OpenFold3's featurizer emits
    # the query row only.
    msa_settings = MSASettings(moltypes=[])
    msa_input = MsaSampleProcessorInputTrain.create_from_dataset_cache_entry(
        dataset_cache_entry=_Chains(chains), atom_array=atom_array_cropped
    )
    msa_collection = MsaSampleProcessorTrain(config=msa_settings)(input=msa_input)
    features.update(
        MsaFeaturizerOF3(
            config=MsaFeaturizerOF3Config(
                max_rows=msa_settings.max_rows,
                max_rows_paired=msa_settings.max_rows_paired,
                subsample_with_bands=msa_settings.subsample_with_bands,
            )
        )(atom_array=atom_array_cropped, msa_array_collection=msa_collection, n_tokens=n_tokens)
    )

    templates = TemplateSettings()
    template_slices = process_template_structures_of3(
        atom_array=atom_array_cropped,
        n_templates=templates.n_templates,
        take_top_k=templates.take_top_k,
        min_n_tokens_per_chain=templates.min_n_tokens_per_chain,
        template_cache_directory=None,
        assembly_data={
            c: {"alignment_representative_id": None, "template_ids": []} for c in chains
        },
        template_structures_directory=None,
        template_structure_array_directory=None,
        template_file_format="npz",
        ccd=None,
    )
    features.update(
        featurize_template_structures_of3(
            atom_array=atom_array_cropped,
            template_slice_collection=template_slices,
            n_templates=templates.n_templates,
            n_tokens=n_tokens,
            min_bin=templates.distogram.min_bin,
            max_bin=templates.distogram.max_bin,
            n_bins=templates.distogram.n_bins,
        )
    )
    features["loss_weights"] = set_loss_weights(
        LossConfig().model_dump(), structure.entry.get("resolution")
    )
    return features, crop_strategy, n_tokens, atom_array_cropped


@dataclass
class _Chains:
    """The one attribute OpenFold3's MSA input builder reads from a dataset-cache entry."""

    chains: dict[str, Any]


def _short(message: str, limit: int = 200) -> str:
    """The first line of an exception message, cut to `limit` characters."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 4] + " ..."

"""One protein-ligand complex (mmCIF) → one OpenFold3 training example, cached on disk.

The pipeline is OpenFold3's own, step for step as its training dataset
(`BaseOF3Dataset.create_all_features`) runs it, with local inputs instead of a dataset
cache:

1. `preprocess_structure_and_write_outputs_of3`: parse the first bioassembly, clean it up
   (AF3 SI 2.5.4: waters, hydrogens, crystallization aids, clashing chains, ...), write
   the cleaned structure (npz), the canonical sequences (FASTA) and one reference
   molecule (SDF with a fallback conformer) per component. The CCD is `OfflineCcd`.
2. Pick the *primary ligand* (`select_primary_ligand`, the documented rule) and crop
   around it (`pocket_crop`): every token is ranked by its distance to the nearest atom of
   the ligand (ties: distance to the ligand's centroid), and the `token_budget` nearest
   are kept: the whole ligand (when it fits) and the closest residues, the binding pocket.
   The crop is deterministic; it is OpenFold3's spatial crop (AF3 SI 2.7.2) with the
   ligand as the reference instead of one random atom, applied where
   `process_target_structure_of3` applies its own (component ids, tokens, crop mask,
   symmetry labels, unique atom names). Assemblies within the budget are kept whole.
   The other random choices (RDKit conformer seeds, the random rotation of reference
   conformers) come from `seed`.
3. `get_reference_conformer_data_of3`, `separate_cropped_and_gt`, `add_token_positions`,
   `featurize_target_gt_structure_of3` (features and ground truth, with the symmetry
   permutation data the loss needs), `featurize_reference_conformers_of3`.
4. MSA features in single-sequence mode (no MSA databases offline: the query row only)
   and empty template features, through OpenFold3's own featurizers; loss weights by
   `set_loss_weights` (confidence losses off for entries without a resolution, e.g. NMR).

The example is stored unbatched in one safetensors file (`write_feature_file`): every
tensor under its path in the nested feature dict (`ground_truth/atom_positions`), and
everything else — the format version, the nesting, the all-zero tensors (declared by
shape and dtype instead of stored: the empty template features), the entry's
description — as JSON in the safetensors header metadata. `load_batch` reads it back
and collates it with `openfold_batch_collator` into a batch of one. No pickle anywhere.

The file's name is `cache_key(...)`: blake3 of the mmCIF bytes, the settings, and the
versions of openfold3, biotite (the CCD), rdkit and this format, so a changed input or
setting never reuses stale features.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.errors import CodecError, ConfigError, FoldfedError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from foldfed.of3.data.ccd import OfflineCcd

FORMAT = "foldfed.of3.features/1"
METADATA_KEY = "foldfed"
SUFFIX = ".safetensors"

# Nested feature dicts and the type of their keys ("str", or "int" for the ligand
# permutation table, keyed by reference-space uid).
_NESTED_KEY_TYPES = {"ground_truth": "str", "loss_weights": "str", "ref_space_uid_to_perm": "int"}

# Tensors of at least this many elements that are all zero (e.g. the template features
# when there are no templates) are declared in the header instead of stored.
_MIN_ZEROS_NUMEL = 1024
_MAX_ZEROS_NUMEL = 1 << 31
_ZERO_DTYPES = frozenset(
    {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8"}
    | {"bool"}
)

# Components that never make a chain the primary ligand: AlphaFold3's ligand exclusion
# list (SI Table 10) and crystallization aids, as OpenFold3 ships them, plus
# trifluoroacetate (a purification counter-ion).
EXTRA_SOLVENTS = frozenset({"TFA"})


class FeaturizationError(FoldfedError):
    """An entry cannot be turned into a training example; the message says why."""


class NoLigandError(FeaturizationError):
    """The entry holds no qualifying ligand (the selection rule, not a fault)."""


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that changes the features (all of it goes into the cache key)."""

    token_budget: int = 64
    seed: int = 0
    min_ligand_heavy_atoms: int = 6

    def __post_init__(self) -> None:
        if not 16 <= self.token_budget <= 4096:
            raise ConfigError(f"token_budget must be in [16, 4096], got {self.token_budget}")
        if self.min_ligand_heavy_atoms < 1:
            raise ConfigError(
                f"min_ligand_heavy_atoms must be >= 1, got {self.min_ligand_heavy_atoms}"
            )


@dataclass(frozen=True)
class LigandInfo:
    """One ligand chain of the cleaned structure."""

    chain_id: str
    component: str  # CCD code, or "<pdb>_<entity>" for a multi-residue ligand
    residues: tuple[str, ...]
    heavy_atoms: int  # resolved heavy atoms
    qualifies: bool  # passes the ligand rule (not solvent, enough heavy atoms)


@dataclass(frozen=True)
class FeatureInfo:
    """What a feature file holds, besides tensors (stored as JSON in its header)."""

    entry_id: str
    key: str
    settings: dict[str, int]
    versions: dict[str, str]
    n_tokens: int  # real tokens in the crop
    padded_tokens: int  # token dimension of the tensors (= token budget)
    n_atoms: int
    full_tokens: int  # tokens of the whole cleaned assembly before cropping
    crop_strategy: str
    primary_ligand: LigandInfo
    ligand_tokens_in_crop: int
    ligands: tuple[LigandInfo, ...]
    protein_sequences: tuple[str, ...]  # canonical one-letter sequences, sorted, unique
    resolution: float | None
    experimental_method: str
    release_date: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureInfo:
        try:
            values = dict(data)
            values["primary_ligand"] = _ligand_from_json(values["primary_ligand"])
            values["ligands"] = tuple(_ligand_from_json(x) for x in values["ligands"])
            values["protein_sequences"] = tuple(values["protein_sequences"])
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise CodecError(f"feature info is malformed: {exc}") from exc


def _ligand_from_json(data: Mapping[str, Any]) -> LigandInfo:
    values = dict(data)
    values["residues"] = tuple(values["residues"])
    return LigandInfo(**values)


@dataclass
class Featurized:
    """A built example: OpenFold3's unbatched feature dict and its description."""

    features: dict[str, Any]
    info: FeatureInfo
    timings_s: dict[str, float] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """The versions that change features: part of every cache key."""
    from importlib.metadata import version

    from foldfed.of3.data.ccd import ccd_version

    return {
        "format": FORMAT,
        "openfold3": version("openfold3"),
        "ccd": ccd_version(),
        "rdkit": version("rdkit"),
    }


def cache_key(cif_bytes: bytes, settings: FeatureSettings) -> str:
    """blake3 hex of (mmCIF bytes, settings, versions): the feature file's name."""
    import blake3

    header = json.dumps(
        {"settings": asdict(settings), "versions": versions()}, sort_keys=True
    ).encode()
    h = blake3.blake3(len(header).to_bytes(8, "big"))
    h.update(header)
    h.update(cif_bytes)
    return h.hexdigest()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global generators; restore them afterwards.

    OpenFold3's data pipeline draws from the global generators (RDKit conformer seeds:
    `random`; reference-conformer rotation: torch; numpy for good measure).
    """
    import numpy as np
    import torch

    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def excluded_components() -> frozenset[str]:
    """Component ids that are solvent, buffer or crystallization aid (never a ligand)."""
    from openfold3.core.data.resources.lists import CRYSTALLIZATION_AIDS, LIGAND_EXCLUSION_LIST

    return frozenset(LIGAND_EXCLUSION_LIST) | frozenset(CRYSTALLIZATION_AIDS) | EXTRA_SOLVENTS


def select_primary_ligand(ligands: list[LigandInfo], token_budget: int) -> LigandInfo:
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
    import time

    import numpy as np
    from openfold3.core.data.io.structure.atom_array import read_atomarray_from_npz
    from openfold3.core.data.io.utils import encode_numpy_types
    from openfold3.core.data.pipelines.preprocessing.structure import (
        preprocess_structure_and_write_outputs_of3,
    )

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref_dir = work / "reference_molecules"
    ref_dir.mkdir()
    with seeded(settings.seed), _quiet_openfold3():
        metadata, ref_metadata = preprocess_structure_and_write_outputs_of3(
            input_cif=cif,
            ccd=ccd,
            out_dir=work / "structure",
            reference_mol_out_dir=ref_dir,
            output_formats=["npz"],
            random_seed=settings.seed,
        )
    metadata = json.loads(json.dumps(metadata, default=encode_numpy_types))
    ref_metadata = json.loads(json.dumps(ref_metadata, default=encode_numpy_types))
    timings["preprocess"] = time.perf_counter() - t0
    (pdb_id, entry), *_ = metadata.items()
    if entry.get("status") != "success":
        raise FeaturizationError(f"OpenFold3 preprocessing: {entry.get('status')}")

    # OpenFold3's structure reader wants <dir>/<pdb_id>/<pdb_id>.npz
    structures = work / "structures"
    (structures / pdb_id).mkdir(parents=True)
    (work / "structure" / f"{pdb_id}.npz").rename(structures / pdb_id / f"{pdb_id}.npz")
    atom_array = read_atomarray_from_npz(structures / pdb_id / f"{pdb_id}.npz")

    excluded = excluded_components()
    ligands = []
    for chain_id, chain in entry["chains"].items():
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
                qualifies=heavy >= settings.min_ligand_heavy_atoms
                and not set(residues) <= excluded,
            )
        )
    try:
        primary = select_primary_ligand(ligands, settings.token_budget)
    except FeaturizationError:
        found = ", ".join(f"{x.component}({x.heavy_atoms})" for x in ligands) or "none"
        raise NoLigandError(
            f"no non-solvent ligand with >= {settings.min_ligand_heavy_atoms} heavy atoms "
            f"(ligands: {found})"
        ) from None

    sequences = _protein_sequences(work / "structure" / f"{pdb_id}.fasta", entry["chains"])
    t1 = time.perf_counter()
    with seeded(settings.seed), _quiet_openfold3():
        features, crop_strategy, n_tokens_padded, atom_array_cropped = _featurize(
            structures, ref_dir, pdb_id, entry, ref_metadata, primary.chain_id, settings
        )
    timings["featurize"] = time.perf_counter() - t1

    in_crop = atom_array_cropped.chain_id == primary.chain_id
    n_tokens = int(features["token_mask"].sum().item())
    info = FeatureInfo(
        entry_id=pdb_id.lower(),
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
        protein_sequences=sequences,
        resolution=None if entry.get("resolution") is None else float(entry["resolution"]),
        experimental_method=str(entry.get("experimental_method") or ""),
        release_date=str(entry.get("release_date") or ""),
    )
    if info.ligand_tokens_in_crop == 0:
        raise FeaturizationError(f"the crop around ligand {primary.component} lost the ligand")
    return Featurized(features=features, info=info, timings_s=timings)


def _featurize(
    structures: Path,
    ref_dir: Path,
    pdb_id: str,
    entry: dict[str, Any],
    ref_metadata: dict[str, Any],
    ligand_chain: str,
    settings: FeatureSettings,
) -> tuple[dict[str, Any], str, int, Any]:
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
        for chain_id, c in entry["chains"].items()
    }
    references = {
        mol_id: DatasetReferenceMoleculeData(
            conformer_gen_strategy=m["conformer_gen_strategy"],
            fallback_conformer_pdb_id=m["fallback_conformer_pdb_id"],
            canonical_smiles=m["canonical_smiles"],
            set_fallback_to_nan=False,
            fallback_conformer_source=m.get("fallback_conformer_source"),
        )
        for mol_id, m in ref_metadata.items()
    }

    # process_target_structure_of3, with the pocket crop in place of its sampled one
    atom_array_gt = parse_target_structure(structures, pdb_id, "npz")
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
        reference_mol_dir=ref_dir,
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
    features["loss_weights"] = set_loss_weights(LossConfig().model_dump(), entry.get("resolution"))
    return features, crop_strategy, n_tokens, atom_array_cropped


@dataclass
class _Chains:
    """The one attribute OpenFold3's MSA input builder reads from a dataset-cache entry."""

    chains: dict[str, Any]


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


@contextlib.contextmanager
def _quiet_openfold3() -> Iterator[None]:
    """OpenFold3 logs every structure at INFO and warns per atom; keep errors only."""
    import logging
    import warnings

    log = logging.getLogger("openfold3")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------------------------
# The feature file


def _flatten(features: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    nested: dict[str, str] = {}
    for name, value in features.items():
        if "/" in name:
            raise CodecError(f"feature name {name!r} contains '/'")
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
        elif isinstance(value, Mapping):
            key_type = _NESTED_KEY_TYPES.get(name)
            if key_type is None:
                raise CodecError(f"feature {name!r} is a dict foldfed does not know")
            nested[name] = key_type
            for sub, tensor in value.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CodecError(f"feature {name}/{sub} is {type(tensor).__name__}")
                tensors[f"{name}/{sub}"] = tensor.detach().contiguous().clone()
        else:
            raise CodecError(f"feature {name!r} is {type(value).__name__}, not a tensor")
    return tensors, nested


def encode_feature_file(featurized: Featurized) -> bytes:
    """The bytes of a feature file (safetensors; JSON description in its header)."""
    from safetensors.torch import save

    tensors, nested = _flatten(featurized.features)
    zeros = {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in tensors.items()
        if t.numel() >= _MIN_ZEROS_NUMEL and not bool(t.any())
    }
    stored = {name: t for name, t in tensors.items() if name not in zeros}
    header = {
        "format": FORMAT,
        "nested": nested,
        "zeros": zeros,
        "info": featurized.info.as_json(),
    }
    return save(stored, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def _zeros(path: Path, spec: Any) -> dict[str, torch.Tensor]:
    """The all-zero tensors a header declares (validated: names, dtypes, sizes)."""
    import torch

    if not isinstance(spec, dict):
        raise CodecError(f"{path}: 'zeros' is not an object")
    out = {}
    for name, value in spec.items():
        try:
            shape = [int(d) for d in value["shape"]]
            dtype = str(value["dtype"])
            if dtype not in _ZERO_DTYPES:
                raise ValueError(f"dtype {dtype!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"{path}: zero tensor {name!r}: bad spec {value!r}") from exc
        numel = 1
        for d in shape:
            if d < 0:
                raise CodecError(f"{path}: zero tensor {name!r}: negative dimension")
            numel *= d
        if numel > _MAX_ZEROS_NUMEL:
            raise CodecError(f"{path}: zero tensor {name!r}: {numel} elements is too many")
        out[str(name)] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return out


def write_feature_file(path: Path, featurized: Featurized) -> None:
    """Write atomically and durably (a reader never sees half a file)."""
    from foldfed.durable import atomic_write

    atomic_write(path, encode_feature_file(featurized))


def _read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CodecError(f"{path}: not a safetensors feature file ({exc})") from exc
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise CodecError(f"{path}: no {METADATA_KEY!r} metadata: not a foldfed feature file")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CodecError(f"{path}: feature metadata is not JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CodecError(f"{path}: feature format {found!r}, this reader knows {FORMAT!r}")
    return header


def read_feature_info(path: Path) -> FeatureInfo:
    """The description stored in a feature file's header (no tensors are read)."""
    return FeatureInfo.from_json(_read_header(Path(path))["info"])


def load_features(path: Path) -> dict[str, Any]:
    """One cached example as OpenFold3's unbatched feature dict (fresh tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    header = _read_header(path)
    nested: dict[str, str] = header.get("nested", {})
    if any(_NESTED_KEY_TYPES.get(k) != v for k, v in nested.items()):
        raise CodecError(f"{path}: unknown nesting {nested}")
    try:
        flat = load_file(str(path))
    except Exception as exc:
        raise CodecError(f"{path}: tensors unreadable ({exc})") from exc
    zeros = _zeros(path, header.get("zeros", {}))
    if set(zeros) & set(flat):
        raise CodecError(f"{path}: tensors {sorted(set(zeros) & set(flat))} stored twice")
    flat.update(zeros)
    features: dict[str, Any] = {name: {} for name in nested}
    for name, tensor in flat.items():
        top, sep, sub = name.partition("/")
        if not sep:
            features[name] = tensor
            continue
        if top not in nested:
            raise CodecError(f"{path}: tensor {name!r} is under an undeclared dict")
        if nested[top] == "int":
            try:
                features[top][int(sub)] = tensor
            except ValueError as exc:
                raise CodecError(f"{path}: tensor {name!r}: key is not an integer") from exc
        else:
            features[top][sub] = tensor
    if "ref_space_uid_to_perm" in features:
        features["ref_space_uid_to_perm"] = dict(sorted(features["ref_space_uid_to_perm"].items()))
    missing = [k for k in ("ground_truth", "loss_weights", "token_mask") if k not in features]
    if missing:
        raise CodecError(f"{path}: missing features {missing}")
    return features


def load_batch(path: Path) -> dict[str, Any]:
    """One cached example → a fresh collated batch of one, exactly what `OpenFold3.forward`
    and `OpenFold3Loss(...)(batch, outputs, _return_breakdown=True)` take in training mode,
    ground truth included. Every call returns new tensors (the model edits the batch in
    place)."""
    from openfold3.core.data.framework.data_module import openfold_batch_collator

    return openfold_batch_collator([load_features(path)])


# ---------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class CachedFeatures:
    path: Path
    info: FeatureInfo
    hit: bool  # True: read from the cache; False: built now
    timings_s: dict[str, float]


def featurize_cached(
    cif: Path, cache_dir: Path, ccd: OfflineCcd, settings: FeatureSettings
) -> CachedFeatures:
    """The feature file for `cif` under `settings` in `cache_dir`, built if missing.

    A file that exists but does not read back (a foreign or damaged file under the
    expected name) is rebuilt. Raises FeaturizationError when the entry cannot be used.
    An entry without a qualifying ligand is remembered as `<key>.skipped.json` (a pure
    function of the key's inputs, like the features), so a rerun does not preprocess it
    again; failures are not remembered (they may come from the machine, e.g. memory).
    """
    try:
        cif_bytes = Path(cif).read_bytes()
    except OSError as exc:
        raise FeaturizationError(f"cannot read {cif}: {exc}") from exc
    key = cache_key(cif_bytes, settings)
    path = Path(cache_dir) / f"{key}{SUFFIX}"
    if path.exists():
        try:
            info = read_feature_info(path)
        except CodecError:
            info = None
        if info is not None and info.key == key:
            return CachedFeatures(path=path, info=info, hit=True, timings_s={})
    skip_note = Path(cache_dir) / f"{key}.skipped.json"
    reason = _read_skip_note(skip_note, key)
    if reason is not None:
        raise NoLigandError(reason)
    try:
        featurized = build_features(
            Path(cif),
            ccd,
            token_budget=settings.token_budget,
            seed=settings.seed,
            min_ligand_heavy_atoms=settings.min_ligand_heavy_atoms,
        )
    except NoLigandError as exc:
        from foldfed.durable import atomic_write

        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        note = {"format": FORMAT, "key": key, "reason": str(exc)}
        atomic_write(skip_note, json.dumps(note, sort_keys=True).encode())
        raise
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    write_feature_file(path, featurized)
    return CachedFeatures(
        path=path, info=featurized.info, hit=False, timings_s=featurized.timings_s
    )


def _read_skip_note(path: Path, key: str) -> str | None:
    """The remembered reason an entry was skipped, or None (absent or unreadable)."""
    try:
        note = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(note, dict) or note.get("format") != FORMAT or note.get("key") != key:
        return None
    reason = note.get("reason")
    return reason if isinstance(reason, str) and reason else None


def _short(message: str, limit: int = 200) -> str:
    """The first line of an exception message, cut to `limit` characters."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 4] + " ..."

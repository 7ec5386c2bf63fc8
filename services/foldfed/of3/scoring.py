"""Scoring a model on a folder of complexes: what `foldfed eval` reports, locally.

A folder holds structure files in the pool's formats (docs/of3_data.md, section 10):
mmCIF (`.cif`, `.mmcif`) and PDB (`.pdb`, `.ent`), plain or gzip. Each becomes an
OpenFold3 example through the sample's own path: PDB through `pdb_format.pdb_to_mmcif`
(hetero residues the CCD does not describe are dropped), old mmCIF through
`with_release_history`, then the feature cache (`cache.featurize_cached`: OpenFold3's
preprocessing, the ligand rule, the crop around the primary ligand). A ligand given as its
own SDF or mol2 file is not read: OpenFold3's pipeline builds every ligand from its CCD
entry, so a molecule known only from an SDF/mol2 file has nothing to be built from; such
files are listed as skipped, with that reason, never silently ignored.

Each example is scored on its own with `training.evaluate` (fixed noise per structure):
OpenFold3's loss and its terms, LDDT, pocket-aligned ligand RMSD. The summary averages the
loss terms over every scored structure, LDDT and RMSD over those that have them, and counts
ligand RMSD <= 2 Å; every file not scored is listed with its reason.

The model: the trainable tensors the federation writes (θ_t, θ_0: `deltafile` format) are
loaded into the preset's seeded model; any other file is read as a full checkpoint
(`checkpoint.read_checkpoint`).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.errors import FoldfedError

if TYPE_CHECKING:
    from foldfed.of3.backend import Of3Model

STRUCTURE_SUFFIXES = {".cif": "cif", ".mmcif": "cif", ".pdb": "pdb", ".ent": "pdb"}
LIGAND_SUFFIXES = (".sdf", ".mol2")
LIGAND_SUCCESS = 2.0  # Å: a pose at or below this counts as found
TERMS = ("loss", "mse_loss", "distogram_loss", "bond_loss", "smooth_lddt_loss")
LIGAND_FILE_REASON = (
    "ligand file (SDF/mol2) not read: OpenFold3 builds ligands from the CCD, so a molecule "
    "known only from this file cannot be featurized"
)


@dataclass(frozen=True)
class FolderEntry:
    """One structure file of the folder, featurized."""

    name: str  # the file's name in the folder
    entry_id: str
    features: Path


@dataclass
class PreparedFolder:
    entries: list[FolderEntry] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # file, reason


def structure_kind(path: Path) -> tuple[str, bool] | None:
    """("cif" | "pdb", gzipped) for a structure file name, None for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    last = suffixes[-2] if gzipped and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    fmt = STRUCTURE_SUFFIXES.get(last)
    return (fmt, gzipped) if fmt else None


def prepare_folder(
    data: Path, cache_dir: Path, *, token_budget: int = 64, seed: int = 0
) -> PreparedFolder:
    """Featurize every structure file under `data` into `cache_dir` (reused across runs);
    files that cannot be scored are listed in `skipped` with their reason."""
    from foldfed.of3.data.cache import featurize_cached
    from foldfed.of3.data.ccd import OfflineCcd
    from foldfed.of3.data.example import FeatureSettings, FeaturizationError

    data = Path(data)
    if not data.is_dir():
        raise FoldfedError(f"--data {data}: not a folder")
    settings = FeatureSettings(token_budget=token_budget, seed=seed)
    ccd = OfflineCcd()
    out = PreparedFolder()
    cif_dir = Path(cache_dir) / "cif"
    cache_dir = Path(cache_dir).resolve()
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        name = str(path.relative_to(data))
        if path.resolve().is_relative_to(cache_dir) or name.startswith("."):
            continue  # our own cache, or a hidden file
        if path.suffix.lower() in LIGAND_SUFFIXES:
            out.skipped.append({"file": name, "reason": LIGAND_FILE_REASON})
            continue
        kind = structure_kind(path)
        if kind is None:
            out.skipped.append({"file": name, "reason": "not a structure file (by its name)"})
            continue
        try:
            entry_id, cif = _as_mmcif(path, *kind, cif_dir)
            cached = featurize_cached(cif, Path(cache_dir) / "features", ccd, settings)
        except (FoldfedError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc) if isinstance(exc, FeaturizationError) else f"unreadable: {exc}"
            out.skipped.append({"file": name, "reason": reason})
            continue
        out.entries.append(FolderEntry(name, entry_id, cached.path))
    return out


def _as_mmcif(path: Path, fmt: str, gzipped: bool, cif_dir: Path) -> tuple[str, Path]:
    """The file as the plain mmCIF the featurizer reads: (entry id, its path)."""
    from foldfed.durable import atomic_write
    from foldfed.of3.data.pdb_format import pdb_to_mmcif, with_release_history
    from foldfed.of3.data.pool import read_header

    raw = path.read_bytes()
    if gzipped:
        raw = gzip.decompress(raw)
    header = read_header(raw, fmt)
    stem = path.name.split(".")[0].lower()
    entry_id = header.pdb_id or stem
    if fmt == "cif":
        data = with_release_history(raw)
    else:
        data = pdb_to_mmcif(raw.decode("utf-8", errors="replace"), entry_id).cif
    cif_dir.mkdir(parents=True, exist_ok=True)
    # Named by file stem, not PDB id: two files of one entry (apo, holo) are both scored.
    target = cif_dir / f"{stem}.cif"
    if not target.exists() or target.read_bytes() != data:
        atomic_write(target, data)
    return entry_id, target


def load_model(built: Of3Model, path: Path) -> str:
    """Load a model file into `built`: the trainable tensors (θ files), else a full
    checkpoint. Returns which it was ("trainable" or "checkpoint")."""
    from foldfed.of3.checkpoint import load_into, read_checkpoint
    from foldfed.of3.training import load_trainable

    tensors = read_checkpoint(Path(path))
    if set(tensors) == set(built.trainable):
        load_trainable(built.model, built.trainable, tensors)
        return "trainable"
    load_into(built.model, tensors, str(path))
    return "checkpoint"


def score_entries(
    built: Of3Model,
    entries: Sequence[FolderEntry],
    load: Callable[[Path], Any],
    *,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """Per-structure metrics of the model as loaded ({name: {loss, ..., lddt,
    ligand_rmsd}}) and the structures the loss guard refused (file, reason)."""
    from foldfed.of3.training import LossGuardError, evaluate

    scored: dict[str, dict[str, float]] = {}
    refused: list[dict[str, str]] = []
    for entry in entries:
        try:
            found = evaluate(
                built.model,
                built.loss_fn,
                [entry.features],
                load,
                seed=seed,
                prefix="x",
                confidence_only=built.confidence_only,
            )
        except LossGuardError as exc:
            refused.append({"file": entry.name, "reason": str(exc)})
            continue
        scored[entry.name] = _per_structure(found)
    return scored, refused


def _per_structure(found: Mapping[str, float]) -> dict[str, float]:
    out = {t: found[f"x_{t}"] for t in TERMS if f"x_{t}" in found}
    for metric in ("lddt", "ligand_rmsd"):
        if f"x_{metric}_mean" in found:
            out[metric] = found[f"x_{metric}_mean"]
    return out


def summarize(
    scored: Mapping[str, Mapping[str, float]], skipped: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """The folder's summary (module docstring): means, the ligand success rate, counts."""
    rows = list(scored.values())
    out: dict[str, Any] = {}
    for key in (*TERMS, "lddt", "ligand_rmsd"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"{key}_mean" if key in ("lddt", "ligand_rmsd") else key] = math.fsum(values) / len(
                values
            )
    rmsd = [r["ligand_rmsd"] for r in rows if "ligand_rmsd" in r]
    out["ligand_rmsd_le_2a_rate"] = (
        sum(v <= LIGAND_SUCCESS for v in rmsd) / len(rmsd) if rmsd else math.nan
    )
    out["ligand_rmsd_count"] = len(rmsd)
    out["scored"] = len(rows)
    out["skipped"] = len(skipped)
    return out


def score_folder(
    built: Of3Model,
    folder: PreparedFolder,
    load: Callable[[Path], Any],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """{summary, per_structure, skipped}: the model as loaded, on a prepared folder."""
    scored, refused = score_entries(built, folder.entries, load, seed=seed)
    skipped = [*folder.skipped, *refused]
    return {"summary": summarize(scored, skipped), "per_structure": scored, "skipped": skipped}

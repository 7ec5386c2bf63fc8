"""What one OpenFold3 training example is: the settings that make it, the description stored
beside its tensors, the built example, and the errors of building one.

Plain frozen data and JSON conversion; no I/O, no torch, no OpenFold3. The pipeline that
builds an example is `featurize`, the file that stores it `features`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from foldfed.errors import CodecError, ConfigError, FoldfedError


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

"""The feature cache: a folder of feature files, each named by its cache key, built on a miss.

A file that exists but does not read back (a foreign or damaged file under the expected
name) is rebuilt. An entry without a qualifying ligand is remembered as
`<key>.skipped.json` (a pure function of the key's inputs, like the features), so a rerun
does not preprocess it again; failures are not remembered (they may come from the
machine, e.g. memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foldfed.durable import atomic_write
from foldfed.errors import CodecError
from foldfed.of3.data.cachekey import cache_key
from foldfed.of3.data.example import FeatureInfo, FeatureSettings, FeaturizationError, NoLigandError
from foldfed.of3.data.features import FORMAT, SUFFIX, read_feature_info, write_feature_file
from foldfed.of3.data.featurize import build_features

if TYPE_CHECKING:
    from foldfed.of3.data.ccd import OfflineCcd


@dataclass(frozen=True)
class CachedFeatures:
    """A feature file in the cache and what it holds."""

    path: Path
    info: FeatureInfo
    hit: bool  # True: read from the cache; False: built now
    timings_s: dict[str, float]


def featurize_cached(
    cif: Path, cache_dir: Path, ccd: OfflineCcd, settings: FeatureSettings
) -> CachedFeatures:
    """The feature file for `cif` under `settings` in `cache_dir`, built if missing (see
    the module docstring). Raises FeaturizationError when the entry cannot be used, and
    NoLigandError, remembered, when it holds no qualifying ligand."""
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

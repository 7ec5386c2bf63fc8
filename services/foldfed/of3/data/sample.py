"""The real sample: plinder's complexes featurized, partitioned among N companies.

`prepare_sample(out, companies=N)` fetches the plinder sdist (cached), writes each entry
as plain mmCIF under `out/cif/`, featurizes every entry into `out/features/` (files named
by their content hash, so a rerun reuses them and a changed setting makes new ones),
reads each entry's ligand scaffolds (`scaffold`), assigns companies and the held-out set
(`partition`, by the rule `split_by` names), and writes `out/sample.json`:

```json
{"format": "foldfed.of3.sample/1",
 "source": {"requirement": "plinder==0.2.27", "sha256": "..."},
 "settings": {"token_budget": 64, "seed": 0, "min_ligand_heavy_atoms": 6},
 "partition": {"key": "...", "heldout_fraction": 0.3, "companies": ["company-a", ...],
               "cluster": "minhash8", "split_by": "entries",
               "scaffold": "murcko/rdkit-2025.09.6"},
 "entries": [{"entry_id": "7bqu", "company": "company-a", "split": "train",
              "features": "features/<blake3>.safetensors", "n_tokens": 64,
              "cluster": "minhash8:...", "scaffolds": ["murcko:..."],
              "component": "minhash8:...", "ligand": "EF2", "ligand_chain": "3",
              "ligand_heavy_atoms": 19, "ligand_tokens_in_crop": 19,
              "ligands": ["EF2"], "full_tokens": 163, "resolution": 1.9}, ...],
 "skipped": [{"entry_id": "2leb", "reason": "no non-solvent ligand ..."}],
 "failures": [{"entry_id": "6fx1", "reason": "ValueError: ..."}]}
```

`skipped` entries hold no qualifying ligand (the rule, not an error); `failures` are entries
OpenFold3's preprocessing or featurization rejected, with the exception's message. Neither
stops the run. `open_sample(out)` reads and validates `sample.json`; `sample_split` shows
the split (`summary_table`) and reassigns it by another rule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foldfed.errors import ConfigError, StoreError
from foldfed.of3.data import partition

if TYPE_CHECKING:
    from foldfed.of3.data.pool import Pool

PLINDER = "plinder"  # the base source's --sources name (pool_sources.PLINDER)

FORMAT = "foldfed.of3.sample/1"
SAMPLE_FILE = "sample.json"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SampleEntry:
    """One prepared complex."""

    entry_id: str  # e.g. "7bqu"
    company: str  # "company-a", "company-b", ... (the names foldfed demo uses)
    split: Literal["train", "heldout"]
    features: Path  # cached feature file: foldfed.of3.data.features.load_batch(features)
    n_tokens: int  # real tokens in the crop
    cluster: str = ""
    ligand: str = ""  # component id of the ligand the crop is built around
    scaffolds: tuple[str, ...] | None = None  # ligand scaffold ids; None: not recorded
    component: str = ""  # the held-out unit (partition.Assignment.component)


@dataclass(frozen=True)
class Sample:
    root: Path
    entries: tuple[SampleEntry, ...]
    companies: tuple[str, ...] = ()
    manifest: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def of(self, company: str, split: str) -> list[SampleEntry]:
        """The entries `company` holds in `split` ("train" or "heldout"), by entry id."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if self.companies and company not in self.companies:
            raise ConfigError(
                f"{company!r} is not a company of this sample ({', '.join(self.companies)})"
            )
        return [e for e in self.entries if e.company == company and e.split == split]

    def heldout(self) -> list[SampleEntry]:
        """Every company's held-out entries."""
        return [e for e in self.entries if e.split == "heldout"]

    @property
    def split_by(self) -> str:
        """The partition rule the entries are assigned by ("entries" or "clusters")."""
        return str(self.manifest.get("partition", {}).get("split_by", partition.DEFAULT_SPLIT_BY))

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self.manifest.get("failures", []))

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.manifest.get("skipped", []))


def open_sample(root: Path) -> Sample:
    """Read and validate `root/sample.json`; StoreError says what is wrong."""
    root = Path(root)
    path = root / SAMPLE_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"{path} does not exist: prepare it with `foldfed data sample --out {root}`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: format {found!r}, this reader knows {FORMAT!r}")
    try:
        companies = tuple(str(c) for c in manifest["partition"]["companies"])
        raw_entries = manifest["entries"]
        if not isinstance(raw_entries, list):
            raise TypeError("entries is not a list")
        entries = []
        for raw in raw_entries:
            entry = SampleEntry(
                entry_id=str(raw["entry_id"]),
                company=str(raw["company"]),
                split=raw["split"],
                features=(root / str(raw["features"])).resolve(),
                n_tokens=int(raw["n_tokens"]),
                cluster=str(raw.get("cluster", "")),
                ligand=str(raw.get("ligand", "")),
                scaffolds=(tuple(str(x) for x in raw["scaffolds"]) if "scaffolds" in raw else None),
                component=str(raw.get("component", "")),
            )
            entries.append(entry)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: malformed ({type(exc).__name__}: {exc})") from exc
    seen: set[str] = set()
    for e in entries:
        if e.split not in SPLITS:
            raise StoreError(f"{path}: entry {e.entry_id}: split {e.split!r} not in {SPLITS}")
        if e.company not in companies:
            raise StoreError(f"{path}: entry {e.entry_id}: unknown company {e.company!r}")
        if e.entry_id in seen:
            raise StoreError(f"{path}: entry {e.entry_id} appears twice")
        seen.add(e.entry_id)
        if not e.features.is_relative_to(root.resolve()):
            raise StoreError(f"{path}: entry {e.entry_id}: features outside {root}")
        if not e.features.is_file():
            raise StoreError(f"{path}: entry {e.entry_id}: feature file {e.features} missing")
        if e.n_tokens <= 0:
            raise StoreError(f"{path}: entry {e.entry_id}: n_tokens {e.n_tokens}")
    train_clusters = {e.cluster for e in entries if e.split == "train"}
    leaked = sorted(train_clusters & {e.cluster for e in entries if e.split == "heldout"})
    if leaked:
        raise StoreError(f"{path}: clusters in both train and heldout: {leaked}")
    sample = Sample(root=root, entries=tuple(entries), companies=companies, manifest=manifest)
    if sample.split_by == "clusters":
        shared = _shared_scaffolds(sample)
        if shared:
            raise StoreError(f"{path}: scaffolds shared across the partition: {shared}")
    return sample


def _shared_scaffolds(sample: Sample) -> list[str]:
    """Scaffolds in the training sets of two companies, or in training and held-out."""
    holders: dict[str, set[str]] = {}
    for e in sample.entries:
        side = e.company if e.split == "train" else "heldout"
        for s in e.scaffolds or ():
            holders.setdefault(s, set()).add(side)
    return sorted(s for s, sides in holders.items() if len(sides) > 1)


# ---------------------------------------------------------------------------------------
# Preparing the sample


@dataclass
class PrepareReport:
    sample: Sample
    seconds: float
    featurized: int  # built now
    reused: int  # read from the cache
    featurize_seconds: dict[str, float]  # entry -> seconds, for entries built now


def prepare_sample(
    out: Path,
    companies: int,
    *,
    token_budget: int = 64,
    key: str = partition.DEFAULT_KEY,
    heldout_fraction: float = partition.DEFAULT_HELDOUT_FRACTION,
    seed: int = 0,
    limit: int | None = None,
    only: Iterable[str] | None = None,
    cache_dir: Path | None = None,
    cifs: Mapping[str, Path] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    sources: Iterable[str] = ("plinder",),
    split_by: str = partition.DEFAULT_SPLIT_BY,
) -> PrepareReport:
    """Build `out/sample.json` and the feature files (see the module docstring).

    `limit` takes the first N entries by id, `only` names entries; `cifs` replaces the
    sources with given mmCIF files (tests); `progress` wraps the entry iteration
    (e.g. tqdm). `sources` names plinder and/or the pool's archives (`pool_sources`);
    with any pool source, `out/pool.json` lists the pool (`pool.write_pool_manifest`).
    `split_by` names the partition rule ("entries", the default, or "clusters").
    """
    from foldfed.durable import atomic_write
    from foldfed.of3.data import plinder
    from foldfed.of3.data.cache import featurize_cached
    from foldfed.of3.data.ccd import OfflineCcd
    from foldfed.of3.data.example import FeatureSettings, FeaturizationError, NoLigandError
    from foldfed.of3.data.scaffold import entry_scaffolds, scaffold_rule

    settings = FeatureSettings(token_budget=token_budget, seed=seed)
    partition.company_names(companies)  # validate early
    partition.derive_key(key)
    rule = partition.check_split_by(split_by)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source: dict[str, Any]
    gathered: Pool | None = None
    plinder_ids: list[str] = []
    given_files = cifs is not None
    if cifs is None:
        cifs, source, gathered = _gather_sources(
            list(sources), cache_dir or plinder.default_cache_dir(), out / "cif"
        )
        plinder_ids = sorted(set(cifs) - set(gathered.cifs if gathered else ()))
    else:
        source = {"files": sorted(cifs)}
    ids = sorted(cifs)
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - set(ids))
        if unknown:
            raise ConfigError(f"entries not in the source: {', '.join(unknown)}")
        ids = [i for i in ids if i in wanted]
    if limit is not None:
        ids = ids[:limit]

    ccd = OfflineCcd()
    built: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    failures: list[dict[str, str]] = []
    timings: dict[str, float] = {}
    reused = 0
    iterator: Iterable[str] = progress(ids) if progress is not None else ids
    for entry_id in iterator:
        t0 = time.perf_counter()
        try:
            cached = featurize_cached(cifs[entry_id], out / "features", ccd, settings)
        except NoLigandError as exc:
            skipped.append({"entry_id": entry_id, "reason": str(exc)})
            continue
        except FeaturizationError as exc:
            failures.append({"entry_id": entry_id, "reason": str(exc)})
            continue
        if cached.hit:
            reused += 1
        else:
            timings[entry_id] = time.perf_counter() - t0
        built[entry_id] = cached

    clusters = {
        e: partition.cluster_id(c.info.protein_sequences, e) for e, c in sorted(built.items())
    }
    scaffolds = {e: entry_scaffolds(c.info.ligands) for e, c in sorted(built.items())}
    assignments = partition.assign(
        clusters, companies, key, heldout_fraction, split_by=rule, scaffolds=scaffolds
    )
    entries = []
    for entry_id, a in assignments.items():
        info = built[entry_id].info
        entries.append(
            {
                "entry_id": entry_id,
                "company": a.company,
                "split": a.split,
                "features": built[entry_id].path.relative_to(out).as_posix(),
                "n_tokens": info.n_tokens,
                "cluster": a.cluster,
                "scaffolds": list(scaffolds[entry_id]),
                "component": a.component,
                "ligand": info.primary_ligand.component,
                "ligand_chain": info.primary_ligand.chain_id,
                "ligand_heavy_atoms": info.primary_ligand.heavy_atoms,
                "ligand_tokens_in_crop": info.ligand_tokens_in_crop,
                "ligands": sorted({x.component for x in info.ligands if x.qualifies}),
                "full_tokens": info.full_tokens,
                "resolution": info.resolution,
                "source": _source_of(entry_id, gathered, cifs_given=given_files),
            }
        )
    manifest = {
        "format": FORMAT,
        "source": source,
        "settings": {
            "token_budget": settings.token_budget,
            "seed": settings.seed,
            "min_ligand_heavy_atoms": settings.min_ligand_heavy_atoms,
        },
        "partition": {
            "key": key,
            "heldout_fraction": heldout_fraction,
            "companies": list(partition.company_names(companies)),
            "cluster": f"minhash{partition.KMER}",
            "split_by": rule,
            "scaffold": scaffold_rule(),
        },
        "entries": entries,
        "skipped": skipped,
        "failures": failures,
    }
    atomic_write(out / SAMPLE_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    if gathered is not None:
        from foldfed.of3.data.pool import write_pool_manifest

        rejected = {row["entry_id"]: row["reason"] for row in skipped + failures}
        write_pool_manifest(out, plinder_ids, gathered, built, rejected)
    return PrepareReport(
        sample=open_sample(out),
        seconds=time.perf_counter() - started,
        featurized=len(timings),
        reused=reused,
        featurize_seconds=timings,
    )


def _gather_sources(
    sources: list[str], cache_dir: Path, dest: Path
) -> tuple[dict[str, Path], dict[str, Any], Pool | None]:
    """The mmCIF files of the named sources, sample.json's `source`, and the pool (None
    for plinder alone, whose `source` stays as before)."""
    from foldfed.of3.data import plinder, pool_sources
    from foldfed.of3.data.pool import gather_pool

    known = pool_sources.source_names()
    unknown = [s for s in sources if s not in known]
    if unknown or not sources:
        raise ConfigError(
            f"unknown source(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    cifs: dict[str, Path] = {}
    source: dict[str, Any] = {}
    if PLINDER in sources:
        sdist = plinder.fetch_sdist(cache_dir)
        cifs.update(plinder.extract_entries(sdist, dest))
        source = {"requirement": plinder.REQUIREMENT, "sha256": plinder.SDIST_SHA256}
    others = [s for s in sources if s != PLINDER]
    if not others:
        return cifs, source, None
    pool = gather_pool(others, cache_dir, dest, taken=cifs)
    cifs.update(pool.cifs)
    source["pool"] = pool.archives
    return dict(sorted(cifs.items())), source, pool


def _source_of(entry_id: str, pool: Pool | None, *, cifs_given: bool) -> str:
    if pool is not None and entry_id in pool.entries:
        return pool.entries[entry_id].source
    return "files" if cifs_given else PLINDER

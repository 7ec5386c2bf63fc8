"""The temporaries a killed finalize leaves in the aggregator's state folder, and their
removal at start-up.

A finalize (aggregation/finalize.py, progressive.py, downlink.py, state.py) writes every
output under a temporary name and renames it into place as its commit; a SIGKILL or a power
cut before the rename leaves the temporary behind, and nothing would ever read or delete it
(a progressive run's are as large as the model). One aggregator owns the folder, so at
start-up, before anything writes there, every such temporary is garbage: the restarted
aggregator computes the step again from the store (docs/format.md 9.3, 9.8).

Only names that the writers' temporaries have are matched, each in its own folder (the
`is_temporary` rules below); a committed file never matches, nor does an optimizer
generation set aside while it is replaced (`.old-*`: it may hold the committed one), nor
anything of the barrier's or the chunk store's (the store cleans its own `tmp/`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# mkstemp's and mkdtemp's random part: letters, digits and "_".
_RANDOM = r"[A-Za-z0-9_]+"
# folder (relative to the state folder) -> the temporaries written there
_PATTERNS: dict[str, re.Pattern[str]] = {
    # fileio.AtomicFile and durable.atomic_write: ".<final name>.<random>.tmp"
    "models": re.compile(rf"\.model-\d{{12}}\.safetensors\.{_RANDOM}\.tmp"),
    "updates": re.compile(
        rf"\.(?:update-\d{{12}}\.safetensors|coded-\d{{12}}\.(?:bin|json))\.{_RANDOM}\.tmp"
    ),
    # codecs_store.ResidualWriter, the hub's downlink residual
    ".": re.compile(rf"\.downlink\.residual\.{_RANDOM}\.tmp"),
    # state.OptimizerState: a generation being written (a directory)
    "optimizer": re.compile(rf"\.tmp-{_RANDOM}"),
}


def is_temporary(folder: str, name: str) -> bool:
    """Whether `name` in `folder` (relative to the state folder, "." for itself) is a
    finalize's temporary. Pure."""
    pattern = _PATTERNS.get(folder)
    return pattern is not None and pattern.fullmatch(name) is not None


def leftover_temporaries(state_dir: Path) -> list[Path]:
    """Every finalize temporary under `state_dir`, sorted."""
    found: list[Path] = []
    for folder in _PATTERNS:
        directory = state_dir / folder
        if directory.is_dir():
            found += [p for p in directory.iterdir() if is_temporary(folder, p.name)]
    return sorted(found)


def remove_temporaries(state_dir: Path) -> list[Path]:
    """Delete the finalize temporaries under `state_dir` (only at start-up, before the
    aggregator writes anything); the paths removed. Not fsynced: a deletion a power cut
    undoes is done again at the next start."""
    removed = leftover_temporaries(state_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if removed:
        names = [p.name for p in removed]
        log.info("finalize temporaries removed", count=len(removed), names=names)
    return removed

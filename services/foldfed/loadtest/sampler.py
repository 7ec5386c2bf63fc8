"""Samples what a load-test run holds while it runs, in a thread beside it: the resident
memory of the hub's processes (from /proc/PID/status, VmRSS; each process with its
descendants) and the bytes on disk of the hub's state folder, the participants' spools
and the broker's data folder (allocated blocks, `st_blocks` x 512). footprint.py turns
the samples into figures.

Linux only (/proc). The hub's own processes are looked up every sample (a service that
just started counts at once); their descendants are re-read from /proc every
`REFRESH_EVERY` samples and whenever a root changes, not every sample: walking /proc costs
CPU on a shared 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from foldfed.loadtest.footprint import Sample, is_kept_record
from foldfed.messages import now_ms

# Hub processes by name -> PID (None: not running now).
HubPids = Callable[[], Mapping[str, int | None]]
REFRESH_EVERY = 10


class FootprintSampler:
    """`start()` samples every `interval_s` until `stop()`; `samples` holds them."""

    def __init__(
        self,
        hub_pids: HubPids,
        hub_dir: Path,
        spools: list[Path],
        broker_dir: Path | None,
        interval_s: float = 0.2,
    ) -> None:
        self._hub_pids = hub_pids
        self._hub_dir = hub_dir
        self._spools = spools
        self._broker_dir = broker_dir
        self._interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="footprint", daemon=True)
        self._trees: dict[str, list[int]] = {}

    def start(self) -> FootprintSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        return self.samples

    def _loop(self) -> None:
        count = 0
        roots: Mapping[str, int | None] = {}
        while not self._stop.is_set():
            # The roots every sample (a service just started counts at once), their
            # children every REFRESH_EVERY samples.
            now = self._hub_pids()
            if now != roots or count % REFRESH_EVERY == 0:
                roots = now
                self._trees = process_trees(roots)
            self.samples.append(self.sample())
            count += 1
            self._stop.wait(self._interval_s)

    def sample(self) -> Sample:
        rss = {name: sum(rss_bytes(pid) for pid in pids) for name, pids in self._trees.items()}
        hub = disk_usage(self._hub_dir)
        spools = [disk_usage(p) for p in self._spools]
        return Sample(
            at_ms=now_ms(),
            hub_rss=rss,
            hub_disk=hub.total,
            participants_disk=sum(u.total for u in spools),
            broker_disk=disk_usage(self._broker_dir).total if self._broker_dir else 0,
            records_disk=hub.records + sum(u.records for u in spools),
        )


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 when it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parents() -> dict[int, int]:
    """Every process's parent PID."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            # The command name is in parentheses and may itself contain spaces or ')'.
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def process_trees(roots: Mapping[str, int | None]) -> dict[str, list[int]]:
    """Each named root with its descendants (a service's worker processes count as its)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    trees: dict[str, list[int]] = {}
    for name, root in roots.items():
        if root is None or root not in parents:
            continue
        tree, todo = [], [root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        trees[name] = tree
    return trees


@dataclass(frozen=True)
class DiskUsage:
    total: int
    # Of which the records the retention policy keeps for ever (footprint.is_kept_record).
    records: int


def disk_usage(folder: Path) -> DiskUsage:
    """Allocated bytes of every file under `folder` (0 if it does not exist). Files that
    vanish during the walk (GC, renames) are skipped."""
    total = records = 0
    todo = [str(folder)]
    root = len(str(folder)) + 1
    while todo:
        path = todo.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_blocks * 512
                    total += size
                    if is_kept_record(entry.path[root:]):
                        records += size
    return DiskUsage(total, records)


def disk_bytes(folder: Path) -> int:
    return disk_usage(folder).total

"""Where the hub keeps the federated evaluation: the model reports the monitor stored.

The monitor keeps every message it believed, raw, in its store (monitor/store.py,
`monitor.sqlite3` in its state folder); the model reports among them carry each
company's evaluation aggregates. `find_store` accepts the store file, the monitor's state
folder, or any folder above one (a demo's working folder: the newest store under it).
"""

from __future__ import annotations

from pathlib import Path

from foldfed.domain import ModelReport
from foldfed.errors import ConfigError
from foldfed.evaluation.table import Report
from foldfed.messages import decode
from foldfed.monitor.store import MonitorStore

STORE_NAME = "monitor.sqlite3"
REPORT_TYPE = "foldfed.v1.ModelReport"


def find_store(path: Path) -> Path:
    """The monitor store `path` names or holds (the newest one under a folder)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    if (path / STORE_NAME).is_file():
        return path / STORE_NAME
    found = sorted(path.rglob(STORE_NAME), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"{path}: holds no monitor store ({STORE_NAME})")
    return found[-1]


def stored_reports(store_path: Path) -> list[Report]:
    """Every model report in the store, in arrival order."""
    store = MonitorStore(store_path)
    try:
        out = []
        for _, type_name, body in store.messages():
            if type_name != REPORT_TYPE:
                continue
            msg = decode(type_name, body)
            if isinstance(msg, ModelReport):
                out.append(Report(msg.step, msg.participant, dict(msg.metrics)))
        return out
    finally:
        store.close()

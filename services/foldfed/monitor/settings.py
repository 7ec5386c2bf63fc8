"""The monitor's settings, from FOLDFED_* environment variables (validated at start)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from foldfed.config import BusSettings, _float, _get, _int, _participants
from foldfed.errors import ConfigError
from foldfed.monitor.attribution import StragglerRule
from foldfed.monitor.state import MonitorConfig

DEFAULT_PORT = 8090


@dataclass(frozen=True)
class MonitorSettings:
    bus: BusSettings
    model: MonitorConfig
    # monitor.sqlite3 lives here (the hub's state folder by default).
    state_dir: Path
    host: str
    # HTTP port of /, /metrics and /api/state (0: any free port, logged at start).
    port: int
    # Seconds between silence checks, and the dashboard's auto-refresh period.
    tick_s: float
    refresh_s: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MonitorSettings:
        try:
            rule = StragglerRule(
                margin=_float(env, "FOLDFED_MONITOR_STRAGGLER_MARGIN", 0.2),
                min_excess_s=_float(env, "FOLDFED_MONITOR_STRAGGLER_MIN_S", 1.0),
                window=_int(env, "FOLDFED_MONITOR_WINDOW", 5, 1),
                needed=_int(env, "FOLDFED_MONITOR_STRAGGLER_STEPS", 3, 1),
            )
        except ValueError as exc:
            raise ConfigError(
                f"FOLDFED_MONITOR_STRAGGLER_STEPS / FOLDFED_MONITOR_WINDOW: {exc}"
            ) from None
        model = MonitorConfig(
            participants=_participants(env, "FOLDFED_PARTICIPANTS"),
            steps=_int(env, "FOLDFED_STEPS", 5, 1),
            first_step=_int(env, "FOLDFED_FIRST_STEP", 1, 0),
            rule=rule,
            window=rule.window,
            silent_after_s=_float(env, "FOLDFED_MONITOR_SILENT_S", 30.0, 0.1),
        )
        port = _int(env, "FOLDFED_MONITOR_PORT", DEFAULT_PORT, 0)
        if port > 65535:
            raise ConfigError(f"FOLDFED_MONITOR_PORT={port} is not a TCP port")
        return cls(
            bus=BusSettings.from_env(env),
            model=model,
            state_dir=Path(_get(env, "FOLDFED_STATE_DIR", "var/hub")),
            host=env.get("FOLDFED_MONITOR_HOST") or "0.0.0.0",
            port=port,
            tick_s=_float(env, "FOLDFED_MONITOR_TICK_S", 1.0, 0.05),
            refresh_s=_int(env, "FOLDFED_MONITOR_REFRESH_S", 5, 1),
        )

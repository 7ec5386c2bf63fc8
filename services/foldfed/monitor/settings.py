"""The monitor's settings, from the settings registry (validated at start)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from foldfed.config import BusSettings
from foldfed.errors import ConfigError
from foldfed.monitor.attribution import StragglerRule
from foldfed.monitor.state import MonitorConfig
from foldfed.settings import Settings, load, required, variable


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
        s = load(env)
        rule = _straggler_rule(s)
        model = MonitorConfig(
            participants=required(s.participants, "participants"),
            steps=s.steps,
            first_step=s.first_step,
            rule=rule,
            window=rule.window,
            silent_after_s=s.monitor_silent_s,
        )
        return cls(
            bus=BusSettings.from_settings(s),
            model=model,
            state_dir=s.state_dir,
            host=s.monitor_host,
            port=s.monitor_port,
            tick_s=s.monitor_tick_s,
            refresh_s=s.monitor_refresh_s,
        )


def _straggler_rule(s: Settings) -> StragglerRule:
    # The rule checks what involves two variables (M of the last W steps needs M <= W).
    try:
        return StragglerRule(
            margin=s.monitor_straggler_margin,
            min_excess_s=s.monitor_straggler_min_s,
            window=s.monitor_window,
            needed=s.monitor_straggler_steps,
        )
    except ValueError as exc:
        names = f"{variable('monitor_straggler_steps')} / {variable('monitor_window')}"
        raise ConfigError(f"{names}: {exc}") from None

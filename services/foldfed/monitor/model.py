"""The monitor's model: the object the monitor service holds, its state with its snapshot.

`MonitorModel` is a `state.MonitorState` (the pure fold over foldfed.events: `apply`,
`check_silence`, the derived facts) that can also render itself: `snapshot(now_ms)` is
`snapshot.snapshot(self, now_ms)`, the read-only picture the page, /metrics, /api/state and
`foldfed status` render. The two concepts live in their own modules; this one only joins
them, so the service and `foldfed status` hold one object. Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from foldfed.monitor import snapshot
from foldfed.monitor.state import MonitorState


class MonitorModel(MonitorState):
    """A cycle's monitor state that renders its own snapshot."""

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """Everything a person or a scraper wants, as JSON-able data (`snapshot.snapshot`)."""
        return snapshot.snapshot(self, now_ms)

"""The snapshot: the monitor's whole picture of a cycle at one moment, as JSON-able data.

`snapshot(state, now_ms)` reads a `MonitorState` and never changes it: the table of
participants (straggler verdicts, held time, projection, silence, bytes, the latest
phases), the open step (who is awaited, bytes still to come), the ETA, the recent steps and
alerts, heartbeats and the rule in force. The dashboard, /metrics, /api/state and
`foldfed status` all render this one dict (format `SNAPSHOT_FORMAT`), so they agree.
Pure: no I/O, no clock (`now_ms` comes in).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from foldfed.monitor import attribution
from foldfed.monitor.state import MonitorState, ParticipantStep

SNAPSHOT_FORMAT = 1
# Steps shown in the timeline and kept in the snapshot's step list.
RECENT_STEPS = 12
RECENT_ALERTS = 20


def snapshot(state: MonitorState, now_ms: int) -> dict[str, Any]:
    """Everything a person or a scraper wants, as JSON-able data."""
    c = state.config
    now = now_ms / 1e3
    closed_steps = state.closed_steps()
    closed = closed_steps[-(c.window + 1) :]
    remaining = state.remaining_steps()
    verdicts = state.verdicts()
    current = state.current_step()
    open_info = _open_step(state, current, now)
    walls = [w for s in closed if (w := _wall(state, s)) is not None]
    elapsed = open_info["elapsed_s"] if open_info and not open_info["closed"] else 0.0
    eta = attribution.eta(walls, remaining, elapsed or 0.0, c.window)
    quiet = attribution.silent(state.last_seen(), now, c.silent_after_s, state.started_ms / 1e3)
    seen = state.last_seen()
    n_others = max(0, len(c.participants) - 1)
    table = []
    for p in c.participants:
        v = verdicts[p]
        idle = state.idle(p)
        table.append(
            {
                "participant": p,
                "straggler": v.straggler,
                "slow_in": v.slow_in,
                "considered": v.considered,
                "lag_s": v.lag_s,
                "others_lag_s": v.others_lag_s,
                "excess_s": v.excess_s,
                "idle_s": idle,
                "idle_participant_s": idle * n_others,
                "steps_held": state.steps_held(p),
                "projected_idle_s": state.projected(p),
                "silent": p in quiet and state.cycle_done_ms is None,
                "heartbeat_age_s": None if seen[p] is None else max(0.0, now - seen[p]),
                "bytes_sent_total": state.bytes_sent_total(p),
                "last": _last_phases(state, p, closed),
            }
        )
    return {
        "format": SNAPSHOT_FORMAT,
        "now_ms": now_ms,
        "participants": list(c.participants),
        "cycle": {
            "first_step": c.first_step,
            "last_step": c.last_step,
            "steps": c.steps,
            "closed": len(closed_steps),
            "remaining": remaining,
            "done": state.cycle_done_ms is not None,
        },
        "current_step": current,
        "open": open_info,
        "eta_s": eta,
        "step_wall_s": attribution.robust_rate(walls, c.window) if walls else None,
        "table": table,
        "steps": [_step_dict(state, s) for s in _recent_steps(state)],
        "alerts": sorted(state.alerts.values(), key=lambda a: (a["unix_ms"], a["key"]))[
            -RECENT_ALERTS:
        ],
        "heartbeats": [
            {
                "service": s,
                "participant": p,
                "age_s": max(0.0, now - at / 1e3),
                "step": st,
                "state": word,
            }
            for (s, p), (at, st, word) in sorted(state.heartbeats.items())
        ],
        "rejected": state.rejected,
        "rejected_by_reason": dict(sorted(state.rejected_by_reason.items())),
        "mismatches": list(state.mismatches),
        "rule": {
            "margin": c.rule.margin,
            "min_excess_s": c.rule.min_excess_s,
            "window": c.rule.window,
            "needed": c.rule.needed,
            "silent_after_s": c.silent_after_s,
        },
    }


def _entry(state: MonitorState, step: int, participant: str) -> ParticipantStep:
    """What is known of (step, participant); an empty record if nothing is (never stored:
    a snapshot only reads)."""
    record = state.steps.get(step)
    found = None if record is None else record.participants.get(participant)
    return ParticipantStep() if found is None else found


def _released_ms(state: MonitorState, step: int) -> int | None:
    record = state.steps.get(step)
    return None if record is None else record.released_ms


def _wall(state: MonitorState, step: int) -> float | None:
    released = _released_ms(state, step)
    nxt = state.next_release_ms(step)
    if released is None or nxt is None:
        return None
    return (nxt - released) / 1e3


def _open_step(state: MonitorState, current: int | None, now: float) -> dict[str, Any] | None:
    if current is None:
        return None
    delivered = state.deliveries(current)
    waiting = [p for p in state.config.participants if p not in delivered]
    to_come = 0.0
    known = True
    for p in waiting:
        size = _entry(state, current, p).bytes_total or _last_size(state, p)
        if size is None:
            known = False
        else:
            to_come += size
    released = _released_ms(state, current)
    elapsed = None if released is None else max(0.0, now - released / 1e3)
    return {
        "step": current,
        "released_ms": released,
        "elapsed_s": elapsed,
        "closed": not waiting,
        "delivered": sorted(delivered),
        "waiting": waiting,
        "uploading": [
            p for p in waiting if _entry(state, current, p).upload_started_ms is not None
        ],
        "bytes_to_come": to_come,
        "bytes_to_come_known": known,
    }


def _last_size(state: MonitorState, participant: str) -> float | None:
    for step in sorted(state.steps, reverse=True):
        entry = state.steps[step].participants.get(participant)
        if entry is not None and entry.bytes_total is not None:
            return entry.bytes_total
    return None


def _last_phases(
    state: MonitorState, participant: str, closed: Iterable[int]
) -> dict[str, Any] | None:
    """Phases of the latest closed step whose wait is over (the next release seen),
    else of the latest closed step."""
    steps = list(closed)
    if not steps:
        return None
    done = [s for s in steps if state.next_release_ms(s) is not None]
    step = done[-1] if done else steps[-1]
    return {"step": step, **_phases(state, step, participant)}


def _phases(state: MonitorState, step: int, participant: str) -> dict[str, float | None]:
    e = _entry(state, step, participant)
    nxt = state.next_release_ms(step)
    wait = None
    if e.delivered_ms is not None and nxt is not None:
        wait = max(0.0, (nxt - e.delivered_ms) / 1e3)
    elif e.reported_wait_s is not None:
        wait = e.reported_wait_s
    lag = state.lags(step).get(participant)
    return {
        "compute_s": e.local_s if e.local_s is not None else e.compute_s,
        "train_s": e.compute_s,
        "upload_s": e.upload_s,
        "wait_s": wait,
        "lag_s": lag,
        "bytes_sent": e.bytes_sent,
    }


def _recent_steps(state: MonitorState) -> list[int]:
    c = state.config
    steps = [s for s in sorted(state.steps) if c.first_step <= s <= c.last_step]
    return steps[-RECENT_STEPS:]


def _step_dict(state: MonitorState, step: int) -> dict[str, Any]:
    deliveries = state.deliveries(step)
    closed = state.closed(step)
    held = attribution.held_times(deliveries) if closed else {}
    who = attribution.holder(deliveries) if closed else None
    return {
        "step": step,
        "released_ms": _released_ms(state, step),
        "closed": closed,
        "wall_s": _wall(state, step),
        "holder": who,
        "held_s": held.get(who, 0.0) if who else 0.0,
        "barrier_wait_s": attribution.barrier_wait(deliveries) if closed else None,
        "participants": {p: _phases(state, step, p) for p in state.config.participants},
    }

"""The monitor's picture of a cycle: a pure fold over the messages seen on foldfed.events.

`MonitorModel.apply(msg, received_ms)` records one message (idempotent: applying a message
twice changes nothing) and returns the alerts it newly raises; `snapshot(now_ms)` is the
whole picture as JSON-able data, which the dashboard, /metrics, /api/state and
`foldfed status` all render. No I/O, no clock: the service passes times in, so a monitor
restarted from its persisted messages rebuilds the same numbers.

Clocks. Idle attribution and times to deliver use only hub timestamps (the barrier's
release events and the aggregator's receipts, one host), so participants' clock skew
cannot bias them. Per-participant phase durations (compute, upload) are measured by the
participant on its own clock and only ever used as durations. Heartbeats are timed by the
monitor's clock on arrival (`received_ms`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from foldfed.domain import AnyMessage, DeliveryReceipt, Event, Heartbeat, ModelReport, StepFinalized
from foldfed.monitor import attribution
from foldfed.monitor.attribution import StragglerRule

SNAPSHOT_FORMAT = 1
# Steps shown in the timeline and kept in the snapshot's step list.
RECENT_STEPS = 12
RECENT_ALERTS = 20
HUB_SERVICES = frozenset({"aggregator", "barrier", "ingest", "monitor"})


@dataclass(frozen=True)
class MonitorConfig:
    participants: tuple[str, ...]
    steps: int
    first_step: int = 1
    rule: StragglerRule = field(default_factory=StragglerRule)
    # Steps a robust rate (projection, ETA) looks back over.
    window: int = 5
    silent_after_s: float = 30.0

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1


@dataclass(frozen=True)
class Alert:
    """Something the monitor tells operators (an Event on the wire, and a log line)."""

    kind: str  # "straggler" or "silent"
    participant: str
    step: int
    detail: str
    metrics: dict[str, float]

    @property
    def key(self) -> str:
        """Identity of the alert: the same condition is raised once (a silence by when it
        began, so a participant silent twice in one step is flagged twice)."""
        if self.kind == "silent":
            return f"silent:{self.participant}:{int(self.metrics.get('since_ms', 0))}"
        return f"{self.kind}:{self.participant}:{self.step}"


@dataclass
class ParticipantStep:
    release_received_ms: int | None = None
    upload_started_ms: int | None = None
    delivered_ms: int | None = None  # hub clock (receipt)
    compute_s: float | None = None  # the trainer's training time
    local_s: float | None = None  # release received -> upload started, participant clock
    upload_s: float | None = None
    bytes_total: float | None = None
    bytes_sent: float | None = None
    reported_wait_s: float | None = None  # the uploader's own measure of its wait
    train_loss: float | None = None


@dataclass
class StepState:
    step: int
    released_ms: int | None = None
    finalized_ms: int | None = None
    participants: dict[str, ParticipantStep] = field(default_factory=dict)

    def of(self, participant: str) -> ParticipantStep:
        return self.participants.setdefault(participant, ParticipantStep())


def _first(current: int | None, new: int) -> int:
    """Repeated facts (a re-published release, a redelivered receipt) keep the first time."""
    return new if current is None else min(current, new)


class MonitorModel:
    def __init__(self, config: MonitorConfig, started_ms: int) -> None:
        self.config = config
        self.started_ms = started_ms
        self.steps: dict[int, StepState] = {}
        self.cycle_done_ms: int | None = None
        # (service, participant) -> (monitor time of the latest heartbeat, its step, state)
        self.heartbeats: dict[tuple[str, str], tuple[int, int, str]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        self.mismatches: list[str] = []
        self.reports: dict[tuple[int, str], dict[str, float]] = {}
        self._stragglers: set[str] = set()
        self._silent: dict[str, int] = {}  # participant -> last heartbeat ms it was silent after
        # Kept as messages arrive, so that neither a step closing nor a replay of a long
        # cycle rescans every step: closed steps of the cycle (ascending), each one's held
        # times, each participant's idle and bytes so far, the latest step heard of.
        self._closed: list[int] = []
        self._held: dict[int, dict[str, float]] = {}
        self._idle = {p: 0.0 for p in config.participants}
        self._bytes = {p: 0.0 for p in config.participants}
        self._latest: int | None = None

    # ------------------------------------------------------------------ input

    def step(self, step: int) -> StepState:
        return self.steps.setdefault(step, StepState(step))

    def apply(self, msg: AnyMessage, received_ms: int) -> list[Alert]:
        """Record one message; the alerts it newly raises (none for a repeat)."""
        match msg:
            case DeliveryReceipt():
                if msg.participant not in self.config.participants:
                    return []
                entry = self.step(msg.step).of(msg.participant)
                before = entry.delivered_ms
                entry.delivered_ms = _first(entry.delivered_ms, msg.completed_unix_ms)
                self._heard_of(msg.step)
                if entry.delivered_ms != before and self._close(msg.step):
                    return self._straggler_alerts(msg.step)
            case StepFinalized():
                state = self.step(msg.step)
                state.finalized_ms = _first(state.finalized_ms, msg.finalized_unix_ms)
            case ModelReport():
                self.reports[(msg.step, msg.participant)] = dict(msg.metrics)
            case Heartbeat():
                key = (msg.service, msg.participant)
                previous = self.heartbeats.get(key)
                if previous is None or previous[0] <= received_ms:
                    self.heartbeats[key] = (received_ms, msg.step, msg.state)
            case Event():
                self._event(msg)
        return []

    def _event(self, event: Event) -> None:
        m = event.metrics
        if event.kind == "step_released":
            state = self.step(event.step)
            state.released_ms = _first(state.released_ms, event.unix_ms)
            self._heard_of(event.step)
        elif event.kind == "cycle_done":
            self.cycle_done_ms = _first(self.cycle_done_ms, event.unix_ms)
        elif event.kind == "rejected":
            self.rejected += 1
        elif event.kind == "model_mismatch":
            if event.detail not in self.mismatches:
                self.mismatches.append(event.detail)
        elif event.kind in ("straggler", "silent"):
            alert = Alert(event.kind, event.participant, event.step, event.detail, event.metrics)
            self.alerts[alert.key] = {**_alert_dict(alert), "unix_ms": event.unix_ms}
        elif event.participant in self.config.participants:
            self._participant_event(event, m)

    def _participant_event(self, event: Event, m: dict[str, float]) -> None:
        entry = self.step(event.step).of(event.participant)
        if event.kind == "release_received":
            entry.release_received_ms = _first(entry.release_received_ms, event.unix_ms)
            if event.step > self.config.first_step and "wait_s" in m:
                # The wait ended with this release: it belongs to the step before.
                self.step(event.step - 1).of(event.participant).reported_wait_s = m["wait_s"]
        elif event.kind in ("upload_started", "upload_finished"):
            if event.kind == "upload_started":
                entry.upload_started_ms = _first(entry.upload_started_ms, event.unix_ms)
            entry.compute_s = m.get("compute_s", entry.compute_s)
            entry.bytes_total = m.get("bytes_total", entry.bytes_total)
            entry.upload_s = m.get("upload_s", entry.upload_s)
            if "bytes_sent" in m and m["bytes_sent"] != entry.bytes_sent:
                self._bytes[event.participant] += m["bytes_sent"] - (entry.bytes_sent or 0.0)
                entry.bytes_sent = m["bytes_sent"]
            entry.train_loss = m.get("train_loss", entry.train_loss)
        if entry.release_received_ms is not None and entry.upload_started_ms is not None:
            entry.local_s = max(0.0, (entry.upload_started_ms - entry.release_received_ms) / 1e3)

    def _heard_of(self, step: int) -> None:
        c = self.config
        if c.first_step <= step <= c.last_step and (self._latest is None or step > self._latest):
            self._latest = step

    def _close(self, step: int) -> bool:
        """Record held times once `step` has every delivery; True the first time."""
        c = self.config
        if not (c.first_step <= step <= c.last_step and self.closed(step)):
            return False
        held = attribution.held_times(self.deliveries(step))
        old = self._held.get(step)
        for p, seconds in held.items():
            self._idle[p] += seconds - (old or {}).get(p, 0.0)
        self._held[step] = held
        if old is None:
            bisect.insort(self._closed, step)
        return old is None

    # ------------------------------------------------------------------ derived facts

    def deliveries(self, step: int) -> dict[str, float]:
        """Hub delivery times (s) of the participants that delivered `step`."""
        state = self.steps.get(step)
        if state is None:
            return {}
        return {
            p: e.delivered_ms / 1e3
            for p, e in state.participants.items()
            if e.delivered_ms is not None and p in self.config.participants
        }

    def closed(self, step: int) -> bool:
        return len(self.deliveries(step)) == len(self.config.participants)

    def closed_steps(self) -> list[int]:
        """Closed steps of the cycle, ascending."""
        return list(self._closed)

    def next_release_ms(self, step: int) -> int | None:
        if step == self.config.last_step:
            return self.cycle_done_ms
        nxt = self.steps.get(step + 1)
        return None if nxt is None else nxt.released_ms

    def lags(self, step: int) -> dict[str, float]:
        """Release -> delivery (s, hub clock) per participant; {} if the release is unknown."""
        state = self.steps.get(step)
        if state is None or state.released_ms is None:
            return {}
        released = state.released_ms / 1e3
        return {p: at - released for p, at in self.deliveries(step).items()}

    def recent_held(self, participant: str) -> list[float]:
        """Seconds it held the barrier in each of the last `window` closed steps."""
        return [self._held[s].get(participant, 0.0) for s in self._closed[-self.config.window :]]

    def idle(self, participant: str) -> float:
        """Seconds it held the barrier over every closed step."""
        return self._idle[participant]

    def projected(self, participant: str) -> float:
        return attribution.projected_idle(
            self.recent_held(participant), self.remaining_steps(), self.config.window
        )

    def verdicts(self) -> dict[str, attribution.Verdict]:
        """Straggler verdicts over the last `window` closed steps with known lags (looking
        back at most 4 windows, so a monitor that missed releases stays cheap)."""
        c = self.config
        recent: list[dict[str, float]] = []
        for step in reversed(self._closed[-4 * c.rule.window :]):
            lags = self.lags(step)
            if all(p in lags for p in c.participants):
                recent.append(lags)
                if len(recent) == c.rule.window:
                    break
        return attribution.stragglers(recent[::-1], c.participants, c.rule)

    def remaining_steps(self) -> int:
        return self.config.steps - len(self._closed)

    def current_step(self) -> int | None:
        """The open step: the latest released (or delivered-to) step of the cycle."""
        return self._latest

    def last_seen(self) -> dict[str, float | None]:
        """Per participant, the monitor time (s) of its latest heartbeat from any service."""
        out: dict[str, float | None] = {p: None for p in self.config.participants}
        for (_service, participant), (at, _step, _state) in self.heartbeats.items():
            if participant in out:
                seen = out[participant]
                out[participant] = at / 1e3 if seen is None else max(seen, at / 1e3)
        return out

    # ------------------------------------------------------------------ alerts

    def _straggler_alerts(self, step: int) -> list[Alert]:
        verdicts = self.verdicts()
        now = {p for p, v in verdicts.items() if v.straggler}
        raised = sorted(now - self._stragglers)
        self._stragglers = now
        remaining = self.remaining_steps()
        alerts = []
        for p in raised:
            v = verdicts[p]
            idle = self.idle(p)
            projected = self.projected(p)
            detail = (
                f"{p} is a straggler: slow in {v.slow_in} of the last {v.considered} steps, "
                f"{v.excess_s or 0.0:.1f} s slower than the others' median per step; it held "
                f"the barrier {idle:.1f} s so far, ~{projected:.1f} s more expected over the "
                f"{remaining} remaining steps"
            )
            metrics = {
                "excess_s": v.excess_s or 0.0,
                "idle_s": idle,
                "projected_idle_s": projected,
                "slow_in": float(v.slow_in),
            }
            alerts.append(Alert("straggler", p, step, detail, metrics))
        return alerts

    def check_silence(self, now_ms: int) -> list[Alert]:
        """SILENT alerts for participants newly silent at `now_ms` (once per silence)."""
        if self.cycle_done_ms is not None:
            return []
        quiet = attribution.silent(
            self.last_seen(), now_ms / 1e3, self.config.silent_after_s, self.started_ms / 1e3
        )
        seen = self.last_seen()
        for p in list(self._silent):
            if p not in quiet:
                del self._silent[p]  # heard from again
        current = self.current_step()
        alerts = []
        for p, seconds in sorted(quiet.items()):
            since = seen[p]
            mark = int(since * 1e3) if since is not None else self.started_ms
            if self._silent.get(p) == mark:
                continue
            self._silent[p] = mark
            waiting = current is not None and p not in self.deliveries(current)
            detail = f"no heartbeat from {p} for {seconds:.0f} s" + (
                f"; step {current} is waiting for it: the barrier will not close without it"
                if waiting
                else ""
            )
            alerts.append(
                Alert("silent", p, current or 0, detail, {"silent_s": seconds, "since_ms": mark})
            )
        return alerts

    # ------------------------------------------------------------------ output

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """Everything a person or a scraper wants, as JSON-able data."""
        c = self.config
        now = now_ms / 1e3
        closed = self._closed[-(c.window + 1) :]
        remaining = self.remaining_steps()
        verdicts = self.verdicts()
        current = self.current_step()
        open_info = self._open_step(current, now)
        walls = [w for s in closed if (w := self._wall(s)) is not None]
        elapsed = open_info["elapsed_s"] if open_info and not open_info["closed"] else 0.0
        eta = attribution.eta(walls, remaining, elapsed or 0.0, c.window)
        quiet = attribution.silent(self.last_seen(), now, c.silent_after_s, self.started_ms / 1e3)
        seen = self.last_seen()
        n_others = max(0, len(c.participants) - 1)
        table = []
        for p in c.participants:
            v = verdicts[p]
            idle = self.idle(p)
            last = self._last_phases(p, closed)
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
                    "steps_held": sum(1 for h in self._held.values() if h.get(p, 0.0) > 0),
                    "projected_idle_s": self.projected(p),
                    "silent": p in quiet and self.cycle_done_ms is None,
                    "heartbeat_age_s": None if seen[p] is None else max(0.0, now - seen[p]),
                    "bytes_sent_total": self._bytes[p],
                    "last": last,
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
                "closed": len(self._closed),
                "remaining": remaining,
                "done": self.cycle_done_ms is not None,
            },
            "current_step": current,
            "open": open_info,
            "eta_s": eta,
            "step_wall_s": attribution.robust_rate(walls, c.window) if walls else None,
            "table": table,
            "steps": [self._step_dict(s) for s in self._recent_steps()],
            "alerts": sorted(self.alerts.values(), key=lambda a: (a["unix_ms"], a["key"]))[
                -RECENT_ALERTS:
            ],
            "heartbeats": [
                {
                    "service": s,
                    "participant": p,
                    "age_s": max(0.0, now - at / 1e3),
                    "step": st,
                    "state": state,
                }
                for (s, p), (at, st, state) in sorted(self.heartbeats.items())
            ],
            "rejected": self.rejected,
            "mismatches": list(self.mismatches),
            "rule": {
                "margin": c.rule.margin,
                "min_excess_s": c.rule.min_excess_s,
                "window": c.rule.window,
                "needed": c.rule.needed,
                "silent_after_s": c.silent_after_s,
            },
        }

    def _wall(self, step: int) -> float | None:
        state = self.steps.get(step)
        nxt = self.next_release_ms(step)
        if state is None or state.released_ms is None or nxt is None:
            return None
        return (nxt - state.released_ms) / 1e3

    def _open_step(self, current: int | None, now: float) -> dict[str, Any] | None:
        if current is None:
            return None
        state = self.step(current)
        delivered = self.deliveries(current)
        waiting = [p for p in self.config.participants if p not in delivered]
        to_come = 0.0
        known = True
        for p in waiting:
            size = state.of(p).bytes_total or self._last_size(p)
            if size is None:
                known = False
            else:
                to_come += size
        elapsed = None if state.released_ms is None else max(0.0, now - state.released_ms / 1e3)
        return {
            "step": current,
            "released_ms": state.released_ms,
            "elapsed_s": elapsed,
            "closed": not waiting,
            "delivered": sorted(delivered),
            "waiting": waiting,
            "uploading": [p for p in waiting if state.of(p).upload_started_ms is not None],
            "bytes_to_come": to_come,
            "bytes_to_come_known": known,
        }

    def _last_size(self, participant: str) -> float | None:
        for step in sorted(self.steps, reverse=True):
            entry = self.steps[step].participants.get(participant)
            if entry is not None and entry.bytes_total is not None:
                return entry.bytes_total
        return None

    def _last_phases(self, participant: str, closed: Iterable[int]) -> dict[str, Any] | None:
        """Phases of the latest closed step whose wait is over (the next release seen),
        else of the latest closed step."""
        steps = list(closed)
        if not steps:
            return None
        done = [s for s in steps if self.next_release_ms(s) is not None]
        step = done[-1] if done else steps[-1]
        return {"step": step, **self._phases(step, participant)}

    def _phases(self, step: int, participant: str) -> dict[str, float | None]:
        state = self.step(step)
        e = state.of(participant)
        nxt = self.next_release_ms(step)
        wait = None
        if e.delivered_ms is not None and nxt is not None:
            wait = max(0.0, (nxt - e.delivered_ms) / 1e3)
        elif e.reported_wait_s is not None:
            wait = e.reported_wait_s
        lag = self.lags(step).get(participant)
        return {
            "compute_s": e.local_s if e.local_s is not None else e.compute_s,
            "train_s": e.compute_s,
            "upload_s": e.upload_s,
            "wait_s": wait,
            "lag_s": lag,
            "bytes_sent": e.bytes_sent,
        }

    def _recent_steps(self) -> list[int]:
        c = self.config
        steps = [s for s in sorted(self.steps) if c.first_step <= s <= c.last_step]
        return steps[-RECENT_STEPS:]

    def _step_dict(self, step: int) -> dict[str, Any]:
        deliveries = self.deliveries(step)
        closed = self.closed(step)
        held = attribution.held_times(deliveries) if closed else {}
        who = attribution.holder(deliveries) if closed else None
        return {
            "step": step,
            "released_ms": self.step(step).released_ms,
            "closed": closed,
            "wall_s": self._wall(step),
            "holder": who,
            "held_s": held.get(who, 0.0) if who else 0.0,
            "barrier_wait_s": attribution.barrier_wait(deliveries) if closed else None,
            "participants": {p: self._phases(step, p) for p in self.config.participants},
        }


def _alert_dict(alert: Alert) -> dict[str, Any]:
    return {
        "key": alert.key,
        "kind": alert.kind,
        "participant": alert.participant,
        "step": alert.step,
        "detail": alert.detail,
        "metrics": dict(alert.metrics),
    }


def check_sender(msg: AnyMessage, user_id: str | None, hub_user: str) -> str | None:
    """Why a message on the events exchange is not to be believed, or None if it is.

    RabbitMQ vouches for `user_id`. Participants may publish there (their uploader's events,
    heartbeats and model reports; topic permissions keep them to those keys), so a fact is
    believed only from whom it is about: hub facts (receipts, finalizations, releases,
    rejections, alerts) from the hub's user; a participant's events, heartbeats and reports
    only from that participant."""
    match msg:
        case DeliveryReceipt() | StepFinalized():
            if user_id != hub_user:
                return f"{type(msg).__name__} from {user_id!r}: only the hub says so"
            return None
        case Event() | Heartbeat() if msg.service in HUB_SERVICES:
            if user_id != hub_user:
                return f"{msg.service} event from {user_id!r}: only the hub sends those"
            return None
        case Event() | Heartbeat() | ModelReport():
            if user_id != msg.participant:
                return (
                    f"forged sender: {type(msg).__name__} claims participant "
                    f"{msg.participant!r} but was published by user {user_id!r}"
                )
            return None
    return f"{type(msg).__name__} does not belong on the events exchange"

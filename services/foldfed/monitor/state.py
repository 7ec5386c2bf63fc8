"""The monitor's state of a cycle: a pure fold over the messages seen on foldfed.events.

`MonitorState.apply(msg, received_ms)` records one message (idempotent: applying a message
twice changes nothing) and returns the alerts it newly raises; `check_silence(now_ms)`
raises SILENT alerts. The derived facts the alerts need (deliveries, lags, held times,
straggler verdicts, projections) are methods here; the read-only picture the page, /metrics
and `foldfed status` render is `snapshot`. No I/O, no clock: the service passes times in,
so a monitor restarted from its persisted messages rebuilds the same state.

Clocks. Idle attribution and times to deliver use only hub timestamps (the barrier's
release events and the aggregator's receipts, one host), so participants' clock skew
cannot bias them. Per-participant phase durations (compute, upload) are measured by the
participant on its own clock and only ever used as durations. Heartbeats are timed by the
monitor's clock on arrival (`received_ms`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from foldfed.domain import AnyMessage, DeliveryReceipt, Event, Heartbeat, ModelReport, StepFinalized
from foldfed.monitor import attribution
from foldfed.monitor.attribution import StragglerRule
from foldfed.rejections import reason_class


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


class MonitorState:
    """Everything the monitor knows about the cycle, folded from messages."""

    def __init__(self, config: MonitorConfig, started_ms: int) -> None:
        self.config = config
        self.started_ms = started_ms
        self.steps: dict[int, StepState] = {}
        self.cycle_done_ms: int | None = None
        # (service, participant) -> (monitor time of the latest heartbeat, its step, state)
        self.heartbeats: dict[tuple[str, str], tuple[int, int, str]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        # The same rejections per reason class (foldfed.rejections), from each event's detail.
        self.rejected_by_reason: dict[str, int] = {}
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
            name = reason_class(event.detail)
            self.rejected_by_reason[name] = self.rejected_by_reason.get(name, 0) + 1
        elif event.kind == "model_mismatch":
            if event.detail not in self.mismatches:
                self.mismatches.append(event.detail)
        elif event.kind in ("straggler", "silent"):
            alert = Alert(event.kind, event.participant, event.step, event.detail, event.metrics)
            self.alerts[alert.key] = {**_alert_dict(alert), "unix_ms": event.unix_ms}
        elif event.kind == "readiness":
            pass  # a gate record is about a coming cycle, not a step (docs/operating-model.md)
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

    def steps_held(self, participant: str) -> int:
        """Closed steps in which it held the barrier at all."""
        return sum(1 for held in self._held.values() if held.get(participant, 0.0) > 0)

    def bytes_sent_total(self, participant: str) -> float:
        """Bytes its uploader reported sending, over every step."""
        return self._bytes[participant]

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


def _alert_dict(alert: Alert) -> dict[str, Any]:
    return {
        "key": alert.key,
        "kind": alert.kind,
        "participant": alert.participant,
        "step": alert.step,
        "detail": alert.detail,
        "metrics": dict(alert.metrics),
    }

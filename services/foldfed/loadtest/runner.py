"""Runs a scenario against the real broker, the real hub services and the real uploaders;
only the trainer is simulated (`simtrainer`). Faults are real: SIGKILL of an uploader in
the middle of its upload, a broker stop/start, a site whose gateway comes up mid-cycle.

One broker serves a whole `foldfed loadtest all` (each run starts from deleted queues and
fresh state folders); each run's processes come from `demo.cluster.LocalFederation`.
The measurements come from the barrier's own store (when each step opened, who delivered
when, when it closed and was released: hub clock) and from the participants' events
(compute, upload, wait, bytes), watched like the demo does (`demo.observer`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from foldfed import hubctl
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.observer import Observer, RunRecord
from foldfed.errors import FoldfedError
from foldfed.loadtest.predict import (
    StepPlan,
    plan_run,
    relative_error,
    totals,
    transfer_run_seconds,
)
from foldfed.loadtest.scenario import MIB, Scenario
from foldfed.loadtest.simtrainer import sim_json, write_initial_model
from foldfed.loadtest.timeline import (
    Goodput,
    MeasuredStep,
    ParticipantObs,
    StepObs,
    goodput,
    idle_totals,
    measure,
    overhead_s,
    straggler_real_idle,
)
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed

log = structlog.get_logger(__name__)
# Spool polling of the uploader and the simulated trainer: fine enough not to blur steps.
POLL_S = 0.01
Say = Callable[[str], None]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class RunResult:
    scenario: Scenario
    workdir: Path
    wall_s: float  # run seconds, first release to the last cycle's end
    steps: list[MeasuredStep]
    plans: list[StepPlan]
    overhead_s: float  # run seconds per step the services add (median)
    final_digest: str
    participant_digests: dict[str, str]
    cycles: dict[int, tuple[str, ...]]  # cycle → its participants, from the releases
    checks: list[Check] = field(default_factory=list)
    goodput: Goodput | None = None
    notes: list[str] = field(default_factory=list)
    reference_digest: str = ""
    # The monitor service's /api/state at the end of the run (straggler scenarios).
    monitor: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class SharedBroker:
    """One private RabbitMQ with a user per participant name, reused by every run."""

    def __init__(
        self, folder: Path, names: tuple[str, ...], broker: LocalBroker | None = None
    ) -> None:
        """`broker`: an existing one (a test session's), left running by `stop`."""
        self._own = broker is None
        self.broker = broker or LocalBroker(folder)
        self.names = names
        self.passwords: dict[str, str] = {}
        self.admin_url = ""

    def start(self) -> None:
        import secrets

        ensure_rabbitmq_installed()
        self.admin_url = self.broker.start()
        for name in self.names:
            self.passwords[name] = secrets.token_hex(16)
            self.broker.add_participant(name, self.passwords[name])

    def stop(self) -> None:
        if self._own:
            self.broker.stop()
        else:
            asyncio.run(self.reset())

    async def reset(self) -> None:
        """Delete every foldfed queue: each run starts from an empty broker state."""
        await hubctl.delete_queues(self.admin_url, self.names)


# ------------------------------------------------------------------ barrier store, read-only


def _barrier_db(hub_dir: Path) -> Path:
    return hub_dir / "barrier.sqlite3"


def barrier_state(hub_dir: Path) -> dict[str, object] | None:
    """The barrier's current state as stored (JSON), read without writing anything."""
    path = _barrier_db(hub_dir)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT body FROM state WHERE id = 1").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    body = json.loads(row[0])
    return body if isinstance(body, dict) else None


def step_history(hub_dir: Path) -> list[StepObs]:
    from foldfed.barrier.store import BarrierStore

    with BarrierStore(_barrier_db(hub_dir)) as store:
        records = store.step_history()
    return [
        StepObs(
            step=r.step,
            cycle=r.cycle,
            opened_ms=r.opened_ms,
            delivered_ms=r.delivered_ms,
            closed_ms=r.closed_ms,
            released_ms=r.released_ms,
        )
        for r in records
    ]


# ------------------------------------------------------------------ the run


class Run:
    def __init__(
        self, scenario: Scenario, workdir: Path, shared: SharedBroker, say: Say = print
    ) -> None:
        self.s = scenario
        self.workdir = workdir
        self.shared = shared
        self.say = say
        spec = FederationSpec(
            participants=scenario.names,
            steps=scenario.steps,
            workdir=workdir,
            common_env={
                "FOLDFED_CHUNK_SIZE": str(scenario.chunk_mib * MIB),
                "FOLDFED_POLL_S": str(POLL_S),
                "FOLDFED_REPLY_TIMEOUT_S": "10",
                "FOLDFED_SEED": str(scenario.seed),
                # Span files cost CPU per message on a 2-core machine; tracing's own
                # overhead is bench/tracing_overhead.py's subject, not this one's.
                "FOLDFED_TRACING": "off",
            },
        )
        self.fed = LocalFederation(spec, broker=shared.broker, passwords=shared.passwords)
        self.record = RunRecord(scenario.names, scenario.total_steps)
        self.notes: list[str] = []
        self.cycle_initial = workdir / "cycle-2-initial-model.safetensors"
        self.monitor_port: int | None = None
        self.monitor: dict[str, object] | None = None

    # -------------------------------------------------------------- environments

    def hub_env(self, cycle: int) -> dict[str, str]:
        env = self.fed.hub_env()
        if cycle == 1:
            env["FOLDFED_PARTICIPANTS"] = ",".join(self.s.first_cycle())
        else:
            env.update(
                FOLDFED_CYCLE=str(cycle),
                FOLDFED_FIRST_STEP=str(self.s.steps + 2),
                FOLDFED_STEPS=str(self.s.next_cycle_steps),
                FOLDFED_INITIAL_MODEL=str(self.cycle_initial),
            )
        return env

    def participant_env(self, name: str) -> dict[str, str]:
        p = self.s.participant(name)
        env = self.fed.participant_env(name)
        env[SIM_ENV] = sim_json(self.s.seed, self.s.time_scale, self.s.weight, p.compute)
        if p.bandwidth_bps > 0:
            env["FOLDFED_RATE_LIMIT_BPS"] = str(max(1, round(p.bandwidth_bps)))
        if name in self.s.late_joiners:
            env["FOLDFED_INITIAL_MODEL"] = str(self.cycle_initial)
        return env

    # -------------------------------------------------------------- processes

    def start_hub(self, cycle: int) -> None:
        env = self.hub_env(cycle)
        self.fed.start("aggregator", ["aggregator"], env)
        self.fed.wait_for_log("aggregator", "ingest ready")
        self.fed.start("barrier", ["barrier"], env)

    def start_monitor(self, hub_env: dict[str, str]) -> None:
        """The monitor service, as the hub runs it, on a free local port."""
        self.monitor_port = _free_port()
        env = {
            **hub_env,
            "FOLDFED_STATE_DIR": str(self.workdir / "monitor"),
            "FOLDFED_MONITOR_HOST": "127.0.0.1",
            "FOLDFED_MONITOR_PORT": str(self.monitor_port),
            # Its rule in real seconds is 1 s of excess; here time runs S times faster.
            "FOLDFED_MONITOR_STRAGGLER_MIN_S": str(1.0 / self.s.time_scale),
        }
        self.fed.start("monitor", ["monitor"], env)
        self.fed.wait_for_log("monitor", "monitor ready")

    def monitor_state(self) -> dict[str, object] | None:
        if self.monitor_port is None:
            return None
        from foldfed.monitor.commands import fetch_state

        try:
            return fetch_state(f"http://127.0.0.1:{self.monitor_port}")
        except (OSError, ValueError) as exc:
            self.notes.append(f"the monitor's state could not be read: {exc}")
            return None

    def stop_hub(self) -> None:
        for name in ("barrier", "aggregator"):
            proc = self.fed.processes[name].proc
            proc.terminate()
            proc.wait(30)

    def start_uploader(self, name: str) -> None:
        self.fed.start(f"{name}-uploader", ["uploader"], self.participant_env(name))

    def start_trainer(self, name: str) -> None:
        self.fed.start(f"{name}-trainer", ["sim-trainer"], self.participant_env(name))

    def wait_ready(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.fed.wait_for_log(f"{name}-uploader", "uploader ready")
            self.fed.wait_for_log(f"{name}-trainer", "sim trainer ready")

    def check_alive(self) -> None:
        for process in self.fed.dead():
            if process.name in self._expected_dead:
                continue
            tail = "\n".join(process.log().splitlines()[-15:])
            raise FoldfedError(f"{process.name} exited {process.proc.returncode}:\n{tail}")

    # -------------------------------------------------------------- main

    def run(self, timeout_s: float) -> RunResult:
        self._expected_dead: set[str] = set()
        self.workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(self.shared.reset())
        self.fed.start_broker()  # the shared broker: finds it running, users exist
        write_initial_model(self.fed.initial_model, self.s.delta_elements, self.s.seed)
        try:
            started, ended = asyncio.run(self._drive(timeout_s))
        finally:
            self.fed.stop()
        return self._result(ended - started)

    async def _drive(self, timeout_s: float) -> tuple[float, float]:
        observer = Observer(self.shared.admin_url, self.record)
        await observer.start()
        try:
            first = self.s.first_cycle()
            await asyncio.to_thread(self._start_first, first)
            started = time.monotonic()
            deadline = started + timeout_s
            faults = [asyncio.create_task(self._fault(f, deadline)) for f in self.s.faults]
            try:
                await self._until_done(1, deadline, faults)
                if self.s.late_joiners:
                    await asyncio.to_thread(self._next_cycle)
                    await self._until_done(2, deadline, faults)
                for task in faults:
                    await task  # raises what a fault task raised
                ended = time.monotonic()
                await self._until_participants_hold_final(deadline)
                if self.monitor_port is not None:
                    await asyncio.sleep(0.5)  # the last events reach the monitor
                    self.monitor = await asyncio.to_thread(self.monitor_state)
            finally:
                for task in faults:
                    task.cancel()
        finally:
            await observer.close()
        return started, ended

    def _start_first(self, first: tuple[str, ...]) -> None:
        env = self.hub_env(1)
        # Everything but the barrier starts at once (uploaders wait for their queues,
        # which the aggregator declares): start-up is most of a short run's time.
        self.fed.start("aggregator", ["aggregator"], env)
        for name in first:
            self.start_uploader(name)
            self.start_trainer(name)
        self.fed.wait_for_log("aggregator", "ingest ready")  # topology declared
        if self.s.expect.straggler:
            self.start_monitor(env)
        self.wait_ready(first)
        # The barrier last: step 1 opens when everyone is up, so it measures a step.
        self.fed.start("barrier", ["barrier"], env)

    def _next_cycle(self) -> None:
        """The cycle boundary: the hub is redeployed for cycle 2 with everyone ready."""
        final = self.s.steps + 1
        made = self.fed.hub_dir / "models" / f"model-{final:012d}.safetensors"
        shutil.copyfile(made, self.cycle_initial)
        self.stop_hub()
        for name in self.s.late_joiners:
            self.start_trainer(name)  # its gateway was up; training starts on admission
        self.start_hub(2)
        self.say(f"  cycle 2 starts with {', '.join(self.s.names)}")

    async def _until_done(self, cycle: int, deadline: float, faults: list[asyncio.Task]) -> None:
        while True:
            self.check_alive()
            for task in faults:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            state = await asyncio.to_thread(barrier_state, self.fed.hub_dir)
            if state and state.get("cycle") == cycle and state.get("phase") == "done":
                return
            if time.monotonic() > deadline:
                step = state.get("step") if state else None
                raise FoldfedError(f"{self.s.name}: cycle {cycle} not done in time (step {step})")
            await asyncio.sleep(0.2)

    async def _until_participants_hold_final(self, deadline: float) -> None:
        last = self.s.total_steps + (2 if self.s.late_joiners else 1)
        while True:
            held = {n: self._current(n) for n in self.s.names}
            if all(step == last for step, _ in held.values()):
                return
            if time.monotonic() > deadline:
                raise FoldfedError(f"participants did not all build the final model: {held}")
            await asyncio.sleep(0.1)

    def _current(self, name: str) -> tuple[int, str]:
        path = self.fed.spool_of(name) / "model" / "current.json"
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return -1, ""
        return int(body.get("step", -1)), str(body.get("model_digest", ""))

    # -------------------------------------------------------------- faults

    async def _fault(self, fault, deadline: float) -> None:
        if fault.kind == "late_join":
            await self._wait_step_open(fault.step, deadline)
            self.say(f"  {fault.participant} becomes ready during step {fault.step}")
            await asyncio.to_thread(self.start_uploader, fault.participant)
            self.notes.append(
                f"{fault.participant}'s gateway came up while step {fault.step} of cycle 1 "
                "was open; it was admitted at the cycle boundary."
            )
            return
        await self._wait_step_open(fault.step, deadline)
        chunks = await self._wait_mid_upload(fault, deadline)
        if fault.kind == "disconnect":
            name = f"{fault.participant}-uploader"
            self._expected_dead.add(name)
            await asyncio.to_thread(self.fed.kill, name)
            self.say(f"  SIGKILL {name} after {chunks} chunk(s) of step {fault.step} confirmed")
            await asyncio.sleep(self.s.scaled(fault.down_s))
            await asyncio.to_thread(self.fed.restart, name)
            self._expected_dead.discard(name)
            self.notes.append(
                f"{fault.participant}'s uploader was SIGKILLed during its upload of step "
                f"{fault.step} ({chunks} chunk(s) confirmed) and restarted "
                f"{fault.down_s:g} s (real) later."
            )
        else:
            self.say(f"  broker stops during step {fault.step} ({chunks} chunk(s) confirmed)")
            await asyncio.to_thread(self.shared.broker.stop)
            await asyncio.sleep(self.s.scaled(fault.down_s))
            await asyncio.to_thread(self.shared.broker.start)
            self.say("  broker is back")
            self.notes.append(
                f"The broker was stopped during the uploads of step {fault.step} "
                f"({chunks} chunk(s) confirmed) and started again {fault.down_s:g} s (real) later."
            )

    async def _wait_step_open(self, step: int, deadline: float) -> None:
        while True:
            state = await asyncio.to_thread(barrier_state, self.fed.hub_dir)
            if state and int(state.get("step", 0)) >= step:  # type: ignore[call-overload]
                return
            if time.monotonic() > deadline:
                raise FoldfedError(f"step {step} never opened")
            await asyncio.sleep(0.02)

    async def _wait_mid_upload(self, fault, deadline: float) -> int:
        """Until a chunk of step `fault.step` was confirmed (by the participant, or by
        anyone for a broker restart) and its delivery is not complete yet."""
        names = (fault.participant,) if fault.participant else self.s.first_cycle()
        while True:
            for name in names:
                journal = (
                    self.fed.spool_of(name) / "uploads" / f"step-{fault.step:012d}" / "confirmed"
                )
                confirmed = journal.stat().st_size // 4 if journal.exists() else 0
                if confirmed >= 1:
                    return confirmed
            if time.monotonic() > deadline:
                raise FoldfedError(f"no upload of step {fault.step} seen")
            await asyncio.sleep(0.005)

    # -------------------------------------------------------------- results

    def _result(self, wall_s: float) -> RunResult:
        history = step_history(self.fed.hub_dir)
        metrics: dict[tuple[int, str], ParticipantObs] = {}
        for step, entry in self.record.by_step.items():
            for name, ps in entry.participants.items():
                metrics[(step, name)] = ParticipantObs(
                    compute_s=ps.compute_s,
                    upload_s=ps.upload_s,
                    wait_s=ps.wait_s,
                    bytes_sent=ps.bytes_sent,
                )
        steps = measure(history, metrics)
        plans = plan_run(self.s)
        done = {p.step: self.s.scaled(max(p.done_s.values())) for p in plans}
        overhead = overhead_s(steps, done)
        state = barrier_state(self.fed.hub_dir) or {}
        final = str(state.get("model_digest", ""))
        cycles: dict[int, tuple[str, ...]] = {}
        for obs in history:
            cycles.setdefault(obs.cycle, tuple(sorted(obs.delivered_ms)))
        result = RunResult(
            scenario=self.s,
            workdir=self.workdir,
            wall_s=wall_s,
            steps=steps,
            plans=plans,
            overhead_s=overhead,
            final_digest=final,
            participant_digests={n: self._current(n)[1] for n in self.s.names},
            cycles=cycles,
            notes=list(self.notes),
            monitor=self.monitor,
        )
        gp = self.s.expect.goodput_participant
        if gp:
            p = self.s.participant(gp)
            uploads = [metrics[k] for k in sorted(metrics) if k[1] == gp]
            result.goodput = goodput(uploads, p.bandwidth_bps, self.s.chunk_mib * MIB)
        return result


SIM_ENV = "FOLDFED_LOADTEST_SIM"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ checks


def check_run(result: RunResult) -> list[Check]:
    """The invariants every scenario must hold, and what its `expect` asks for."""
    s = result.scenario
    checks: list[Check] = []
    expected_steps = s.total_steps
    checks.append(
        Check(
            "every step completed",
            len(result.steps) == expected_steps,
            f"{len(result.steps)} of {expected_steps} steps released",
        )
    )
    digests = set(result.participant_digests.values())
    checks.append(
        Check(
            "every participant holds the hub's final model",
            digests == {result.final_digest} and bool(result.final_digest),
            f"hub {result.final_digest[:12]}; participants "
            + ", ".join(f"{n} {d[:12]}" for n, d in sorted(result.participant_digests.items())),
        )
    )
    if s.expect.straggler:
        name = s.expect.straggler
        raw = idle_totals(result.steps).get(name, 0.0) * s.time_scale
        measured = sum(straggler_idle(result, name))
        predicted = totals(result.plans).idle_s.get(name, 0.0)
        err = relative_error(measured, predicted)
        ci = straggler_ci(result, name)
        # The bound is the tolerance, never widened. The run's own noise (95 %
        # confidence interval of the sum, from the per-step spread) is reported beside it:
        # when it is wider than the tolerance, a failure says "run longer", not "wrong".
        checks.append(
            Check(
                f"extra wall time due to {name} matches the prediction within "
                f"{s.expect.tolerance:.0%}",
                err <= s.expect.tolerance,
                f"measured {measured:,.0f} s, predicted {predicted:,.0f} s (real), "
                f"error {err:.1%}; the run's 95% confidence interval is +/-{ci:.1%} "
                f"(the barrier's idle x S is {raw:,.0f} s; the difference, "
                f"{raw - measured:+,.0f} s, is {name}'s delivery path time beyond the "
                f"next-slowest's, service time converted at 1x instead of x S: see the report)",
            )
        )
        charged = idle_totals(result.steps)
        top = max(charged.items(), key=lambda kv: kv[1])[0] if charged else ""
        checks.append(
            Check(
                f"the barrier's idle time is attributed to {name}",
                top == name,
                "idle charged (real s): "
                + ", ".join(f"{n} {v * s.time_scale:,.0f}" for n, v in sorted(charged.items())),
            )
        )
    if s.expect.straggler:
        checks.append(monitor_check(result, s.expect.straggler))
    if s.expect.goodput_participant and result.goodput is not None:
        g = result.goodput
        checks.append(
            Check(
                f"goodput on {s.expect.goodput_participant}'s emulated link >= "
                f"{s.expect.goodput_min:.0%} of its bandwidth",
                g.link_share >= s.expect.goodput_min,
                f"{g.bytes_sent / MIB:.1f} MiB in {g.seconds:.2f} s: {g.bytes_per_s / 1e6:.3f} "
                f"MB/s on a {g.rate_bps / 1e6:.3f} MB/s link; share of what the link "
                f"allowed {g.link_share:.1%}",
            )
        )
    if s.expect.same_digest_as_undisturbed:
        checks.append(
            Check(
                "same final model as an undisturbed run with the same seeds",
                bool(result.reference_digest) and result.reference_digest == result.final_digest,
                f"disturbed {result.final_digest[:16]}, undisturbed "
                f"{result.reference_digest[:16] or '(not run)'}",
            )
        )
    for late in s.late_joiners:
        cycle1 = [m for m in result.steps if m.cycle == 1]
        cycle2 = [m for m in result.steps if m.cycle == 2]
        in1 = [m.step for m in cycle1 if late in m.arrive_s]
        checks.append(
            Check(
                f"{late} is not part of cycle 1 and the barrier never waited for it",
                not in1 and late not in result.cycles.get(1, ()) and len(cycle1) == s.steps,
                f"cycle 1: {len(cycle1)} steps closed with {', '.join(result.cycles.get(1, ()))}"
                + (f"; {late} delivered in {in1}" if in1 else ""),
            )
        )
        first2 = s.steps + 2
        joined = sorted(m.step for m in cycle2 if late in m.arrive_s)
        checks.append(
            Check(
                f"{late} is admitted at the cycle boundary (cycle 2, step {first2})",
                bool(joined) and joined[0] == first2 and len(joined) == s.next_cycle_steps,
                f"{late} delivered in steps {joined}",
            )
        )
    return checks


def straggler_idle(result: RunResult, name: str) -> list[float]:
    """Per step, the idle charged to the straggler in real seconds, its delivery path's
    excess over the next-to-last one's converted at 1x (`timeline.straggler_real_idle`)."""
    s = result.scenario
    transfer = {p.name: transfer_run_seconds(p, s) for p in s.participants}
    return straggler_real_idle(result.steps, name, s.time_scale, transfer)


def straggler_ci(result: RunResult, name: str) -> float:
    """Half-width of the 95 % confidence interval of the straggler's summed idle (real,
    `straggler_idle`), relative to the prediction: 1.96 x the per-step standard deviation
    x sqrt(steps) (sum of independent steps)."""
    values = straggler_idle(result, name)
    predicted = totals(result.plans).idle_s.get(name, 0.0)
    if len(values) < 2 or predicted <= 0:
        return 0.0
    spread = statistics.stdev(values) * math.sqrt(len(values))
    return 1.96 * spread / predicted


def lead_over(result: RunResult, name: str, other: str) -> tuple[float, float]:
    """Mean and standard error of `name`'s delivery minus `other`'s per step (run seconds,
    signed: noise averages out instead of being clipped at the barrier)."""
    leads = [
        m.arrive_s[name] - m.arrive_s[other]
        for m in result.steps
        if name in m.arrive_s and other in m.arrive_s
    ]
    if len(leads) < 2:
        return (leads[0] if leads else 0.0), 0.0
    return statistics.fmean(leads), statistics.stdev(leads) / math.sqrt(len(leads))


def monitor_idle(result: RunResult) -> dict[str, float]:
    """Barrier idle per participant as the monitor service attributed it (run seconds)."""
    table = (result.monitor or {}).get("table") or []
    return {
        str(row["participant"]): float(row.get("idle_s") or 0.0)
        for row in table  # type: ignore[union-attr]
        if isinstance(row, dict)
    }


def monitor_check(result: RunResult, name: str) -> Check:
    # Only the idle attribution singles one site out; the monitor's straggler flag compares
    # each site with the median of the others, so a site slower than most (site-d next to
    # the staggered fast sites) may be flagged beside the straggler.
    what = f"the monitor service attributes the idle time to {name} and flags it"
    if result.monitor is None:
        return Check(what, False, "the monitor's /api/state was not read")
    idle = monitor_idle(result)
    flagged = sorted(
        str(row["participant"])
        for row in result.monitor.get("table") or []  # type: ignore[union-attr]
        if isinstance(row, dict) and row.get("straggler")
    )
    top = max(idle.items(), key=lambda kv: kv[1])[0] if idle else ""
    S = result.scenario.time_scale
    ours = idle_totals(result.steps).get(name, 0.0)
    return Check(
        what,
        top == name and name in flagged,
        "monitor idle (real s): "
        + ", ".join(f"{n} {v * S:,.0f}" for n, v in sorted(idle.items()))
        + f"; stragglers flagged: {flagged or 'none'}; the report's own measure for {name}: "
        f"{ours * S:,.0f} s",
    )


def run_scenario(
    scenario: Scenario, workdir: Path, shared: SharedBroker, say: Say = print
) -> RunResult:
    """The scenario (and, when its expectations need one, an undisturbed reference run)."""
    timeout = 120.0 + 4 * sum(p.wall_s for p in plan_run(scenario)) / scenario.time_scale
    reference = ""
    if scenario.expect.same_digest_as_undisturbed:
        say(f"{scenario.name}: undisturbed reference run")
        ref = Run(scenario.undisturbed(), workdir / "undisturbed", shared, say).run(timeout)
        reference = ref.final_digest
    say(
        f"{scenario.name}: {len(scenario.names)} participants, {scenario.total_steps} steps, "
        f"time scale {scenario.time_scale:g}"
    )
    result = Run(scenario, workdir / "run", shared, say).run(timeout)
    result.reference_digest = reference
    result.workdir = workdir  # the report sits beside the run's folders
    result.checks = check_run(result)
    return result


def default_root() -> Path:
    return Path(os.environ.get("FOLDFED_LOADTEST_DIR", "var/loadtest"))

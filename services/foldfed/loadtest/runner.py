"""Runs a scenario against the real broker, the real hub services, the real uploaders and
the real trainer processes (`foldfed trainer` with the `sim` model family: training is a
wait of the scenario's compute time, everything else is the real trainer's spool path).
Faults are real: SIGKILL of an uploader in the middle of its upload, a broker stop/start, a
site whose gateway comes up mid-cycle.

Orchestration only: which processes start when, the faults, and the measurements. One
broker serves a whole `foldfed loadtest all` (each run starts from deleted queues and
fresh state folders); each run's processes come from `demo.cluster.LocalFederation`. The
measurements come from the barrier's own store (when each step opened, who delivered
when, when it closed and was released: hub clock) and from the participants' events
(compute, upload, wait, bytes), watched like the demo does (`demo.observer`). Whether the
run holds the scenario's expectations is verdicts.py's to say.

One concept, running a scenario, in more than 400 lines: the cycle boundary and the
faults are steps of the same run and share its processes and clock.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from foldfed import hubctl
from foldfed.codecs import codec_from_spec, wire_size
from foldfed.credentials import new_password
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.observer import Observer, RunRecord
from foldfed.errors import CodecError, FoldfedError
from foldfed.loadtest.barrierlog import barrier_state, step_history
from foldfed.loadtest.distributions import compute_seconds
from foldfed.loadtest.footprint import disk_per_step, growth_after_warmup, rss_peak
from foldfed.loadtest.predict import plan_run
from foldfed.loadtest.sampler import FootprintSampler
from foldfed.loadtest.scenario import MIB, Scenario
from foldfed.loadtest.sums import check_run as check_sums
from foldfed.loadtest.timeline import (
    ParticipantObs,
    SpoolTimes,
    goodput,
    measure,
    overhead_s,
)
from foldfed.loadtest.verdicts import RunResult, check_codec_runs, check_run
from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
from foldfed.settings import env_for, load

if TYPE_CHECKING:
    from foldfed.demo.interrupts import StopOnSignals
    from foldfed.trainer.backends.sim import SimSettings

log = structlog.get_logger(__name__)
# Spool polling of the uploader and the trainer: fine enough not to blur steps.
POLL_S = 0.01
Say = Callable[[str], None]
# The hub's processes besides RabbitMQ whose memory the run samples (if started).
HUB_PROCESSES = ("aggregator", "barrier", "monitor")


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
        ensure_rabbitmq_installed()
        self.admin_url = self.broker.start()
        for name in self.names:
            self.passwords[name] = new_password()
            self.broker.add_participant(name, self.passwords[name])

    def stop(self) -> None:
        if self._own:
            self.broker.stop()
        else:
            asyncio.run(self.reset())

    async def reset(self) -> None:
        """Delete every foldfed queue: each run starts from an empty broker state."""
        await hubctl.delete_queues(self.admin_url, self.names)


# ------------------------------------------------------------------ the run


class Run:
    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        shared: SharedBroker,
        say: Say = print,
        signals: StopOnSignals | None = None,
    ) -> None:
        """`signals`: the command's; a stop signal stops this run's processes too."""
        self.s = scenario
        self.workdir = workdir
        # This run's own folder starts empty: a barrier store left by an earlier run into
        # the same --out would read as a finished cycle before this one began.
        shutil.rmtree(workdir, ignore_errors=True)
        self.shared = shared
        self.say = say
        spec = FederationSpec(
            participants=scenario.names,
            steps=scenario.steps,
            workdir=workdir,
            common_env=env_for(
                chunk_size=scenario.chunk_mib * MIB,
                poll_s=POLL_S,
                reply_timeout_s=10.0,
                seed=scenario.seed,
                # Span files cost CPU per message on a 2-core machine; tracing's own
                # overhead is bench/tracing_overhead.py's subject, not this one's.
                tracing=False,
                retain_steps=scenario.retain_steps,
                retain_checkpoint_every=scenario.retain_checkpoint_every,
            ),
        )
        self.fed = LocalFederation(spec, broker=shared.broker, passwords=shared.passwords)
        if signals is not None:
            signals.track(self.fed.stop, self.fed.terminate)
        self.record = RunRecord(scenario.names, scenario.total_steps)
        self.notes: list[str] = []
        self.cycle_initial = workdir / "cycle-2-initial-model.safetensors"
        self.monitor_port: int | None = None
        self.monitor: dict[str, object] | None = None
        self.sampler: FootprintSampler | None = None

    # -------------------------------------------------------------- environments

    def hub_env(self, cycle: int) -> dict[str, str]:
        codec = self.s.codec
        coding = env_for(codec=codec.uplink, downlink_codec=codec.downlink)
        if cycle == 1:
            return {
                **self.fed.hub_env(),
                **coding,
                **env_for(participants=self.s.first_cycle()),
            }
        return {
            **self.fed.hub_env(),
            **coding,
            **env_for(
                cycle=cycle,
                first_step=self.s.steps + 2,
                steps=self.s.next_cycle_steps,
                initial_model=self.cycle_initial,
            ),
        }

    def participant_env(self, name: str) -> dict[str, str]:
        p = self.s.participant(name)
        # The site's link, emulated each way at its rate: the measured step includes the
        # real download of the global update, not an analytic stand-in.
        link = max(1, round(p.bandwidth_bps)) if p.bandwidth_bps > 0 else None
        own = env_for(
            rate_limit_bps=link,
            download_rate_limit_bps=link,
            initial_model=self.cycle_initial if name in self.s.late_joiners else None,
            upload_budget_s=self.s.scaled(self.s.upload_budget_s) or None,
        )
        return {**self.fed.participant_env(name), **sim_settings(self.s, name).env(), **own}

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
            **env_for(
                state_dir=self.workdir / "monitor",
                monitor_host="127.0.0.1",
                monitor_port=self.monitor_port,
                # Its rule in real seconds is 1 s of excess; here time runs S times faster.
                monitor_straggler_min_s=1.0 / self.s.time_scale,
            ),
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
        self.fed.start(f"{name}-trainer", ["trainer"], self.participant_env(name))

    def wait_ready(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.fed.wait_for_log(f"{name}-uploader", "uploader ready")
            self.fed.wait_for_log(f"{name}-trainer", "trainer ready")

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
        _write_initial_model(self.fed.initial_model, self.s)
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
            self.sampler = self._sampler().start()
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
            if self.sampler is not None:
                self.sampler.stop()
            await observer.close()
        return started, ended

    def _sampler(self) -> FootprintSampler:
        """Samples the hub's RSS (RabbitMQ, aggregator, barrier, monitor) and the bytes on
        disk of the hub, the participants' spools and the broker while the run lasts."""

        def hub_pids() -> dict[str, int | None]:
            try:
                beam = self.shared.broker.status().pid
            except (OSError, FoldfedError):  # mid-restart (broker_restart): none now
                beam = None
            pids: dict[str, int | None] = {"rabbitmq": beam}
            for name in HUB_PROCESSES:
                process = self.fed.processes.get(name)
                pids[name] = process.proc.pid if process and process.alive() else None
            return pids

        return FootprintSampler(
            hub_pids,
            self.fed.hub_dir,
            [self.fed.spool_of(n) for n in self.s.names],
            self.shared.broker.data_dir / "mnesia",
        )

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
                    upload_link_s=ps.upload_link_s,
                    download_s=ps.download_s,
                    upload_send_s=ps.upload_send_s,
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
        result.opened_ms = {obs.step: obs.opened_ms for obs in history}
        result.spool_times = self._spool_times(list(metrics))
        samples = self.sampler.samples if self.sampler else []
        result.rss = rss_peak(samples)
        result.disk = disk_per_step(samples, history)
        if self.s.expect.disk_flat_after:
            result.growth = growth_after_warmup(result.disk, self.s.expect.disk_flat_after)
        if self.s.expect.exact_sums:
            self.say(f"{self.s.name}: checking each step's update against the deltas (numpy)")
            result.sums = check_sums(
                self.fed.hub_dir,
                {n: self.fed.spool_of(n) for n in self.s.names},
                {n: self.s.weight for n in self.s.names},
                {m.step: tuple(m.arrive_s) for m in steps},
            )
        gp = self.s.expect.goodput_participant
        if gp:
            p = self.s.participant(gp)
            uploads = [metrics[k] for k in sorted(metrics) if k[1] == gp]
            result.goodput = goodput(uploads, p.bandwidth_bps, self.s.chunk_mib * MIB)
        return result

    def _spool_times(self, keys: list[tuple[int, str]]) -> dict[tuple[int, str], SpoolTimes]:
        """Per (step, participant): when its delta was handed to the uploader (the mtime of
        its description, `outbox/delta-<t>.json`, kept as `.sent`: a rename keeps it) and
        marked sent (the rename's ctime, after the hub's receipt came)."""
        out: dict[tuple[int, str], SpoolTimes] = {}
        for step, name in keys:
            sent = self.fed.spool_of(name) / "outbox" / f"delta-{step:012d}.sent"
            try:
                st = sent.stat()
            except OSError:
                continue
            out[(step, name)] = SpoolTimes(st.st_mtime_ns // 1_000_000, st.st_ctime_ns // 1_000_000)
        return out


def sim_settings(scenario: Scenario, name: str) -> SimSettings:
    """A participant's trainer settings for the `sim` family: its compute time of every step
    the scenario can release (drawn from its distribution, in run seconds), the delta's
    weight and the model's size."""
    from foldfed.trainer.backends.sim import SimSettings

    compute = scenario.participant(name).compute
    # Cycle 1's steps, its final release, then cycle 2's steps and final release.
    last = scenario.total_steps + 2
    draws = {
        step: compute_seconds(compute, scenario.seed, name, step) / scenario.time_scale
        for step in range(1, last + 1)
    }
    return SimSettings(weight=scenario.weight, elements=scenario.delta_elements, compute_s=draws)


def _write_initial_model(path: Path, scenario: Scenario) -> None:
    """θ_0 of the scenario's size, as `foldfed initial-model` writes it for the sim family."""
    from foldfed.trainer.families import load_family

    settings = load(sim_settings(scenario, scenario.names[0]).env())
    load_family("sim").write_initial_model(path, settings, scenario.seed)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def size_codecs(scenario: Scenario) -> Scenario:
    """The scenario with each compared codec's wire bytes per run-size delta (checked specs:
    a downlink codec may not share ranges)."""
    sized = []
    chunk = scenario.chunk_mib * MIB
    for i, pair in enumerate(scenario.codecs):
        for key, spec in (("uplink", pair.uplink), ("downlink", pair.downlink)):
            try:
                codec = codec_from_spec(spec)
            except CodecError as exc:
                raise CodecError(f"{scenario.name}: codecs[{i}].{key}: {exc}") from None
            if key == "downlink" and codec.linear_shared:
                raise CodecError(f"{scenario.name}: codecs[{i}].downlink shares ranges")
        up, down = (
            0 if spec == "fp32:v1" else wire_size(spec, scenario.delta_elements, chunk)
            for spec in (pair.uplink, pair.downlink)
        )
        sized.append(replace(pair, uplink_bytes_run=up, downlink_bytes_run=down))
    return replace(scenario, codecs=tuple(sized))


def run_scenario(
    scenario: Scenario,
    workdir: Path,
    shared: SharedBroker,
    say: Say = print,
    signals: StopOnSignals | None = None,
) -> RunResult:
    """The scenario; with several codecs, one run per codec (same seeds), the last one's
    result carrying them all (`codec_runs`); with `expect.comm_within_compute`, each
    codec's run again on unlimited links (`links_off`). `signals`: the command's, so that a stop
    signal stops the processes of every run too."""
    scenario = size_codecs(scenario)
    if len(scenario.codecs) < 2:
        return _run_one(scenario, workdir, shared, say, signals)
    runs = []
    for i, pair in enumerate(scenario.codecs):
        say(f"{scenario.name}: codec {pair.label}")
        one = scenario.with_codec(i)
        run = _run_one(one, workdir / f"codec{i}", shared, say, signals)
        if scenario.expect.comm_within_compute:
            # The same seeds on unlimited links: the baseline the links' share is
            # measured against (verdicts.codec_figures).
            say(f"{scenario.name}: codec {pair.label}, links off")
            free = one.without_links()
            run.links_off = _run_one(free, workdir / f"codec{i}-nolinks", shared, say, signals)
        runs.append(run)
    combined = replace(runs[-1], scenario=scenario, workdir=workdir, codec_runs=runs)
    combined.checks = check_codec_runs(combined)
    return combined


def _run_one(
    scenario: Scenario,
    workdir: Path,
    shared: SharedBroker,
    say: Say,
    signals: StopOnSignals | None = None,
) -> RunResult:
    """One scenario run (and, when its expectations need one, an undisturbed reference)."""
    timeout = 120.0 + 4 * sum(p.wall_s for p in plan_run(scenario)) / scenario.time_scale
    # The services' own time, which the plan leaves out (it is all there is on unlimited
    # links with no compute): per step, a floor of 10 MB/s for every delta's bytes through
    # a loaded 2-core machine, and 10 s of hand-offs.
    per_step = 10.0 + len(scenario.names) * scenario.delta_bytes_run / 10e6
    timeout += per_step * scenario.total_steps
    reference = ""
    if scenario.expect.same_digest_as_undisturbed:
        say(f"{scenario.name}: undisturbed reference run")
        undisturbed = Run(scenario.undisturbed(), workdir / "undisturbed", shared, say, signals)
        reference = undisturbed.run(timeout).final_digest
    say(
        f"{scenario.name}: {len(scenario.names)} participants, {scenario.total_steps} steps, "
        f"time scale {scenario.time_scale:g}"
    )
    result = Run(scenario, workdir / "run", shared, say, signals).run(timeout)
    result.reference_digest = reference
    result.workdir = workdir  # the report sits beside the run's folders
    result.checks = check_run(result)
    return result


def default_root() -> Path:
    return load().loadtest_dir

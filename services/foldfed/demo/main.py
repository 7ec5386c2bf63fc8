"""`foldfed demo`: start a private broker, the hub and N participants as processes, run R
global steps of the CPU task (or, with `--model openfold3-tiny`, of OpenFold3 on the real
sample), show progress, and end with a summary and pictures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.interrupts import StopOnSignals, exit_status
from foldfed.demo.observer import Observer, RunRecord
from foldfed.demo.report import (
    codec_env,
    human_bytes,
    save_loss_curve,
    save_timeline,
    summary_text,
    wire_text,
)
from foldfed.domain import DeliveryReceipt, Event
from foldfed.errors import FoldfedError
from foldfed.settings import env_for, load
from foldfed.trainer.families import load_family

# No event for this long while a step is open: say who the barrier is waiting for.
STALL_NOTICE_S = 30.0


@dataclass(frozen=True)
class DemoOptions:
    participants: int = 3
    steps: int = 5
    workdir: Path = Path("var/demo")
    seed: int = 0
    timeout_s: float = 1800.0
    # A family of trainer/backend.py: "mlp" (the small CPU task) or "openfold3-tiny" /
    # "openfold3-full" on the real sample (prepared in `sample_dir` if missing).
    model: str = "mlp"
    sample_dir: Path = Path("var/of3-sample")
    # A pair of demo.report.CODECS: the uplink and downlink codec specs.
    codec: str = "rot2+zstd"
    # Pairwise-masked secure aggregation (foldfed.secagg): the hub sees only masked deltas.
    # The uplink is then the masked fixed-point grid (uplink codecs do not compose with
    # the masks); the downlink keeps `codec`'s.
    secure_aggregation: bool = False


def participant_names(n: int) -> tuple[str, ...]:
    return tuple(f"company-{chr(ord('a') + i)}" for i in range(n))


def run_demo(options: DemoOptions) -> int:
    workdir = options.workdir / time.strftime("%Y%m%d-%H%M%S")
    family = load_family(options.model)  # a bad name fails before anything starts
    names = participant_names(options.participants)
    common_env = {
        **env_for(seed=options.seed, model=options.model),
        **family.demo_env(names, options.sample_dir),
        **codec_env(options.codec),
        **(secure_env() if options.secure_aggregation else {}),
    }
    spec = FederationSpec(
        participants=names,
        steps=options.steps,
        workdir=workdir,
        common_env=common_env,
        monitor_port=0,
    )
    federation = LocalFederation(spec)
    print(
        f"foldfed demo: {options.participants} participants, {options.steps} global steps, "
        f"model {options.model}, codec {options.codec}"
        + (", secure aggregation (masked fp32 uplink)" if options.secure_aggregation else "")
    )
    print(f"  working folder {workdir} (logs in {federation.logs})")
    record = RunRecord(spec.participants, spec.steps)
    try:
        # SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop the services and the broker, whatever
        # was starting or running (docs/shutdown.md).
        with StopOnSignals() as signals:
            signals.track(federation.stop, federation.terminate)
            try:
                print("  starting a private RabbitMQ ...", flush=True)
                federation.start_broker()
                family.write_initial_model(federation.initial_model, load(common_env), options.seed)
                asyncio.run(_watch(federation, record, options.timeout_s))
            finally:
                federation.stop()
    except KeyboardInterrupt as exc:
        print("interrupted: the services and the broker of this run are stopped")
        return exit_status(exc)
    print(summary_text(record))
    print(wire_text(record, federation.hub_dir))
    curve = save_loss_curve(record, workdir / "loss.png")
    timeline = save_timeline(record, workdir / "timeline.png")
    pictures = [curve, timeline, *_evaluation_table(record, workdir)]
    print(f"\npictures: {'  '.join(map(str, pictures))}")
    print(f"traces: foldfed trace STEP --dir {federation.trace_dir}  (one trace per step)")
    return 0 if not record.mismatches else 1


def secure_env() -> dict[str, str]:
    """Every process's variables for secure aggregation: masks on, the exact uplink."""
    return {**env_for(secure_aggregation=True), "FOLDFED_CODEC": "fp32:v1"}


def _evaluation_table(record: RunRecord, workdir: Path) -> list[Path]:
    """The federated evaluation table (docs/federated_evaluation.md), from the model
    reports the run saw (the hub's copy: `foldfed eval table WORKDIR`); its picture."""
    from foldfed.evaluation.plot import save_table_png
    from foldfed.evaluation.table import Report, build_table, render_text

    reports = [Report(s, p, r.metrics) for (s, p), r in sorted(record.reports.items())]
    table = build_table(reports)
    if not table.companies:
        return []  # a family without release evaluation (mlp)
    print("\n" + render_text(table))
    print(f"(the hub's copy: foldfed eval table {workdir})")
    return [save_table_png(table, workdir / "evaluation.png")]


async def _watch(federation: LocalFederation, record: RunRecord, timeout_s: float) -> None:
    observer = Observer(federation.admin_url, record)
    await observer.start()
    await asyncio.to_thread(federation.start_all)
    if federation.monitor_url:
        url = federation.monitor_url
        print(f"  dashboard {url}  (terminal: foldfed status --url {url})", flush=True)
    try:
        await _progress(federation, record, observer, timeout_s)
    finally:
        await observer.close()


async def _progress(
    federation: LocalFederation, record: RunRecord, observer: Observer, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    bars: dict[int, tqdm] = {}
    last_event = time.monotonic()
    while not record.finished():
        _check_alive(federation)
        if time.monotonic() > deadline:
            raise FoldfedError(f"the run did not finish within {timeout_s:g} s")
        try:
            msg = await asyncio.wait_for(observer.updates.get(), 1.0)
        except TimeoutError:
            if time.monotonic() - last_event > STALL_NOTICE_S:
                _stall_notice(record)
                last_event = time.monotonic()
            continue
        last_event = time.monotonic()
        _update_bars(bars, record, msg)
    for bar in bars.values():
        bar.close()


def _update_bars(bars: dict[int, tqdm], record: RunRecord, msg: object) -> None:
    step = getattr(msg, "step", None)
    if step is None or step > record.steps:
        return
    if step not in bars:
        # One live bar at a time: finished steps stay on screen as they ended.
        for earlier in [s for s in bars if s < step]:
            bars.pop(earlier).close()
        if any(s > step for s in bars):
            return
        bars[step] = tqdm(
            total=len(record.participants), desc=f"step {step}", unit="delivered", leave=True
        )
    bar = bars[step]
    entry = record.step(step)
    delivered = sum(1 for s in entry.participants.values() if s.delivered_at is not None)
    moved = sum(s.bytes_sent for s in entry.participants.values())
    if isinstance(msg, DeliveryReceipt | Event):
        bar.n = delivered
        waiting = [p for p in record.participants if entry.of(p).delivered_at is None]
        bar.set_postfix_str(
            f"{human_bytes(moved)} moved"
            + (f", waiting for {', '.join(waiting)}" if waiting else ", all delivered")
        )
        bar.refresh()


def _stall_notice(record: RunRecord) -> None:
    open_steps = [s for s, e in record.by_step.items() if e.finalized_at is None]
    if not open_steps:
        return
    step = min(open_steps)
    waiting = [p for p in record.participants if record.step(step).of(p).delivered_at is None]
    tqdm.write(f"step {step}: still waiting for {', '.join(waiting) or 'the aggregator'}")


def _check_alive(federation: LocalFederation) -> None:
    for process in federation.dead():
        if process.name in federation.crash_env and process.name not in federation.restarted:
            continue  # armed with a crash point: its death is the test's to handle
        tail = "\n".join(process.log().splitlines()[-20:])
        raise FoldfedError(f"{process.name} exited with {process.proc.returncode}:\n{tail}")

"""`foldfed loadtest SCENARIO|all [--smoke]`. The runner starts the real `foldfed trainer`
with the `sim` model family per participant. Nothing heavy is imported at module level."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

# Where the shipped scenarios live: loadtest/ at the repository root.
SCENARIO_DIR = Path(__file__).resolve().parents[3] / "loadtest"
# `all` runs these, in this order (cheap and fault scenarios first).
ALL = (
    "slow-link",
    "seed-consortium",
    "flaky-link",
    "broker-restart",
    "late-joiner",
    "seed-straggler",
    "seed-straggler-500",
    "peer-5x256",
    "long-run",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="straggler, slow-link and fault scenarios against the real services",
    )
    p.add_argument("scenario", help="a scenario name (loadtest/NAME.yaml), a YAML path, or all")
    p.add_argument("--smoke", action="store_true", help="a few steps of each (CI)")
    p.add_argument("--out", default="", help="folder for the run (default var/loadtest/<time>)")
    p.set_defaults(func=cmd_loadtest)


# The smoke set leaves out seed-straggler-500: it is seed-straggler at another scale, and
# a few steps of it show nothing more; and long-run, whose 10-step smoke costs ~30 s here
# (mostly its twelve processes' start-up) for what the footprint unit tests and every
# other smoke's disk series already cover (tests/test_loadtest_footprint.py).
SMOKE = tuple(name for name in ALL if name not in ("seed-straggler-500", "long-run"))


def scenario_paths(arg: str, smoke: bool = False) -> list[Path]:
    if arg == "all":
        return [SCENARIO_DIR / f"{name}.yaml" for name in (SMOKE if smoke else ALL)]
    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return [path]
    return [SCENARIO_DIR / f"{arg}.yaml"]


def cmd_loadtest(args: argparse.Namespace) -> int:
    from foldfed.demo.interrupts import StopOnSignals, exit_status
    from foldfed.errors import FoldfedError
    from foldfed.loadtest.footprint_report import result_line
    from foldfed.loadtest.report import write_index, write_report
    from foldfed.loadtest.runner import SharedBroker, default_root, run_scenario
    from foldfed.loadtest.scenario import ScenarioError, load_scenario
    from foldfed.loadtest.verdicts import RunResult

    try:
        scenarios = []
        for path in scenario_paths(args.scenario, args.smoke):
            if not path.is_file():
                raise ScenarioError(f"no scenario file {path}")
            scenario = load_scenario(path.read_text())
            scenarios.append(scenario.smoke() if args.smoke else scenario)
    except ScenarioError as exc:
        print(f"foldfed loadtest: {exc}", file=sys.stderr)
        return 2
    # The runner's own event watcher reconnects through a broker restart on purpose; the
    # AMQP libraries' tracebacks about it would drown the results.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = Path(args.out) if args.out else default_root() / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    names = tuple(sorted({n for s in scenarios for n in s.names}))
    shared = SharedBroker(root / "broker", names)
    results: list[RunResult] = []
    started = time.monotonic()
    failed: list[str] = []
    try:
        # SIGTERM, SIGINT and SIGHUP stop every run's services and the broker, whatever
        # was starting or running (docs/shutdown.md).
        with StopOnSignals() as signals:
            signals.track(shared.stop)
            try:
                shared.start()
                for scenario in scenarios:
                    try:
                        result = run_scenario(
                            scenario, root / scenario.name, shared, signals=signals
                        )
                    except FoldfedError as exc:
                        print(f"{scenario.name}: FAILED to run: {exc}", file=sys.stderr)
                        failed.append(scenario.name)
                        continue
                    report = write_report(result)
                    results.append(result)
                    for check in result.checks:
                        verdict = check.verdict(scenario.smoke_run)
                        print(f"  [{verdict}] {check.name}: {check.detail}")
                    print(f"  report: {report}")
                    print(f"  {result_line(result)}")
            finally:
                shared.stop()
    except KeyboardInterrupt as exc:
        print("interrupted: the services and the broker of this load test are stopped")
        return exit_status(exc)
    total = time.monotonic() - started
    index = write_index(results, root, total, failed)
    print(f"\n{len(results)} scenario(s) in {total:.0f} s; summary: {index}")
    ok = not failed and all(r.ok for r in results)
    return 0 if ok else 1

"""The one command line: `foldfed <service|tool> ...`.

Each service's `main` builds its settings from the environment, its broker connection and
its stores, and runs until SIGTERM/SIGINT, then shuts down gracefully (runtime.py). This
module is the console entry point only: nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from foldfed.errors import FoldfedError

if TYPE_CHECKING:
    from foldfed.localbroker import BrokerStatus

# Feature packages that add their own subcommands: each names a module with
# `register(sub)`, which must import nothing heavy (torch, openfold3) at module level, so
# `foldfed --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "foldfed.deploy.commands",
    "foldfed.monitor.commands",
    "foldfed.tracing.commands",
    "foldfed.loadtest.commands",
    "foldfed.of3.data.commands",
    "foldfed.of3.eval_commands",
    "foldfed.governance.commands",
    "foldfed.gate.commands",
    "foldfed.barrier.commands",
    "foldfed.verifier.commands",
    "foldfed.evaluation.commands",
)


def cmd_broker(args: argparse.Namespace) -> int:
    from foldfed.localbroker import LocalBroker, ensure_rabbitmq_installed
    from foldfed.localbroker.cluster import is_cluster_dir
    from foldfed.settings import load

    # Resolved here, not when the parser is built: a bad environment fails this command.
    folder = Path(args.dir) if args.dir else load().broker_dir
    if args.nodes > 1 or is_cluster_dir(folder):
        return _cmd_cluster(args, folder)
    broker = LocalBroker(folder, port=args.port)
    if args.action == "start":
        ensure_rabbitmq_installed()
        url = broker.start()
        print(url)
    elif args.action == "stop":
        broker.stop()
        print("stopped")
    else:
        status = broker.status()
        print(json.dumps(_node_status(status)))
        return 0 if status.running else 3
    return 0


def _node_status(status: BrokerStatus) -> dict[str, object]:
    return {
        "running": status.running,
        "pid": status.pid,
        "port": status.port,
        "amqp_url": status.amqp_url,
        "data_dir": str(status.data_dir),
    }


def _cmd_cluster(args: argparse.Namespace, folder: Path) -> int:
    """`broker start --nodes N` and the stop/status of a folder that holds a cluster:
    start prints every node's admin URL, node 1 first, one per line."""
    from foldfed.localbroker.cluster import LocalCluster

    if args.port is not None:
        raise SystemExit("--port applies to one node; a cluster picks free ports")
    if args.action == "start":
        cluster = LocalCluster(folder, args.nodes) if args.nodes > 1 else None
        cluster = cluster or LocalCluster.open(folder)
        print("\n".join(cluster.start()))
        return 0
    cluster = LocalCluster.open(folder)
    if args.action == "stop":
        cluster.stop()
        print("stopped")
        return 0
    status = cluster.status()
    nodes = [_node_status(node) for node in status.nodes]
    print(json.dumps({"running": status.running, "members": status.members, "nodes": nodes}))
    return 0 if status.running else 3


def cmd_ingest(args: argparse.Namespace) -> int:
    from foldfed.config import IngestSettings
    from foldfed.ingest.service import run_ingest
    from foldfed.runtime import run_service

    settings = IngestSettings.from_env()
    run_service("ingest", lambda stop: run_ingest(settings, stop))
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from foldfed.aggregator.service import run_aggregator
    from foldfed.config import AggregatorSettings
    from foldfed.runtime import run_service

    settings = AggregatorSettings.from_env()
    run_service("aggregator", lambda stop: run_aggregator(settings, stop))
    return 0


def cmd_barrier(args: argparse.Namespace) -> int:
    from foldfed.barrier.service import run_barrier
    from foldfed.config import BarrierSettings
    from foldfed.runtime import run_service

    settings = BarrierSettings.from_env()
    run_service("barrier", lambda stop: run_barrier(settings, stop))
    return 0


def cmd_uploader(args: argparse.Namespace) -> int:
    from foldfed.config import UploaderSettings
    from foldfed.runtime import run_service
    from foldfed.uploader.service import run_uploader

    settings = UploaderSettings.from_env()
    run_service(
        "uploader", lambda stop: run_uploader(settings, stop), participant=settings.participant
    )
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from foldfed.runtime import run_service
    from foldfed.trainer.families import trainer_settings_from_env
    from foldfed.trainer.service import run_trainer

    settings = trainer_settings_from_env()
    run_service(
        "trainer", lambda stop: run_trainer(settings, stop), participant=settings.participant
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from foldfed.demo.main import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            participants=args.participants,
            steps=args.steps,
            workdir=Path(args.workdir),
            seed=args.seed,
            model=args.model,
            sample_dir=Path(args.sample_dir),
            codec=args.codec,
            secure_aggregation=args.secure_aggregation,
        )
    )


def cmd_upload(args: argparse.Namespace) -> int:
    from foldfed.config import UploaderSettings
    from foldfed.logs import configure_logging
    from foldfed.tracing import setup_tracing
    from foldfed.uploader.upload import run_upload

    settings = UploaderSettings.from_env()
    configure_logging("uploader", settings.participant)
    setup_tracing("uploader", settings.participant)
    base = bytes.fromhex(args.base_model_digest) if args.base_model_digest else b""
    report = asyncio.run(run_upload(settings, Path(args.delta), args.step, args.weight, base))
    print(json.dumps(report.as_dict()), flush=True)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from foldfed.config import BusSettings
    from foldfed.hubctl import release_step

    digest = bytes.fromhex(args.model_digest) if args.model_digest else b""
    asyncio.run(release_step(BusSettings.from_env(), args.step, digest, args.participants))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The registry names its families without importing any (no torch for `--help`).
    from foldfed.trainer.backend import DEFAULT_MODEL
    from foldfed.trainer.families import demo_families

    parser = argparse.ArgumentParser(prog="foldfed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="a private local RabbitMQ (tests, demo)")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.add_argument(
        "--dir", default=None, help="data folder (default: $FOLDFED_BROKER_DIR or var/broker)"
    )
    broker.add_argument("--port", type=int, default=None, help="AMQP port (default: free)")
    broker.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="start: a local cluster of this many nodes (stop/status find it in --dir)",
    )
    broker.set_defaults(func=cmd_broker)

    demo = sub.add_parser("demo", help="a whole federated run on this machine")
    demo.add_argument("--participants", type=int, default=3)
    demo.add_argument("--steps", type=int, default=5, help="global steps (R)")
    demo.add_argument("--workdir", default="var/demo", help="logs, state and pictures")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--codec",
        default="rot2+zstd",
        help="codecs both ways: fp32 (exact), rot2+zstd (recommended, docs/format.md)",
    )
    demo.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=demo_families(),
        help="mlp: the small CPU task; openfold3-*: OpenFold3 on the real sample",
    )
    demo.add_argument(
        "--sample-dir", default="var/of3-sample", help="the OpenFold3 sample (made if missing)"
    )
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="pairwise-masked secure aggregation: the hub sees only masked deltas and their"
        " sum (uplink: the masked fixed-point grid; docs/threat-model.md)",
    )
    demo.set_defaults(func=cmd_demo)

    for name, func, text in (
        ("aggregator", cmd_aggregator, "hub: verify, store and sum deltas; finalize steps"),
        ("barrier", cmd_barrier, "hub: close a step when all delivered, then release"),
        ("uploader", cmd_uploader, "participant: the only networked process"),
        ("trainer", cmd_trainer, "participant: local training, no network"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)

    ingest = sub.add_parser("ingest", help="hub: verify and store chunks only (no sums)")
    ingest.set_defaults(func=cmd_ingest)

    upload = sub.add_parser("upload", help="participant: send one delta file to the hub")
    upload.add_argument("--delta", required=True, help="safetensors delta file")
    upload.add_argument("--step", type=int, required=True)
    upload.add_argument("--weight", type=float, required=True, help="number of samples")
    upload.add_argument("--base-model-digest", default="", help="hex digest of θ_t")
    upload.set_defaults(func=cmd_upload)

    release = sub.add_parser("release", help="hub: open a step for deltas")
    release.add_argument("step", type=int)
    release.add_argument("--model-digest", default="")
    release.add_argument("--participants", default="", help="comma-separated")
    release.set_defaults(func=cmd_release)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FoldfedError as exc:
        print(f"foldfed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

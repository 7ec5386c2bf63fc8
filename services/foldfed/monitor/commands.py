"""`foldfed monitor` (the hub service) and `foldfed status` (its picture in a terminal)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from foldfed.settings import Settings


def cmd_monitor(args: argparse.Namespace) -> int:
    from foldfed.monitor.service import run_monitor
    from foldfed.monitor.settings import MonitorSettings
    from foldfed.runtime import run_service

    settings = MonitorSettings.from_env()
    # No spans: the monitor only watches the events the other services trace.
    run_service("monitor", lambda stop: run_monitor(settings, stop), tracing=False)
    return 0


def fetch_state(url: str, timeout: float = 10.0) -> dict:
    """The monitor's /api/state at `url` (its base URL or the endpoint itself)."""
    endpoint = url if url.rstrip("/").endswith("/api/state") else url.rstrip("/") + "/api/state"
    with urllib.request.urlopen(endpoint, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def cmd_status(args: argparse.Namespace) -> int:
    from foldfed.monitor.render import status_text
    from foldfed.settings import load

    # Resolved here, not when the parser is built: a bad environment fails this command
    # with a message naming the variable, not every command's start.
    url = args.url or default_url(load())
    try:
        snap = fetch_state(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"foldfed: error: cannot read the monitor at {url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(snap, indent=2) if args.json else status_text(snap))
    return 0


def default_url(settings: Settings) -> str:
    """FOLDFED_MONITOR_URL, else the monitor on this machine at FOLDFED_MONITOR_PORT."""
    return settings.monitor_url or f"http://127.0.0.1:{settings.monitor_port}/"


def register(sub: argparse._SubParsersAction) -> None:
    monitor = sub.add_parser(
        "monitor", help="hub: stragglers, idle attribution, ETA; dashboard and /metrics"
    )
    monitor.set_defaults(func=cmd_monitor)
    status = sub.add_parser("status", help="the monitor's picture of the cycle, in the terminal")
    status.add_argument(
        "--url",
        default=None,
        help="the monitor's base URL (default: $FOLDFED_MONITOR_URL, else this machine's"
        " $FOLDFED_MONITOR_PORT)",
    )
    status.add_argument("--json", action="store_true", help="print /api/state as JSON")
    status.set_defaults(func=cmd_status)

"""`foldfed eval table`: the federated evaluation table at the hub, from the monitor's store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_eval_table(args: argparse.Namespace) -> int:
    from foldfed.evaluation.source import find_store, stored_reports
    from foldfed.evaluation.table import as_dict, build_table, render_text

    store = find_store(Path(args.source))
    table = build_table(stored_reports(store))
    print(json.dumps(as_dict(table), indent=2) if args.json else render_text(table))
    if args.png:
        from foldfed.evaluation.plot import save_table_png

        if table.companies:
            # stderr: with --json, stdout holds the JSON alone.
            print(f"picture: {save_table_png(table, Path(args.png))}", file=sys.stderr)
    return 0 if table.companies else 3


def register(sub: argparse._SubParsersAction) -> None:
    # `foldfed eval --model CKPT --data DIR` (scoring one model file, issue 17) may own the
    # `eval` parser already: `table` then joins it as a subcommand, since argparse refuses
    # two parsers of one name (and every command would fail to start).
    existing = sub.choices.get("eval")
    evaluation = existing or sub.add_parser("eval", help="federated evaluation of the releases")
    actions = evaluation.add_subparsers(dest="eval_command", required=existing is None)
    table = actions.add_parser(
        "table",
        help="hub: per company, each evaluated release against θ₀ (and local-only), "
        "and the consortium mean",
    )
    table.add_argument(
        "source",
        help="the monitor's store (monitor.sqlite3), its state folder, or a folder above one "
        "(a demo's working folder: its newest run)",
    )
    table.add_argument("--png", default=None, help="also draw the table into this PNG")
    table.add_argument("--json", action="store_true", help="print the table as JSON")
    table.set_defaults(func=cmd_eval_table)

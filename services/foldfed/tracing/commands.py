"""`foldfed trace STEP [--dir D]`: print a global step's trace as a tree."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trace", help="print one global step's trace (spans of every service) as a tree"
    )
    parser.add_argument("step", type=int, help="the global step")
    parser.add_argument(
        "--dir",
        default=None,
        help="folder of the services' *.jsonl trace files (default: FOLDFED_TRACE_DIR "
        "or var/traces; the demo's is <run folder>/traces)",
    )
    parser.add_argument(
        "--max-same",
        type=int,
        default=6,
        help="show at most this many sibling spans of one name (default 6)",
    )
    parser.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foldfed.settings import load
    from foldfed.tracing.tree import read_folder, render, spans_of_step

    # Resolved here, not when the parser is built: a bad environment fails this command
    # alone, with the variable named, never `foldfed --help`.
    folder = Path(args.dir) if args.dir else load().trace_dir
    spans, problems = read_folder(folder)
    for problem in problems[:5]:
        print(f"foldfed trace: skipped a bad line: {problem}", file=sys.stderr)
    if len(problems) > 5:
        print(f"foldfed trace: … and {len(problems) - 5} more bad lines", file=sys.stderr)
    print(render(spans_of_step(spans, args.step), args.step, max_same=max(1, args.max_same)))
    return 0

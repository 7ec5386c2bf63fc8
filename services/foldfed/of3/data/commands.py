"""`foldfed data ...`: prepare and inspect the real OpenFold3 sample.

Nothing heavy is imported at module level (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="OpenFold3 training data from real complexes")
    actions = data.add_subparsers(dest="data_command", required=True)

    sample = actions.add_parser(
        "sample",
        help="featurize plinder 0.2.27's protein-ligand complexes for N companies",
        description=(
            "Fetch the plinder==0.2.27 sdist (cached), featurize every complex holding a "
            "non-solvent ligand of >= 6 heavy atoms with OpenFold3's pipeline, crop around "
            "the ligand, partition among N companies with a keyed held-out set, and write "
            "DIR/sample.json (see docs/of3_data.md)."
        ),
    )
    sample.add_argument("--out", required=True, help="sample folder (DIR)")
    sample.add_argument("--companies", type=int, required=True, help="N simulated companies")
    sample.add_argument("--token-budget", type=int, default=64, help="tokens per crop")
    sample.add_argument("--key", default=None, help="partition key shared by the companies")
    sample.add_argument(
        "--heldout-fraction", type=float, default=None, help="share of clusters held out"
    )
    sample.add_argument("--seed", type=int, default=0, help="crop and conformer seed")
    sample.add_argument("--limit", type=int, default=None, help="first N entries only")
    sample.add_argument("--entries", default="", help="comma-separated entry ids only")
    sample.add_argument(
        "--cache-dir", default=None, help="where the sdist is kept (~/.cache/foldfed)"
    )
    sample.set_defaults(func=cmd_sample)

    show = actions.add_parser("summary", help="print a prepared sample's table")
    show.add_argument("dir", help="sample folder")
    show.set_defaults(func=cmd_summary)


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from foldfed.of3.data import partition
    from foldfed.of3.data.sample import prepare_sample, summary_table

    def progress(ids: list[str]) -> object:
        bar = tqdm(ids, desc="featurizing", unit="entry", file=sys.stderr)
        for entry_id in bar:
            bar.set_postfix_str(entry_id)
            yield entry_id

    only = [e.strip().lower() for e in args.entries.split(",") if e.strip()] or None
    report = prepare_sample(
        Path(args.out),
        args.companies,
        token_budget=args.token_budget,
        key=args.key if args.key is not None else partition.DEFAULT_KEY,
        heldout_fraction=(
            args.heldout_fraction
            if args.heldout_fraction is not None
            else partition.DEFAULT_HELDOUT_FRACTION
        ),
        seed=args.seed,
        limit=args.limit,
        only=only,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        progress=progress,
    )
    print(summary_table(report.sample))
    built = report.featurize_seconds
    per_entry = f", {sum(built.values()) / len(built):.1f} s per built entry" if built else ""
    print(
        f"featurized {report.featurized}, reused {report.reused} from the cache, "
        f"in {report.seconds:.1f} s{per_entry}; wrote {Path(args.out) / 'sample.json'}"
    )
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from foldfed.of3.data.sample import open_sample, summary_table

    print(summary_table(open_sample(Path(args.dir))))
    return 0

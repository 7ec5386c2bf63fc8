"""`foldfed data ...`: prepare and inspect the real OpenFold3 sample.

Nothing heavy is imported at module level (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


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
    sample.add_argument(
        "--sources",
        default="plinder",
        help=(
            "comma-separated sources of the pool, or 'all': plinder, pele-platform, pinder, "
            "pdb2pqr, biopython, mdanalysistests (pinned PyPI archives; DIR/pool.json lists "
            "the PDB ids and every file left out, with its reason)"
        ),
    )
    sample.add_argument(
        "--split-by",
        choices=("entries", "clusters"),
        default="entries",
        help=(
            "entries: companies dealt entry by entry (they look alike); clusters: each company "
            "its own protein families and chemical series (whole components of entries sharing "
            "a protein cluster or a ligand scaffold), see docs/of3_data.md"
        ),
    )
    sample.set_defaults(func=cmd_sample)

    validate = actions.add_parser(
        "validate",
        help="check every structure in DIR against the consortium data schema",
        description=(
            "Check every mmCIF under DIR (parse, elements, chains, RDKit sanitization, the "
            "PLINDER quality thresholds, PoseBusters plausibility, the consortium's inclusion "
            "criteria), print per-check pass rates, and write the local report and the "
            "aggregate-only data card to --out (see docs/data_schema.md)."
        ),
    )
    validate.add_argument("dir", help="folder of structure files (e.g. a sample folder)")
    validate.add_argument(
        "--out", default=None, help="report folder (default DIR/validation; stays local)"
    )
    validate.add_argument(
        "--consortium", default=None, help="consortium config TOML ([data] inclusion criteria)"
    )
    validate.add_argument(
        "--key", default=None, help="sign the data card with this private key file (NAME.key)"
    )
    validate.set_defaults(func=cmd_validate)

    verify_card = actions.add_parser(
        "verify-card", help="check a data card's signature against the consortium's keys"
    )
    verify_card.add_argument("card", help="a datacard.json")
    verify_card.add_argument("--keyring", required=True, help="the consortium keyring")
    verify_card.set_defaults(func=cmd_verify_card)

    reference = actions.add_parser(
        "split-reference",
        help="the blind-split reference hash of a split configuration (docs/operating-model.md)",
        description=(
            "Runs the shared reference set through the split with the configuration's key "
            "and prints the reference hash and the consortium config's [split] table. The "
            "key is never printed."
        ),
    )
    reference.add_argument("split", help="sample.json, or a JSON with its partition block")
    reference.add_argument("--json", action="store_true", help="the reference as JSON")
    reference.set_defaults(func=cmd_split_reference)

    show = actions.add_parser("summary", help="print a prepared sample's table")
    show.add_argument("dir", help="sample folder")
    show.set_defaults(func=cmd_summary)


def _progress_bar(desc: str, unit: str) -> Callable[[Sequence[T]], Iterator[T]]:
    """A tqdm bar on stderr over the items, showing the current one."""

    def progress(items: Sequence[T]) -> Iterator[T]:
        from tqdm import tqdm

        bar = tqdm(items, desc=desc, unit=unit, file=sys.stderr)
        for item in bar:
            bar.set_postfix_str(getattr(item, "name", str(item)))
            yield item

    return progress


def cmd_sample(args: argparse.Namespace) -> int:
    from foldfed.of3.data import partition
    from foldfed.of3.data.sample import prepare_sample
    from foldfed.of3.data.sample_split import summary_table

    progress = _progress_bar("featurizing", "entry")

    only = [e.strip().lower() for e in args.entries.split(",") if e.strip()] or None
    sources = [s.strip().lower() for s in args.sources.split(",") if s.strip()]
    if sources == ["all"]:
        from foldfed.of3.data.pool_sources import source_names

        sources = list(source_names())
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
        sources=sources,
        split_by=args.split_by,
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
    from foldfed.of3.data.sample import open_sample
    from foldfed.of3.data.sample_split import summary_table

    print(summary_table(open_sample(Path(args.dir))))
    return 0


def cmd_split_reference(args: argparse.Namespace) -> int:
    from foldfed.errors import ConfigError
    from foldfed.of3.data.split_standard import (
        config_from_partition,
        consortium_table,
        split_reference,
    )

    try:
        document = json.loads(Path(args.split).read_text())
        block = document.get("partition", document) if isinstance(document, dict) else None
        if not isinstance(block, dict):
            raise ConfigError("not a JSON object with a partition block")
        reference = split_reference(*config_from_partition(block))
    except (OSError, ValueError, ConfigError) as exc:
        print(f"foldfed data split-reference: {args.split}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reference.to_json(), indent=1))
    else:
        print(f"reference hash {reference.reference_hash}")
        print(f"  configuration {reference.config_digest}")
        print(f"  assignment    {reference.assignment_digest}")
        print()
        print(consortium_table(reference))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from foldfed.keyfiles import read_private_key
    from foldfed.of3.data.datacard import pass_rate_table
    from foldfed.of3.data.validate import load_criteria, validate_dir

    root = Path(args.dir)
    out = Path(args.out) if args.out else root / "validation"
    criteria = load_criteria(Path(args.consortium) if args.consortium else None)
    # Read the key before the long pass: a bad key file fails at once.
    key = read_private_key(Path(args.key)) if args.key else None
    run = validate_dir(
        root, out, criteria, progress=_progress_bar("validating", "file"), signing_key=key
    )
    print(pass_rate_table(run.card))
    print(
        f"local report: {out / 'report.json'} and {out / 'report.csv'} (stay here); "
        f"data card: {out / 'datacard.json'} (aggregates only, the one file meant to leave)"
    )
    return 0


def cmd_verify_card(args: argparse.Namespace) -> int:
    import json

    from foldfed.keyfiles import read_keyring
    from foldfed.of3.data.datacard import CardSignatureError, verify_card

    try:
        card = json.loads(Path(args.card).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        print(f"foldfed data verify-card: REFUSED: unreadable card ({exc})", file=sys.stderr)
        return 1
    try:
        key = verify_card(card, read_keyring(Path(args.keyring)).keys)
    except CardSignatureError as exc:
        print(f"foldfed data verify-card: REFUSED: {exc}", file=sys.stderr)
        return 1
    print(f"verified: the data card is signed by {key.name} (keyid {key.keyid[:16]}...)")
    return 0

"""`foldfed eval`: score a model file on a folder of complexes, locally (of3/scoring.py).

Nothing heavy is imported at module level (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="score an OpenFold3 model file on a folder of complexes (local, no broker)",
        description=(
            "Featurize every mmCIF/PDB file under DIR as the sample does, score the model on "
            "each (OpenFold3's loss terms, LDDT, pocket-aligned ligand RMSD) and print the "
            "summary; files not scored are listed with their reason."
        ),
    )
    # Not `required=True`: `foldfed eval table` (evaluation/commands.py) is a subcommand of
    # this parser, and argparse would demand --model/--data of it too; cmd_eval checks them.
    parser.add_argument(
        "--model",
        default="",
        help="model file: a θ the federation writes (trainable tensors) or a full checkpoint; "
        "'init' scores the preset's seeded θ_0",
    )
    parser.add_argument("--data", default="", help="folder of complexes (DIR)")
    parser.add_argument("--json", default="", help="also write the full report here")
    parser.add_argument("--preset", default="", help="OpenFold3 preset (default: $FOLDFED_MODEL's)")
    parser.add_argument("--seed", type=int, default=0, help="model init and scoring noise seed")
    parser.add_argument("--token-budget", type=int, default=64, help="tokens per crop")
    parser.add_argument(
        "--cache-dir", default="", help="feature cache (default: DIR/.foldfed-eval-cache)"
    )
    parser.set_defaults(func=cmd_eval, eval_parser=parser)


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    if not (args.model and args.data):
        args.eval_parser.error("scoring a model needs --model CKPT and --data DIR")

    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.scoring import load_model, prepare_folder, score_folder
    from foldfed.of3.training import BatchCache

    env = dict(os.environ)
    if args.preset:
        env["FOLDFED_MODEL"] = args.preset  # the rest (finetune mode, checkpoint) as set
    settings = Of3Settings.from_env(env)
    cache = Path(args.cache_dir) if args.cache_dir else Path(args.data) / ".foldfed-eval-cache"
    folder = prepare_folder(Path(args.data), cache, token_budget=args.token_budget)
    built = build(settings, seed=args.seed)
    kind = "initial" if args.model == "init" else load_model(built, Path(args.model))
    report: dict[str, Any] = {"model": args.model, "loaded_as": kind, "preset": settings.model}
    report.update(score_folder(built, folder, BatchCache(load_batch), seed=args.seed))
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_nan_safe) + "\n")
    return 0 if report["summary"]["scored"] else 1


def _nan_safe(value: object) -> object:
    return str(value)


def render(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [f"{report['model']} ({report['loaded_as']}, {report['preset']})"]
    for name, row in report["per_structure"].items():
        cells = "  ".join(f"{k}={v:.4f}" for k, v in row.items())
        lines.append(f"  {name}: {cells}")
    lines.append(
        "scored {scored}, skipped {skipped}; loss {loss}, LDDT {lddt}, ligand RMSD {rmsd} Å, "
        "ligand RMSD <= 2 Å {rate} of {count}".format(
            scored=summary["scored"],
            skipped=summary["skipped"],
            loss=_fmt(summary.get("loss")),
            lddt=_fmt(summary.get("lddt_mean")),
            rmsd=_fmt(summary.get("ligand_rmsd_mean")),
            rate=_fmt(summary.get("ligand_rmsd_le_2a_rate")),
            count=summary["ligand_rmsd_count"],
        )
    )
    for item in report["skipped"]:
        lines.append(f"  skipped {item['file']}: {item['reason']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"

"""Does federating pay? The same optimizer-step budget three ways, scored on the same
held-out structures:

    nice -n 19 .venv/bin/python bench/federation_payoff.py --sample var/of3-sample \\
        [--rounds 10] [--local-steps 8] [--grad-accum 1] [--lr 1e-3] [--warmup -1]
        [--companies company-a,company-b,...] [--pooled-grad-accum G_p]
        [--arms alone,federation,pooled] [--checkpointing] [--seed 0] [--quick]
        [--split-by entries|clusters]

alone       each company trains only on its own training split: R rounds of K optimizer
            steps from θ_0, each round starting where its last ended;
federation  every round each company trains K steps from the shared θ_t on its own split,
            and θ_{t+1} = θ_t + the mean of their deltas (equal weights, as FedAvg with
            K·G structures each) — the arithmetic the hub does, in-process;
pooled      one trainer on the union of the training splits: R rounds of K steps (what
            sharing the data would give, which the companies will not do);
            `--pooled-grad-accum N·G` makes it see per step as many structures as the
            federation's N companies do per round, the same-compute baseline.

Every arm takes R·K optimizer steps of G structures in sequence (the federation spends N x
the compute in parallel, one share per company) under the same lr schedule: OpenFold3's
(foldfed.of3.training.Of3TrainConfig.lr_at, optimizer step (t-1)·K + k counted across
rounds) with a warm-up that fits the run: `--warmup -1` (the default) is 10 % of R·K, not
OpenFold3's 1,000 steps, which a short run would spend entirely at an lr near 0. The tiny
OpenFold3 preset with the trainer's own round (foldfed.of3.training.train_round) on the
real sample (plinder complexes; by default the 12-entry test sample, `--sample` for a
prepared bigger one). Company i's alone run and its share of the federation draw the same
structures and noise in round 1 (same participant index), so the arms differ only by what
they learn from.

Held-out: every company's held-out entries (none of them is trained on by any arm), each
scored on its own with foldfed.of3.training.evaluate (fixed noise per structure), so the
arms are compared structure by structure as well as on the mean. Reported per arm: the
held-out loss, its diffusion (mse) and distogram terms, LDDT and pocket-aligned ligand RMSD;
for "alone" per company, their mean and their spread; the last round's training loss.
`--split-by clusters` reassigns the sample so that each company holds its own protein
families and chemical series (foldfed.of3.data.partition, docs/of3_data.md); the default
keeps the partition the sample was prepared with. `--arms` runs a subset (each arm is
deterministic given the seed and the options, so a rerun with other pooled options need not
repeat the others).

Activation checkpointing is off by default (`--checkpointing` keeps OpenFold3's): it only
recomputes the forward in the backward pass, and the deltas are bit-identical without it
(checked: max |Δ difference| = 0.0 on one K=1, G=3 round), ~30 % less CPU per micro-batch.

The output ends with one machine-readable line (held-out loss ratios against the mean alone
company, measured in the same run; this process's peak RSS, VmHWM):

    RESULT federation_vs_alone=<x> pooled_vs_alone=<x> federation_beats_every_alone=<yes|no>
        peak_rss_mib=<MiB>                                                (one line)

This runs minutes to tens of minutes on a CPU; it is a measurement, not a test (not in CI).
`--quick` is a smoke run (two companies, R = K = 1, no warm-up).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import benchkit

ARMS = ("alone", "federation", "pooled")
TERMS = ("eval_loss", "eval_mse_loss", "eval_distogram_loss")
STRUCTURE = ("eval_lddt_mean", "eval_ligand_rmsd_mean")
KEYS = (*TERMS, "eval_lddt_mean", "eval_ligand_rmsd_mean", "eval_ligand_rmsd_success")
LABELS = {
    "eval_loss": "loss",
    "eval_mse_loss": "mse",
    "eval_distogram_loss": "distogram",
    "eval_lddt_mean": "LDDT",
    "eval_ligand_rmsd_mean": "lig RMSD (Å)",
    "eval_ligand_rmsd_success": "RMSD < 2 Å",
}
LIGAND_SUCCESS = 2.0  # Å, as foldfed.of3.metrics
NO_CHECKPOINTING = {"settings.blocks_per_ckpt": None, "settings.ckpt_intermediate_steps": False}
# --quick: two companies, one round of one optimizer step per arm, at the peak lr (a
# warm-up would give that one step lr 0, and every arm would equal the initial model).
QUICK = {"rounds": 1, "local_steps": 1, "warmup": 0, "companies": "company-a,company-b"}


def warmup_steps(args: argparse.Namespace) -> int:
    """--warmup, or 10 % of the run's R·K optimizer steps when it is -1."""
    if args.warmup >= 0:
        return int(args.warmup)
    return max(1, round(0.1 * args.rounds * args.local_steps))


def aggregate(per_structure: dict[str, dict[str, float]]) -> dict[str, float]:
    """The held-out set's metrics from per-structure ones, as evaluate() aggregates: loss
    terms averaged over every structure, LDDT and ligand RMSD over those that have them."""
    out: dict[str, float] = {}
    rows = list(per_structure.values())
    for key in TERMS:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = math.fsum(values) / len(values)
    for key in STRUCTURE:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = math.fsum(values) / len(values)
    rmsd = [r["eval_ligand_rmsd_mean"] for r in rows if "eval_ligand_rmsd_mean" in r]
    if rmsd:
        out["eval_ligand_rmsd_success"] = sum(v < LIGAND_SUCCESS for v in rmsd) / len(rmsd)
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.training import (
        BatchCache,
        Of3TrainConfig,
        evaluate,
        load_trainable,
        train_round,
        trainable_state,
    )

    sample = benchkit.load_of3_sample(args.sample, args.companies, args.split_by)
    sample_dir, companies, train = sample.folder, sample.companies, sample.train
    heldout = sample.heldout  # every company's, also those left out of --companies
    warmup = warmup_steps(args)
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not arms or arms - set(ARMS):
        raise benchkit.BenchError(f"--arms {args.arms!r}: expected a subset of {ARMS}")
    pooled_g = args.pooled_grad_accum or args.grad_accum
    overrides = {} if args.checkpointing else NO_CHECKPOINTING
    settings = Of3Settings(
        model="openfold3-tiny",
        sample_dir=sample_dir,
        warmup_steps=warmup,
        lr=args.lr,
        overrides=overrides,
    )
    built = build(settings, seed=args.seed)
    load = BatchCache(load_batch)
    config = Of3TrainConfig(
        local_steps=args.local_steps, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=warmup
    )
    theta0 = trainable_state(built.model, built.trainable)
    started = time.perf_counter()

    def score(theta: dict) -> dict[str, dict[str, float]]:
        load_trainable(built.model, built.trainable, theta)
        out = {}
        for entry in heldout:
            found = evaluate(built.model, built.loss_fn, [entry.features], load, seed=args.seed)
            out[entry.entry_id] = {k: found[k] for k in KEYS if k in found}
        return out

    def step(
        theta: dict, files: list[Path], index: int, t: int, cfg: Any = config
    ) -> tuple[dict, float]:
        result = train_round(
            built.model, built.loss_fn, built.trainable, theta, files, load, cfg,
            seed=args.seed, participant_index=index, step=t,
        )  # fmt: skip
        return result.delta, result.metrics["train_loss"]

    def progress(what: str) -> None:
        print(f"  [{time.perf_counter() - started:7.0f} s] {what}", flush=True)

    steps = args.rounds * args.local_steps
    print(
        f"{len(companies)} companies ({', '.join(companies)}), "
        f"{sum(map(len, train.values()))} training structures "
        f"({', '.join(str(len(train[c])) for c in companies)}), {len(heldout)} held-out; "
        f"R={args.rounds}, K={args.local_steps}, G={args.grad_accum}: {steps} optimizer "
        f"steps per arm; lr {args.lr:g}, linear warm-up over {warmup} steps "
        f"({100 * warmup / steps:.0f} %); pooled G={pooled_g}; activation checkpointing "
        f"{'on' if args.checkpointing else 'off'}",
        flush=True,
    )
    result: dict[str, Any] = {
        "code_version": benchkit.code_version(),
        "sample": str(sample_dir),
        "companies": companies,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "grad_accum": args.grad_accum,
        "pooled_grad_accum": pooled_g,
        "lr": args.lr,
        "warmup_steps": warmup,
        "checkpointing": args.checkpointing,
        "seed": args.seed,
        "train_structures": {c: len(train[c]) for c in companies},
        "heldout": {e.entry_id: e.company for e in heldout},
    }
    per_structure: dict[str, Any] = {"initial": score(theta0)}
    train_loss: dict[str, list[float]] = {}
    progress("initial model scored")

    for index, company in enumerate(companies if "alone" in arms else []):
        theta = dict(theta0)
        losses = []
        for t in range(1, args.rounds + 1):
            delta, loss = step(theta, train[company], index, t)
            theta = {n: theta[n] + delta[n] for n in theta}
            losses.append(loss)
        per_structure[f"alone {company}"] = score(theta)
        train_loss[f"alone {company}"] = losses
        progress(f"alone {company} done")

    theta = dict(theta0)
    losses = []
    for t in range(1, args.rounds + 1 if "federation" in arms else 1):
        rounds = [step(theta, train[c], i, t) for i, c in enumerate(companies)]
        theta = {n: theta[n] + sum(d[n] for d, _ in rounds) / len(rounds) for n in theta}
        losses.append(math.fsum(loss for _, loss in rounds) / len(rounds))
        if t % max(1, args.rounds // 4) == 0:
            progress(f"federation round {t}/{args.rounds}")
    if "federation" in arms:
        per_structure["federation"] = score(theta)
        train_loss["federation"] = losses
        progress("federation done")

    pooled_files = [f for c in companies for f in train[c]]
    pooled_config = replace(config, grad_accum=pooled_g)
    theta = dict(theta0)
    losses = []
    for t in range(1, args.rounds + 1 if "pooled" in arms else 1):
        delta, loss = step(theta, pooled_files, len(companies), t, pooled_config)
        theta = {n: theta[n] + delta[n] for n in theta}
        losses.append(loss)
    if "pooled" in arms:
        per_structure["pooled"] = score(theta)
        train_loss["pooled"] = losses
        progress("pooled done")

    result["per_structure"] = per_structure
    result["arms"] = {arm: aggregate(values) for arm, values in per_structure.items()}
    result["train_loss"] = train_loss
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = benchkit.peak_rss_mib()
    return result


def result_fields(result: dict[str, Any]) -> dict[str, benchkit.ResultValue]:
    """Held-out loss of the federation and of pooled over the mean alone company's (below 1:
    better than going it alone), whether the federation beats every company alone, and this
    process's peak RSS; nan / "na" for an arm not run."""
    arms: dict[str, dict[str, float]] = result["arms"]
    alone = [arms[a]["eval_loss"] for a in arms if a.startswith("alone ")]
    mean_alone = sum(alone) / len(alone) if alone else math.nan
    nan = {"eval_loss": math.nan}
    federation = arms.get("federation", nan)["eval_loss"]
    pooled = arms.get("pooled", nan)["eval_loss"]
    beats: benchkit.ResultValue = (
        federation < min(alone) if alone and "federation" in arms else "na"
    )
    return {
        # 4 decimals, as the table: arms of a short run differ in the 4th significant digit
        "federation_vs_alone": f"{federation / mean_alone:.4f}",
        "pooled_vs_alone": f"{pooled / mean_alone:.4f}",
        "federation_beats_every_alone": beats,
        "peak_rss_mib": result["peak_rss_mib"],
    }


def _fmt(value: float | None, width: int = 11) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.4f}"


def render(result: dict[str, Any]) -> str:
    arms: dict[str, dict[str, float]] = result["arms"]
    alone = [a for a in arms if a.startswith("alone ")]
    keys = [k for k in KEYS if k in arms["initial"]]
    names = [LABELS[k] for k in keys]
    header = f"{'':22}" + "".join(f"{n:>15}" for n in names) + f"{'train (last)':>15}"
    rows = [
        f"R={result['rounds']} K={result['local_steps']} G={result['grad_accum']} "
        f"lr={result['lr']:g} warm-up={result['warmup_steps']} steps, "
        f"{len(result['heldout'])} held-out structures",
        header,
    ]

    def row(name: str, values: dict[str, float], train: float | None) -> str:
        cells = "".join(_fmt(values.get(k), 15) for k in keys)
        return f"{name:22}{cells}{_fmt(train, 15)}"

    def last(arm: str) -> float | None:
        losses = result["train_loss"].get(arm)
        return losses[-1] if losses else None

    rows.append(row("initial", arms["initial"], None))
    for arm in alone:
        rows.append(row(arm, arms[arm], last(arm)))
    if alone:
        mean = {k: sum(arms[a][k] for a in alone) / len(alone) for k in keys}
        spread = {k: max(arms[a][k] for a in alone) - min(arms[a][k] for a in alone) for k in keys}
        rows.append(row("alone (mean)", mean, None))
        rows.append(row("alone (max - min)", spread, None))
    for arm in ("federation", "pooled"):
        if arm in arms:
            rows.append(row(arm, arms[arm], last(arm)))
    loss = "eval_loss"
    per = result["per_structure"]
    entries = list(per["initial"])
    rows.append("\nheld-out loss per structure (company that holds it):")
    rows.append(f"{'':22}" + "".join(f"{e:>11}" for e in entries))
    rows.append(f"{'':22}" + "".join(f"{result['heldout'][e][-9:]:>11}" for e in entries))
    for arm in per:
        rows.append(f"{arm:22}" + "".join(_fmt(per[arm][e].get(loss)) for e in entries))
    if not alone or "federation" not in arms or "pooled" not in arms:
        rows.append(f"({result['seconds']:.0f} s)")
        return "\n".join(rows)

    fed = arms["federation"][loss]
    best = min(arms[a][loss] for a in alone)
    rows.append(
        f"\nheld-out loss: federation / mean alone = {fed / mean[loss]:.4f}, "
        f"pooled / mean alone = {arms['pooled'][loss] / mean[loss]:.4f}; "
        f"federation - best alone = {fed - best:+.4f} "
        f"(alone spread {spread[loss]:.4f}); federation beats every alone: "
        f"{'yes' if fed < best else 'no'}"
    )
    for arm in alone:
        wins = sum(per["federation"][e][loss] < per[arm][e][loss] for e in entries)
        rows.append(f"federation below {arm}: {wins}/{len(entries)} structures")
    rows.append(f"({result['seconds']:.0f} s)")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="global steps R")
    parser.add_argument("--local-steps", type=int, default=8, help="K")
    parser.add_argument("--grad-accum", type=int, default=1, help="G")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr")
    parser.add_argument(
        "--warmup", type=int, default=-1, help="warm-up optimizer steps; -1: 10%% of R*K"
    )
    parser.add_argument("--companies", default="", help="comma-separated subset (default all)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="keep activation checkpointing"
    )
    parser.add_argument(
        "--pooled-grad-accum", type=int, default=0, help="pooled arm's G (0: --grad-accum)"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument("--sample", default="", help="a prepared sample folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split-by",
        choices=("entries", "clusters"),
        default="",
        help="reassign the sample's entries by this partition rule (default: the sample's own)",
    )
    benchkit.add_quick_option(parser, QUICK, argv)
    args = parser.parse_args(argv)
    for name in ("rounds", "local_steps", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.pooled_grad_accum < 0:
        parser.error("--pooled-grad-accum must be >= 0")
    if args.warmup > args.rounds * args.local_steps:
        print("note: the warm-up is longer than the run; the lr never reaches its peak")
    return benchkit.run_bench(
        args, bench, render, "federation_payoff", result_fields=result_fields,
        interrupted="interrupted", failed="federation_payoff: ",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

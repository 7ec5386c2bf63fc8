"""A progressive finalize writes finalize_step's bytes, whatever the schedule of prefixes.

The reference is finalize_step itself (today's whole-vector path, whose own tests compare
it with torch). Both run on the same sums, two steps in a row (so the optimizer state and
the downlink residual of step 0 feed step 1), in folders of their own; every file they
leave must be equal byte for byte, and the chunks the progressive run hands out early must
be the final update manifest's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foldfed.aggregation import (
    Accumulator,
    ModelLayout,
    ServerOptimizer,
    finalize_step,
    quantize_chunk,
    weight_total,
)
from foldfed.aggregation.downlink import DownlinkCoder
from foldfed.aggregation.progressive import ProgressiveFinalize, UpdateChunk
from foldfed.deltafile import write_delta
from foldfed.digests import digest_of
from foldfed.format import MIN_CHUNK_SIZE, chunk_count
from foldfed.payloadfile import plan_chunks, read_chunk, read_layout

SHAPES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "trunk.weight": (torch.float32, (700, 1000)),
    "trunk.bias": (torch.float32, (1000,)),
    "head.weight": (torch.bfloat16, (64, 33)),
    "norm.scale": (torch.float16, (77,)),
    "proj": (torch.float64, (5, 7)),
    "unused": (torch.float32, (0, 3)),
}
WEIGHTS = (3.0, 0.25, 1200.0)
DOWNLINK = "rotated:v1;bits=2;block=4096;mult=2.0;rounding=stochastic;scale=block+zstd:v1;level=3"
CODED_LIMIT = 64 << 10  # small coded chunks: many of them on this model
UPDATE_CHUNK = MIN_CHUNK_SIZE


def tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        for name, (dtype, shape) in SHAPES.items()
    }


def summed(tmp: Path, step: int) -> tuple[ModelLayout, Accumulator]:
    paths = []
    for i in range(len(WEIGHTS)):
        paths.append(tmp / f"delta-{step}-{i}.safetensors")
        write_delta(paths[-1], tensors(100 * step + i, 1e-3))
    layout = ModelLayout.from_spans(read_layout(paths[0]))
    acc = Accumulator(tmp / f"sum-{step}.i64", layout.elements)
    for path, weight in zip(paths, WEIGHTS, strict=True):
        spans, size = read_layout(path), path.stat().st_size
        for index in range(chunk_count(size, MIN_CHUNK_SIZE)):
            body = read_chunk(path, MIN_CHUNK_SIZE, index)
            acc.add_all(quantize_chunk(layout, spans, index, MIN_CHUNK_SIZE, size, body, weight))
    return layout, acc


class Party:
    """One hub's folder: models, updates, optimizer state, downlink files."""

    def __init__(self, root: Path, coded: bool) -> None:
        self.root = root
        (root / "updates").mkdir(parents=True)
        self.coder = (
            DownlinkCoder(
                root / "updates",
                root / "downlink.residual",
                DOWNLINK,
                chunk_limit=CODED_LIMIT,
                cycle=1,
                seed=7,
            )
            if coded
            else None
        )

    def model(self, step: int) -> Path:
        return self.root / f"model-{step}.safetensors"

    def update(self, step: int) -> Path:
        return self.root / "updates" / f"update-{step}.safetensors"

    def files(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.root)): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        }


def reference(party: Party, step: int, layout: ModelLayout, acc: Accumulator, opt: ServerOptimizer):
    coder = party.coder
    return finalize_step(
        layout,
        acc,
        weight_total(WEIGHTS),
        party.model(step),
        party.update(step),
        party.model(step + 1),
        opt,
        party.root / "state",
        step=step,
        downlink=None if coder is None else lambda exact: coder.code(step, exact),
    )


def progressive(
    party: Party,
    step: int,
    layout: ModelLayout,
    acc: Accumulator,
    opt: ServerOptimizer,
    schedule: list[float],
) -> tuple[object, list[UpdateChunk], list[UpdateChunk]]:
    job = ProgressiveFinalize(
        layout,
        acc,
        weight_total(WEIGHTS),
        party.model(step),
        party.update(step),
        party.model(step + 1),
        opt,
        party.root / "state",
        step=step,
        downlink=party.coder,
        update_chunk_size=UPDATE_CHUNK,
    )
    early: list[UpdateChunk] = []
    for share in schedule:
        early += job.advance(int(share * layout.elements))
    done, rest = job.finish()
    return done, early, rest


SCHEDULES = {
    "none": [],
    "halves": [0.5],
    "many": [0.0, 1e-6, 0.1, 0.1, 0.37, 0.5, 0.81, 0.999],
    "all-then-finish": [1.0],
}


@pytest.mark.parametrize("coded", [False, True], ids=["fp32-downlink", "coded-downlink"])
@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_progressive_finalize_writes_finalize_steps_bytes(
    tmp_path: Path, coded: bool, kind: str, schedule: str
) -> None:
    opt = ServerOptimizer(kind)  # type: ignore[arg-type]
    ref, ours = Party(tmp_path / "ref", coded), Party(tmp_path / "ours", coded)
    theta0 = tensors(1, 0.5)
    write_delta(ref.model(0), theta0)
    write_delta(ours.model(0), theta0)
    for step in (0, 1):
        layout, acc = summed(tmp_path, step)
        expected = reference(ref, step, layout, acc, opt)
        done, early, rest = progressive(ours, step, layout, acc, opt, SCHEDULES[schedule])
        assert done.result.update_digest == expected.update_digest
        assert done.result.model_digest == expected.model_digest
        chunks = early + rest
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert all(digest_of(c.body) == c.digest for c in chunks)
        if coded:
            assert ref.coder is not None
            stored = ref.coder.stored(step).chunks()
            assert [c.body for c in chunks] == stored
            assert done.payload_digest == digest_of(b"".join(stored))
        else:
            plan = plan_chunks(expected.update_path, UPDATE_CHUNK)
            assert tuple(c.digest for c in chunks) == plan.chunk_digests
            assert done.payload_digest == plan.payload_digest
            assert done.tensors == plan.tensors
            assert done.payload_size == plan.payload_size
        if schedule == "many":
            assert early, "a final prefix hands out chunks before the end"
        if schedule == "all-then-finish":
            # Every element final before FinalizeRequest: nothing left for it to send.
            assert rest == [], [c.index for c in rest]
        acc.close()
    # Everything on disk: update and model files, optimizer state, coded files, residual.
    assert ours.files() == ref.files()


def test_a_discarded_run_leaves_nothing_and_a_new_one_writes_the_same_bytes(
    tmp_path: Path,
) -> None:
    opt = ServerOptimizer("fedadam")
    ref, ours = Party(tmp_path / "ref", True), Party(tmp_path / "ours", True)
    theta0 = tensors(1, 0.5)
    write_delta(ref.model(0), theta0)
    write_delta(ours.model(0), theta0)
    layout, acc = summed(tmp_path, 0)
    expected = reference(ref, 0, layout, acc, opt)
    before = ours.files()
    job = ProgressiveFinalize(
        layout,
        acc,
        weight_total(WEIGHTS),
        ours.model(0),
        ours.update(0),
        ours.model(1),
        opt,
        ours.root / "state",
        step=0,
        downlink=ours.coder,
        update_chunk_size=UPDATE_CHUNK,
    )
    first = job.advance(layout.elements // 2)
    assert first
    job.discard()  # as a crash would: nothing committed
    assert ours.files() == before
    done, early, rest = progressive(ours, 0, layout, acc, opt, [0.3])
    assert done.result.model_digest == expected.model_digest
    assert [c.digest for c in first] == [c.digest for c in (early + rest)[: len(first)]]
    assert ours.files() == ref.files()


def test_a_step_coded_before_a_crash_is_not_coded_again(tmp_path: Path) -> None:
    """The residual committed (step t coded) but no model yet: the stored chunks are used,
    as finalize_step does."""
    opt = ServerOptimizer("fedavgm")
    ref, ours = Party(tmp_path / "ref", True), Party(tmp_path / "ours", True)
    theta0 = tensors(1, 0.5)
    write_delta(ref.model(0), theta0)
    write_delta(ours.model(0), theta0)
    layout, acc = summed(tmp_path, 0)
    expected = reference(ref, 0, layout, acc, opt)
    assert ours.coder is not None and ref.coder is not None
    # Commit ref's coded step into ours, as a finalize that crashed after the residual.
    for name in ("updates/coded-000000000000.bin", "updates/coded-000000000000.json",
                 "downlink.residual"):  # fmt: skip
        (ours.root / name).write_bytes((ref.root / name).read_bytes())
    done, early, rest = progressive(ours, 0, layout, acc, opt, [0.5])
    assert done.result.model_digest == expected.model_digest
    assert [c.body for c in early + rest] == ref.coder.stored(0).chunks()
    assert ours.files() == ref.files()

"""Temporaries a killed finalize leaves are removed at the aggregator's start-up, and
nothing else is (aggregator/temporaries.py).

The SIGKILL test runs a real progressive finalize (coded downlink, FedAdam) in a child
process in the aggregator's folder layout, kills it mid-way, and checks that the cleanup
removes exactly the temporaries it left: every committed file of the step before keeps its
bytes, and a finalize run afterwards writes the bytes of one that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from foldfed.aggregator.temporaries import is_temporary, leftover_temporaries, remove_temporaries


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("models", ".model-000000000002.safetensors.k3j_9x2a.tmp"),
        ("updates", ".update-000000000001.safetensors.abc123xy.tmp"),
        ("updates", ".coded-000000000001.bin.q1w2e3r4.tmp"),
        ("updates", ".coded-000000000001.json.q1w2e3r4.tmp"),
        (".", ".downlink.residual.zz9_aa00.tmp"),
        ("optimizer", ".tmp-p0o9i8u7"),
    ],
)
def test_a_finalize_temporary_is_recognized(folder: str, name: str) -> None:
    assert is_temporary(folder, name)


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("models", "model-000000000002.safetensors"),
        ("updates", "update-000000000001.safetensors"),
        ("updates", "coded-000000000001.bin"),
        (".", "downlink.residual"),
        (".", "barrier.sqlite3-wal"),
        (".", "accumulator.i64"),
        (".", ".model-000000000002.safetensors.abc.tmp"),  # not in its folder
        ("optimizer", "step-000000000002"),
        ("optimizer", ".old-p0o9i8u7"),  # may hold the committed generation
        ("store", ".x.tmp"),
        ("models", ".model-2.safetensors.abc.tmp"),
        ("models", ".model-000000000002.safetensors.abc.tmp.bak"),
    ],
)
def test_anything_else_is_not(folder: str, name: str) -> None:
    assert not is_temporary(folder, name)


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_aggregator_temporaries import finalize
    finalize(Path(sys.argv[1]), step=2, progressive_share=float(sys.argv[3]))
    """
)


def finalize(state: Path, step: int, progressive_share: float | None = None) -> bytes:
    """Finalize `step` in the aggregator's layout under `state` (sums and θ_step from
    test_aggregation_progressive's helpers); with `progressive_share`, stop a progressive
    run after that share of the elements, say so on stdout and wait to be killed."""
    from test_aggregation_progressive import DOWNLINK, WEIGHTS, summed

    from foldfed.aggregation import ServerOptimizer, weight_total
    from foldfed.aggregation.downlink import DownlinkCoder
    from foldfed.aggregation.progressive import ProgressiveFinalize

    coder = DownlinkCoder(
        state / "updates", state / "downlink.residual", DOWNLINK, chunk_limit=64 << 10,
        cycle=1, seed=7,
    )  # fmt: skip
    layout, acc = summed(state / "sums", step)
    job = ProgressiveFinalize(
        layout,
        acc,
        weight_total(WEIGHTS),
        state / "models" / f"model-{step:012d}.safetensors",
        state / "updates" / f"update-{step:012d}.safetensors",
        state / "models" / f"model-{step + 1:012d}.safetensors",
        ServerOptimizer("fedadam"),
        state / "optimizer",
        step=step,
        downlink=coder,
        update_chunk_size=1 << 20,
    )
    if progressive_share is not None:
        assert job.advance(int(progressive_share * layout.elements)), "no chunk coded yet"
        print("ready", flush=True)
        import time

        time.sleep(600)
    done, _ = job.finish()
    acc.close()
    return done.result.model_digest


def layout_of(state: Path) -> Path:
    from test_aggregation_progressive import tensors

    from foldfed.deltafile import write_delta

    for folder in ("models", "updates", "optimizer", "sums"):
        (state / folder).mkdir(parents=True)
    write_delta(state / "models" / "model-000000000001.safetensors", tensors(1, 0.5))
    return state


def committed(state: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state)): p.read_bytes()
        for p in sorted(state.rglob("*"))
        if p.is_file() and "sums" not in p.parts
    }


def kind(path: Path, state: Path) -> str:
    """A temporary's folder and final name, without its random part."""
    folder = path.parent.relative_to(state)
    stem = path.name.split("-")[0] if folder.name == "optimizer" else path.name.rsplit(".", 2)[0]
    return f"{folder}/{stem}"


def test_sigkill_mid_finalize_then_start_up_removes_only_its_temporaries(tmp_path: Path) -> None:
    killed, clean = layout_of(tmp_path / "killed"), layout_of(tmp_path / "clean")
    for state in (killed, clean):
        finalize(state, step=1)  # step 1 committed: update, model 2, coded files, residual
    before = committed(killed)
    tests = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(killed), tests, "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    left = leftover_temporaries(killed)
    # What a progressive run has open mid-way: both files, the coded chunks, the new
    # residual and the optimizer generation it writes.
    assert sorted({kind(p, killed) for p in left}) == [
        "./.downlink.residual",
        "models/.model-000000000003.safetensors",
        "optimizer/.tmp",
        "updates/.coded-000000000002.bin",
        "updates/.update-000000000002.safetensors",
    ]
    assert sum(p.stat().st_size for p in left if p.is_file()) > 0

    assert remove_temporaries(killed) == left
    assert leftover_temporaries(killed) == []
    assert committed(killed) == before  # every committed byte kept, nothing else left
    # The restarted aggregator computes the step again: the bytes of an unbroken run.
    assert finalize(killed, step=2) == finalize(clean, step=2)
    assert committed(killed) == committed(clean)

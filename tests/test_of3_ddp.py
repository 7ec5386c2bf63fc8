"""The OpenFold3 trainer as a DDP job: real torchrun, 2 CPU processes, gloo. Rank 0 alone
serves the spool; both ranks end on the same θ, and that θ is the single-process one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from foldfed.deltafile import load_delta
from foldfed.of3.backend import Of3Backend, Of3Settings, tensors_digest, write_initial_model
from foldfed.of3.testing import prepared_sample
from foldfed.settings import env_for
from foldfed.spool import Spool

pytestmark = pytest.mark.slow

SEED = 3
LOCAL_STEPS, GRAD_ACCUM = 2, 4  # each rank runs 2 of every step's 4 micro-batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(sample: Path, spool: Path, initial: Path) -> dict[str, str]:
    return env_for(
        participant="company-b",
        participants=("company-a", "company-b", "company-c"),
        spool_dir=spool,
        initial_model=initial,
        seed=SEED,
        model="openfold3-tiny",
        of3_sample=sample,
        of3_eval="none",
        of3_warmup=0,
        of3_lr=1e-3,
        local_steps=LOCAL_STEPS,
        grad_accum=GRAD_ACCUM,
    )


def _round_lines(output: str) -> dict[int, str]:
    """rank -> delta digest, from the ranks' "round trained" log lines."""
    out: dict[int, str] = {}
    decoder = json.JSONDecoder()
    for line in output.splitlines():
        # Both ranks write to one log file: two records can share a line when their
        # writes interleave, and the last line may still be half written.
        at = line.find("{") if "round trained" in line else -1
        while at >= 0:
            try:
                record, end = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                break
            if record.get("event") == "round trained":
                out[int(record["rank"])] = record["delta_digest"]
            at = line.find("{", end)
    return out


def test_two_ranks_train_one_round_like_one_process(tmp_path: Path) -> None:
    sample = prepared_sample()
    initial = tmp_path / "theta0.safetensors"
    spool_dir = tmp_path / "spool"
    env = _env(sample, spool_dir, initial)
    settings = Of3Settings.from_env(env)
    digest0 = write_initial_model(initial, settings, SEED)
    Spool(spool_dir).write_release(1, digest0, None)

    log_path = tmp_path / "torchrun.log"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()),
        "-m", "foldfed.trainer.ddp_entry",
    ]  # fmt: skip
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    child_env.update(env, OMP_NUM_THREADS="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    spool = Spool(spool_dir)
    try:
        deadline = time.monotonic() + 600
        while not (spool.has_delta(1) and len(_round_lines(log_path.read_text())) == 2):
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        # SIGTERM to torchrun, which forwards it to both ranks (and itself exits 1 after a
        # signal, by design): rank 0 stops its service and tells rank 1 to stop.
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    output = log_path.read_text()
    assert "services/foldfed/" not in output, output[-4000:]  # no traceback of ours

    ranks = _round_lines(output)
    assert set(ranks) == {0, 1}
    assert ranks[0] == ranks[1], "the two ranks ended on different models"
    (record,) = [r for r in spool.pending_deltas() + spool.sent_deltas() if r.step == 1]
    ddp_delta = load_delta(record.path)
    # Rank 0 wrote what it trained; rank 1 wrote nothing to the spool.
    assert record.weight == LOCAL_STEPS * GRAD_ACCUM
    assert not list(spool_dir.glob("**/*rank*"))

    # The same round in one process: the same Δ up to the order of float sums.
    backend = Of3Backend(
        settings,
        participant="company-b",
        participant_index=1,
        seed=SEED,
        local_steps=LOCAL_STEPS,
        grad_accum=GRAD_ACCUM,
    )
    single = backend.train(load_delta(initial), 1, None).delta
    # What rank 0 wrote is bit for bit what both ranks computed.
    assert tensors_digest(ddp_delta, backend.trainable) == ranks[0] == ranks[1]
    assert set(single) == set(ddp_delta)
    worst = max(float((single[n] - ddp_delta[n]).abs().max()) for n in single)
    scale = max(float(single[n].abs().max()) for n in single)
    print(f"DDP vs one process: max |ΔΔ| = {worst:.3g} (max |Δ| = {scale:.3g})")
    assert scale > 0
    for name in single:
        torch.testing.assert_close(ddp_delta[name], single[name], rtol=1e-3, atol=1e-5)

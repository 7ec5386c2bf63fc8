"""`foldfed initial-model`: the init step of every compose service and Kubernetes pod. Each
party computes θ_0 itself, so it must be the same bytes in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foldfed.deltafile import load_delta
from foldfed.digests import file_digest
from foldfed.trainer.task import initial_model

FOLDFED = [sys.executable, "-m", "foldfed.cli"]


def run(args: list[str], **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    done = subprocess.run(
        [*FOLDFED, *args], env={**base, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_mlp_initial_model_is_the_demos(tmp_path: Path) -> None:
    out = tmp_path / "model" / "initial.safetensors"
    printed = run(["initial-model", "--out", str(out)], FOLDFED_SEED="5")
    expected = initial_model(tmp_path / "here.safetensors", 5)
    assert file_digest(out) == expected
    assert expected.hex() in printed
    # --if-missing keeps what is there (a restarted pod does not rewrite it).
    out.write_bytes(b"kept")
    assert "kept" in run(["initial-model", "--out", str(out), "--if-missing"])
    assert out.read_bytes() == b"kept"
    # Another seed, another model.
    other = tmp_path / "other.safetensors"
    run(["initial-model", "--out", str(other), "--seed", "6"])
    assert file_digest(other) != expected


@pytest.mark.slow
def test_openfold3_initial_model(tmp_path: Path) -> None:
    """FOLDFED_MODEL=openfold3-tiny: θ_0 is the tiny preset's trainable state (the backend's
    own determinism is tested with the backend)."""
    pytest.importorskip("openfold3")
    env = {"FOLDFED_MODEL": "openfold3-tiny", "FOLDFED_OF3_SAMPLE": str(tmp_path)}
    out = tmp_path / "initial.safetensors"
    printed = run(["initial-model", "--out", str(out), "--seed", "1"], **env)
    assert file_digest(out).hex() in printed
    tensors = load_delta(out)
    assert len(tensors) > 100 and sum(t.numel() for t in tensors.values()) > 500_000
    assert any(name.startswith("pairformer_stack.") for name in tensors), sorted(tensors)[:5]

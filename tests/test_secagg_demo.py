"""`foldfed demo --secure-aggregation` and `foldfed demo` print the same final model digest
(issue 14, "What it must show"), with the exact codec both ways: masking changes the bytes
on the wire and what the hub can see, never the model. Long (two whole demos); its cheap
form in make test is tests/test_secagg_federation.py (a masked run = exact FedAvg)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.long, pytest.mark.slow]

DIGEST = re.compile(r"all 2 participants hold model ([0-9a-f]{64})")


def _demo(workdir: Path, *extra: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", "demo", "--participants", "2", "--steps", "2",
         "--codec", "fp32", "--workdir", str(workdir), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = DIGEST.findall(run.stdout)
    assert found, run.stdout[-3000:]
    return found[-1]


def test_secure_aggregation_demo_prints_the_plain_demos_digest(tmp_path: Path) -> None:
    plain = _demo(tmp_path / "plain")
    masked = _demo(tmp_path / "masked", "--secure-aggregation")
    assert masked == plain
    logs = list((tmp_path / "masked").rglob("company-a-uploader.log"))
    assert logs and "delta masked" in logs[0].read_text()

"""The demo's summary speaks in units a person reads: the demo's model is kilobytes, the
consortium's gigabytes, and "0.0 MB moved" told a reader nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foldfed.deltafile import write_delta
from foldfed.demo.observer import RunRecord
from foldfed.demo.report import human_bytes, wire_text
from foldfed.domain import CODEC_SAFETENSORS, Manifest, StepFinalized
from foldfed.messages import encode
from foldfed.payloadfile import plan_chunks


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (17_170, "17.2 kB"), (294_000, "294.0 kB"), (1.47e9, "1.5 GB")],
)
def test_byte_counts_read_in_the_unit_that_fits(n: float, text: str) -> None:
    assert human_bytes(n) == text


def test_the_downlink_is_counted_from_every_finalized_update_not_from_kept_files(
    tmp_path: Path,
) -> None:
    # Retention leaves only the last update files on disk; the summary must still count
    # every update the participants downloaded (their manifests come with the events).
    updates = tmp_path / "updates"
    updates.mkdir()
    path = updates / f"update-{5:012d}.safetensors"
    write_delta(path, {"w": torch.zeros(1000)})
    plan = plan_chunks(path, 1 << 20)
    record = RunRecord(("a",), steps=5)
    for step in range(1, 6):
        coded = Manifest(
            step=step, participant="hub", weight=1.0, codec=CODEC_SAFETENSORS,
            tensors=plan.tensors, chunk_size=1 << 20, payload_size=250 + step,
            chunk_digests=plan.chunk_digests, payload_digest=plan.payload_digest,
        )  # fmt: skip
        finalized = StepFinalized(step, encode(coded)[1], b"\1" * 32, 1.0, 0)
        record.record(finalized, float(step))
    text = wire_text(record, tmp_path)
    down = sum(250 + s for s in range(1, 6))
    assert f"downlink {human_bytes(down)} in 5 updates" in text
    assert f"({path.stat().st_size * 5 / down:.2f}x fewer than fp32)" in text

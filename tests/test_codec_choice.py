"""The uploader's per-site codec choice: goodput measured on its own uploads, an upload
budget, the least lossy spec the cycle allows that fits, logged with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from foldfed.chunkstore import ChunkStore
from foldfed.codecs import (
    Goodput,
    allowed_specs,
    check_choices,
    choose_for_cycle,
    require_allowed_codec,
    wire_size,
)
from foldfed.codecs.adaptive import MIN_MEASURED_BYTES
from foldfed.codedvector import CycleCoding
from foldfed.errors import CodecError
from foldfed.format import TensorSpec, encode_header
from foldfed.spool import DeltaRecord
from foldfed.uploader.coding import UplinkCoder, pick_spec

ROT2 = "rotated:v1;bits=2;block=4096;mult=2.0;rounding=stochastic;scale=block+zstd:v1;level=3"
ROT1 = "rotated:v1;bits=1;block=4096;mult=1.0;rounding=nearest;scale=block"
INT8 = "int8:v1;block=4096"
SHARED = (
    "rotated:v1;bits=2;block=4096;floor=0.01;init=0.02;mult=2.0;rounding=stochastic;scale=shared"
)
N = 1 << 20


def test_goodput_is_measured_and_smoothed() -> None:
    first = Goodput().after(4_000_000, 2.0)
    assert first == Goodput(2_000_000.0, 1)
    assert first.after(4_000_000, 1.0) == Goodput(3_000_000.0, 2)  # half old, half new


@pytest.mark.parametrize(("sent", "seconds"), [(MIN_MEASURED_BYTES - 1, 1.0), (1 << 20, 0.0)])
def test_an_upload_too_small_to_measure_leaves_the_estimate(sent: int, seconds: float) -> None:
    known = Goodput(1e6, 3)
    assert known.after(sent, seconds) is known


def test_without_member_choices_a_cycle_allows_only_its_own_spec() -> None:
    # The hub accepts exactly the cycle's spec (require_cycle_codec), whatever it is.
    assert allowed_specs(ROT2) == (ROT2,)
    assert allowed_specs("fp32:v1") == ("fp32:v1",)


def test_member_choices_are_ordered_least_lossy_first() -> None:
    # More bytes for the same vector, less loss: bf16 > int8 > the cycle's 2-bit > 1 bit.
    assert allowed_specs(ROT2, (ROT1, INT8, "bf16:v1"), N) == ("bf16:v1", INT8, ROT2, ROT1)


def test_the_least_lossy_allowed_spec_that_fits_is_chosen() -> None:
    choices = (INT8, ROT1)
    budget = 10.0
    for spec in (INT8, ROT2, ROT1):  # a link that fits exactly this one, not the one above
        goodput = Goodput(wire_size(spec, N) / budget, 1)
        choice = choose_for_cycle(ROT2, goodput, budget, N, 4 << 20, choices=choices)
        assert choice.spec == spec and choice.fits, choice.reason
    slowest = choose_for_cycle(ROT2, Goodput(1.0, 1), budget, N, 4 << 20, choices=choices)
    assert slowest.spec == ROT1 and not slowest.fits


@pytest.mark.parametrize(
    ("choices", "why"),
    [
        (("fp32:v1",), "not a choice"),
        ((SHARED,), "shared ranges"),
        ((INT8, INT8), "listed twice"),
        ((ROT2,), "listed twice"),
        (("int8:v1;block=4096;x=1",), "x"),
    ],
)
def test_member_choices_that_cannot_be_are_refused(choices: tuple[str, ...], why: str) -> None:
    with pytest.raises(CodecError, match=why):
        check_choices(ROT2, choices)
    assert check_choices(ROT2, (INT8, ROT1)) == (INT8, ROT1)


def test_the_hub_accepts_the_cycle_spec_or_a_member_choice_and_names_them() -> None:
    assert require_allowed_codec(INT8, ROT2, (INT8,)).spec == INT8
    assert require_allowed_codec(ROT2, ROT2, (INT8,)).spec == ROT2
    with pytest.raises(CodecError, match="nor is it one of the cycle's member choices"):
        require_allowed_codec(ROT1, ROT2, (INT8,))


def test_the_cycle_spec_with_whether_it_fits() -> None:
    size = wire_size(ROT2, N)
    fits = choose_for_cycle(ROT2, Goodput(size / 10.0, 1), 11.0, N, 4 << 20)
    assert fits.spec == ROT2 and fits.fits and fits.wire_bytes == size
    assert fits.seconds == pytest.approx(10.0)
    slow = choose_for_cycle(ROT2, Goodput(size / 10.0, 1), 5.0, N, 4 << 20)
    assert slow.spec == ROT2 and not slow.fits
    assert "no candidate fits" in slow.reason


def test_before_any_measurement_the_cycle_spec_is_used() -> None:
    choice = choose_for_cycle("fp32:v1", Goodput(), 1.0, N, 4 << 20)
    assert choice.spec == "fp32:v1" and choice.wire_bytes == 4 * N
    assert "no goodput measured yet" in choice.reason


def test_no_budget_no_choice() -> None:
    assert pick_spec(CycleCoding(ROT2), Goodput(1e6, 1), 0.0, N, 4 << 20) is None
    assert pick_spec(CycleCoding(ROT2), Goodput(1e6, 1), 1.0, N, 4 << 20) is not None


def _delta(tmp_path: Path, elements: int) -> DeltaRecord:
    spec = TensorSpec("w", "F32", (elements,))
    path = tmp_path / "delta.safetensors"
    path.write_bytes(encode_header([spec]) + np.zeros(elements, np.float32).tobytes())
    return DeltaRecord(1, path, path.stat().st_size, 1.0, b"\0" * 32, {})


def _coder(spool: Path) -> UplinkCoder:
    return UplinkCoder(spool, "org-a", 1 << 20, ChunkStore(spool / "downloads"))


def test_goodput_survives_a_restart_and_the_choice_is_logged(tmp_path: Path) -> None:
    coder = _coder(tmp_path / "spool")
    assert coder.goodput() == Goodput()
    coder.record_upload(2_000_000, 2.0)
    coder = _coder(tmp_path / "spool")  # a restarted uploader
    assert coder.goodput() == Goodput(1_000_000.0, 1)
    delta = _delta(tmp_path, 1 << 18)  # 1 MiB in fp32: 1.05 s at 1 MB/s
    with capture_logs() as logs:
        assert coder.choose(delta, CycleCoding(), 2.0) == "fp32:v1"
        assert coder.choose(delta, CycleCoding(), 0.5) == "fp32:v1"  # the cycle's, late
        assert coder.choose(delta, CycleCoding(), 0.0) == "fp32:v1"  # no budget: no log
    ok, late = logs
    assert ok["log_level"] == "info" and ok["fits"] and ok["expected_bytes"] == 1 << 20
    assert ok["expected_s"] == pytest.approx(1.049, abs=1e-3)
    assert ok["goodput_bps"] == 1_000_000 and ok["budget_s"] == 2.0
    assert ok["participant"] == "org-a" and ok["step"] == 1 and ok["spec"] == "fp32:v1"
    assert late["log_level"] == "warning" and not late["fits"]
    assert "no candidate fits" in late["reason"]

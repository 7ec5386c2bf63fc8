"""Error feedback (uplink and downlink) and the adaptive codec choice: pure, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.codecs import (
    CodecContext,
    Residual,
    ResidualAlreadyApplied,
    block_stats,
    carried,
    choose_codec,
    codec_from_spec,
    compensate,
    decode_vector,
    plan_chunks,
    shared_ranges,
    wire_size,
)
from foldfed.codecs.rotated import RotatedCodec
from foldfed.errors import CodecError

SHARED_1BIT = RotatedCodec(1, 64, rounding="nearest", scale="shared").spec
SHARED_2BIT = RotatedCodec(2, 64, rounding="stochastic", scale="shared").spec


def run_feedback(spec: str, deltas: list[np.ndarray], direction: str = "up") -> tuple:
    codec = codec_from_spec(spec)
    n = deltas[0].size
    plan = plan_chunks(codec, n, 1 << 20)
    residual: Residual | None = None
    stats = None  # ranges lag one step: from the last step's delta statistics
    sent = []
    sender = "hub" if direction == "down" else "org-a"
    for t, delta in enumerate(deltas, start=1):
        ranges = shared_ranges(stats, n, codec.block, mult=2.0, floor=0.01, init=0.1)
        ctx = CodecContext(1, t, sender, "down" if direction == "down" else "up", 5, ranges)
        out = compensate(delta, residual, codec, ctx, plan)
        assert out.residual.step == t
        sent.append(out.decoded)
        residual, stats = out.residual, block_stats(delta, codec.block)
    assert residual is not None
    return sent, residual


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["bf16:v1", "int8:v1;block=64", SHARED_1BIT, SHARED_2BIT]),
    st.integers(1, 400),
    st.integers(1, 12),
    st.integers(0, 2**32),
)
def test_sent_plus_residual_is_the_sum_of_deltas(spec: str, n: int, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    deltas = [(rng.standard_normal(n) * 0.1).astype(np.float32) for _ in range(steps)]
    sent, residual = run_feedback(spec, deltas)
    total = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    got = np.sum(np.array(sent, dtype=np.float64), axis=0) + residual.values
    scale = max(1.0, float(np.abs(total).max()), float(np.abs(residual.values).max()))
    assert np.allclose(got, total, rtol=0, atol=steps * 4e-7 * scale)


def test_feedback_keeps_the_error_bounded_where_plain_coding_accumulates() -> None:
    # A constant drift that 1-bit codes quantize with a bias: with EF the cumulative error
    # stays one residual; without it, it grows with the number of steps.
    rng = np.random.default_rng(0)
    drift = (rng.standard_normal(256) * 0.01 + 0.02).astype(np.float32)
    deltas = [drift] * 30
    sent, residual = run_feedback(SHARED_1BIT, deltas)
    err_ef = np.linalg.norm(np.sum(sent, axis=0) - 30 * drift)
    assert np.isclose(err_ef, np.linalg.norm(residual.values), rtol=1e-3)
    assert err_ef < 0.2 * np.linalg.norm(30 * drift)


def test_downlink_every_party_decodes_the_same_bits() -> None:
    codec = codec_from_spec(SHARED_2BIT + "+zstd:v1;level=3")
    update = (np.random.default_rng(1).standard_normal(1000) * 1e-3).astype(np.float32)
    plan = plan_chunks(codec, update.size, 1 << 20)
    ranges = shared_ranges(None, update.size, 64, mult=2.0, floor=0.01, init=1e-3)
    ctx = CodecContext(1, 4, "hub", "down", 0, ranges)
    hub = compensate(update, Residual.zero(1, update.size), codec, ctx, plan)
    member = decode_vector(codec, hub.chunks, CodecContext(1, 4, "hub", "down", 0, ranges), plan)
    assert member.tobytes() == hub.decoded.tobytes()
    theta = np.ones(1000, dtype=np.float32)
    assert (theta + member).tobytes() == (theta + hub.decoded).tobytes()


def test_restart_rules() -> None:
    values = np.arange(4, dtype=np.float32)
    stored = Residual(cycle=2, step=5, values=values)
    # s < t: carried into step t (a crash before step t committed re-encodes identically)
    assert np.array_equal(carried(stored, cycle=2, step=6, elements=4), values)
    # s = t and s > t: already applied; never again
    for step in (5, 4):
        with pytest.raises(ResidualAlreadyApplied, match="send those"):
            carried(stored, cycle=2, step=step, elements=4)
    # another cycle, or none: zeros
    assert not carried(stored, cycle=3, step=1, elements=4).any()
    assert not carried(None, cycle=2, step=1, elements=4).any()
    with pytest.raises(CodecError, match="elements"):
        carried(stored, cycle=2, step=6, elements=5)


def test_reencoding_a_step_after_a_crash_gives_the_same_bytes() -> None:
    codec = codec_from_spec(SHARED_2BIT)
    delta = (np.random.default_rng(2).standard_normal(300) * 0.1).astype(np.float32)
    plan = plan_chunks(codec, 300, 1 << 20)
    ranges = shared_ranges(None, 300, 64, mult=2.0, floor=0.01, init=0.1)
    before = Residual(1, 2, (np.ones(300) * 0.01).astype(np.float32))
    ctx = CodecContext(1, 3, "org-a", "up", 0, ranges)
    first, again = (compensate(delta, before, codec, ctx, plan) for _ in range(2))
    assert first.chunks == again.chunks
    assert first.residual.values.tobytes() == again.residual.values.tobytes()
    with pytest.raises(ResidualAlreadyApplied):
        compensate(delta, first.residual, codec, ctx, plan)


# --- adaptive choice ------------------------------------------------------------------------

LADDER = ["fp32:v1", "bf16:v1", "int8:v1;block=4096", SHARED_2BIT, SHARED_1BIT]


def test_picks_the_least_lossy_that_fits() -> None:
    n = 1_000_000
    sizes = {spec: wire_size(spec, n) for spec in LADDER}
    assert sizes["fp32:v1"] == 4 * n and sizes["bf16:v1"] == 2 * n
    goodput = 1_000_000.0  # 1 MB/s
    choice = choose_codec(goodput, 2.5, n, LADDER)
    assert choice.spec == "bf16:v1" and choice.fits
    assert "fp32:v1 do not fit" in choice.reason
    assert choose_codec(goodput, 100, n, LADDER).spec == "fp32:v1"
    tight = choose_codec(goodput, 0.2, n, LADDER)
    assert tight.spec == SHARED_1BIT and tight.fits
    hopeless = choose_codec(goodput, 0.01, n, LADDER)
    assert hopeless.spec == SHARED_1BIT and not hopeless.fits
    assert "no candidate fits" in hopeless.reason


def test_shared_codecs_change_only_at_a_cycle_start() -> None:
    n, goodput = 1_000_000, 1_000_000.0
    held = choose_codec(goodput, 0.2, n, LADDER, current="bf16:v1", at_cycle_start=False)
    assert held.spec == "bf16:v1" and not held.fits
    assert "kept until the cycle ends" in held.reason
    free = choose_codec(goodput, 0.2, n, LADDER, current="bf16:v1", at_cycle_start=True)
    assert free.spec == SHARED_1BIT
    # Between per-member codecs a site may switch at any step.
    per_member = ["fp32:v1", "bf16:v1", "int8:v1;block=4096"]
    assert choose_codec(goodput, 1.5, n, per_member, current="fp32:v1",
                        at_cycle_start=False).spec == "int8:v1;block=4096"  # fmt: skip


def test_bad_inputs_to_the_choice() -> None:
    with pytest.raises(CodecError, match="no candidate"):
        choose_codec(1.0, 1.0, 10, [])
    with pytest.raises(CodecError, match="> 0"):
        choose_codec(0.0, 1.0, 10, LADDER)
    with pytest.raises(CodecError, match="unknown codec"):
        choose_codec(1.0, 1.0, 10, ["lz4:v1"])


def test_codecs_import_no_io_or_framework_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys, foldfed.codecs; "
        "bad = {'torch', 'asyncio', 'aio_pika', 'sqlite3', 'opentelemetry', 'foldfed.v1'}; "
        "print(sorted(b for b in bad if b in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

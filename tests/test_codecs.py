"""The codec core: each codec within its documented bound, deterministic, chunk-independent;
linear codecs' sums decode (masked too) on the smallest ring; specs checked with reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foldfed.codecs import (
    CodecContext,
    block_stats,
    codec_from_spec,
    decode_vector,
    encode_vector,
    hadamard,
    packing,
    plan_chunks,
    pooled,
    randomness,
    require_cycle_codec,
    ring_bits,
    shared_ranges,
)
from foldfed.codecs.rotated import RotatedCodec, SharedScaleRule
from foldfed.codecs.scale import tree_sum
from foldfed.errors import CodecError

FAST = settings(max_examples=40, deadline=None)
BLOCK = 64


def shared_spec(bits: int, rounding: str = "stochastic", block: int = BLOCK) -> str:
    return RotatedCodec(bits, block, rounding=rounding, scale="shared").spec


def own_spec(bits: int, rounding: str = "stochastic", mult: float = 2.0) -> str:
    return RotatedCodec(bits, BLOCK, mult=mult, rounding=rounding, scale="block").spec


def vectors(max_size: int = 700, scale: float = 1e3) -> st.SearchStrategy[np.ndarray]:
    limit = float(np.float32(scale))
    floats = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=32)
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=floats)


def ctx_for(x: np.ndarray, block: int = BLOCK, sender: str = "org-a", **kw: float) -> CodecContext:
    rule = {"mult": 3.0, "floor": 0.01, "init": 1.0, **kw}
    ranges = shared_ranges(block_stats(x, block), x.size, block, **rule)
    return CodecContext(cycle=1, step=3, sender=sender, ranges=ranges)


def roundtrip(spec: str, x: np.ndarray, ctx: CodecContext) -> np.ndarray:
    codec = codec_from_spec(spec)
    plan = plan_chunks(codec, x.size, 2 * codec.chunk_bytes(codec.block))
    return decode_vector(codec, encode_vector(codec, x, ctx, plan), ctx, plan)


def blocks_of(x: np.ndarray, block: int) -> list[np.ndarray]:
    return [x[i : i + block] for i in range(0, x.size, block)]


# --- bounds (hypothesis) ------------------------------------------------------------------


@FAST
@given(vectors(scale=3e38))
def test_fp32_is_exact(x: np.ndarray) -> None:
    assert np.array_equal(roundtrip("fp32:v1", x, ctx_for(np.zeros(1))), x)


@FAST
@given(vectors(scale=1e38))
def test_bf16_within_half_an_ulp(x: np.ndarray) -> None:
    got = roundtrip("bf16:v1", x, ctx_for(np.zeros(1))).astype(np.float64)
    bound = np.maximum(np.abs(x.astype(np.float64)) * 2.0**-8, 2.0**-134)
    assert np.all(np.abs(got - x) <= bound)


@FAST
@given(vectors())
def test_int8_within_half_a_step_per_block(x: np.ndarray) -> None:
    got = roundtrip("int8:v1;block=64", x, ctx_for(np.zeros(1))).astype(np.float64)
    for xs, gs in zip(blocks_of(x.astype(np.float64), 64), blocks_of(got, 64), strict=True):
        bound = np.abs(xs).max() / 254 + 2.0**-24 * np.abs(gs)
        assert np.all(np.abs(gs - xs) <= bound * (1 + 1e-12))


def assert_within_grid(
    x: np.ndarray, got: np.ndarray, ranges: np.ndarray, bits: int, rounding: str, key: bytes
) -> None:
    """rotated's bound, block by block: per coordinate |y - ŷ| ≤ k·s + max(0, |y| - R_j),
    k = 1 (stochastic) or ½ (nearest), s = 2·R_j/(L-1); the rotation is orthonormal, so
    ‖x - x̂‖ ≤ ‖that‖ plus float rounding."""
    k = 1.0 if rounding == "stochastic" else 0.5
    for j, (xs, gs) in enumerate(zip(blocks_of(x, BLOCK), blocks_of(got, BLOCK), strict=True)):
        p = hadamard.padded_size(xs.size)
        padded = np.zeros(p)
        padded[: xs.size] = xs
        flips = randomness.signs(key, j * BLOCK, p)
        y, at = np.zeros(p), 0
        for size in hadamard.tail_sizes(xs.size):  # [BLOCK] for a full block
            part = slice(at, at + size)
            y[part] = hadamard.rotate(padded[part][None], flips[part][None])[0]
            at += size
        r = float(ranges[j])
        per = k * 2 * r / ((1 << bits) - 1) + np.maximum(0.0, np.abs(y) - r)
        norm = np.linalg.norm(xs.astype(np.float64))
        slack = 2**-20 * (norm + np.linalg.norm(gs) + math.sqrt(p) * r)
        assert np.linalg.norm(xs - gs) <= np.linalg.norm(per) * (1 + 1e-9) + slack


ROTATED_CASES = (
    vectors(),
    st.integers(1, 4),
    st.sampled_from(["stochastic", "nearest"]),
    st.floats(0.05, 4.0),
)


@FAST
@given(*ROTATED_CASES)
def test_rotated_own_scale_within_its_grid(
    x: np.ndarray, bits: int, rounding: str, mult: float
) -> None:
    codec = codec_from_spec(own_spec(bits, rounding, mult))
    ctx = ctx_for(x)
    data = codec.encode(x, ctx, 0)  # one chunk: R_j are the first 4·q bytes
    ranges = np.frombuffer(data, "<f4", count=-(-x.size // BLOCK))
    got = codec.decode(data, x.size, ctx, 0).astype(np.float64)
    assert_within_grid(x, got, ranges, bits, rounding, ctx.rotation_key())


@FAST
@given(*ROTATED_CASES)
def test_rotated_shared_scale_within_grid_plus_saturation(
    x: np.ndarray, bits: int, rounding: str, mult: float
) -> None:
    # Ranges from another vector (last step's deltas), so the grid may saturate.
    ctx = ctx_for(np.roll(x, 1) * np.float32(0.5), mult=mult)
    assert ctx.ranges is not None
    got = roundtrip(shared_spec(bits, rounding), x, ctx).astype(np.float64)
    assert_within_grid(x, got, ctx.ranges.values, bits, rounding, ctx.rotation_key())


def test_stochastic_rounding_is_unbiased() -> None:
    # Many senders' decodes of one vector average to it (no saturation with mult=4).
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    spec = shared_spec(2)
    decoded = [roundtrip(spec, x, ctx_for(x, sender=f"m{i}", mult=4.0)) for i in range(400)]
    mean = np.mean(decoded, axis=0)
    assert np.linalg.norm(mean - x) < 0.1 * np.linalg.norm(x)


# --- determinism and chunk independence ----------------------------------------------------

SPECS = [
    "fp32:v1",
    "bf16:v1",
    "int8:v1;block=64",
    own_spec(3),
    shared_spec(2),
    shared_spec(1, "nearest") + "+zstd:v1;level=3",
]


@pytest.mark.parametrize("spec", SPECS)
def test_same_inputs_same_bytes_and_chunks_stand_alone(spec: str) -> None:
    codec = codec_from_spec(spec)
    x = (np.random.default_rng(7).standard_normal(codec.block * 4 + 5) * 1e-2).astype(np.float32)
    ctx = ctx_for(x, block=codec.block)
    small = plan_chunks(codec, x.size, codec.chunk_bytes(codec.block) + 1)
    large = plan_chunks(codec, x.size, 1 << 20)
    assert small.chunks > 2 and large.chunks == 1
    chunks = encode_vector(codec, x, ctx, small)
    assert chunks == encode_vector(codec, x, ctx, small)  # a restarted member: same bytes
    whole = decode_vector(codec, encode_vector(codec, x, ctx, large), ctx, large)
    for span, data in zip(small.spans(), chunks, strict=True):
        alone = codec.encode(x[span.begin : span.end].copy(), ctx, span.first_block)
        assert alone == data
        part = codec.decode(data, span.elements, ctx, span.first_block)
        if "zstd" not in spec:  # the plan does not change what each block decodes to
            assert np.array_equal(part, whole[span.begin : span.end])
    assert np.array_equal(decode_vector(codec, chunks, ctx, small), whole)


def test_rotation_is_shared_rounding_is_per_sender() -> None:
    x = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    codec = codec_from_spec(shared_spec(2))
    a, b = ctx_for(x, sender="org-a"), ctx_for(x, sender="org-b")
    assert a.rotation_key() == b.rotation_key() and a.rounding_key() != b.rounding_key()
    assert codec.encode(x, a, 0) != codec.encode(x, b, 0)
    nearest = codec_from_spec(shared_spec(2, "nearest"))
    assert nearest.encode(x, a, 0) == nearest.encode(x, b, 0)


def test_golden_bytes_pin_the_format() -> None:
    # Any change to these bytes is a new codec version (docs/format.md, section 14).
    x = np.linspace(-1, 1, 20, dtype=np.float32)
    ranges = shared_ranges(None, 20, 8, mult=3.0, floor=0.01, init=1.0)
    ctx = CodecContext(cycle=1, step=2, sender="org-a", ranges=ranges)
    codec = codec_from_spec(shared_spec(2, block=8))
    data = codec.encode(x, ctx, 0)
    assert len(data) == codec.chunk_bytes(20) == 6  # 8 + 8 + (4 padded to 8) codes of 2 bits
    assert data.hex() == GOLDEN_ROTATED


GOLDEN_ROTATED = "6af35a55d6d5"


# --- linearity, masking and the ring -------------------------------------------------------


@FAST
@given(st.integers(2, 7), st.integers(1, 4), st.integers(1, 300), st.integers(0, 2**32))
def test_linear_sums_decode_and_fit_the_ring(members: int, bits: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(n) * rng.uniform(0.1, 3)).astype(np.float32) for _ in range(members)]
    codec = codec_from_spec(shared_spec(bits))
    assert codec.linear_shared
    stats = pooled([block_stats(x, BLOCK) for x in xs])
    ranges = shared_ranges(stats, n, BLOCK, mult=2.0, floor=0.01, init=1.0)
    ctxs = [CodecContext(1, 1, f"m{i}", ranges=ranges) for i in range(members)]
    codes = [codec.codes(x, c, 0) for x, c in zip(xs, ctxs, strict=True)]
    total = np.sum([c.astype(np.int64) for c in codes], axis=0)
    ring = ring_bits(codec.levels, members)
    assert total.max() < 1 << ring and (members * (codec.levels - 1)) < 1 << ring
    assert (members * (codec.levels - 1)) >= 1 << (ring - 1)  # and it is the smallest
    summed = codec.decode_sum(total, members, n, ctxs[0], 0)
    each = np.sum([codec.decode(codec.pack(c), n, ctxs[0], 0) for c in codes], axis=0)
    scale = np.max(ctxs[0].ranges.values) * members * math.sqrt(n)
    assert np.allclose(summed, each, rtol=0, atol=1e-5 * scale)

    # Pairwise masks on the ring cancel in the sum: the hub sees only masked codes and
    # still decodes the same sum (DESIGN: masks live on the smallest ring).
    modulus = 1 << ring
    masked = [c.astype(np.int64) for c in codes]
    for i in range(members):
        for j in range(i + 1, members):
            mask = rng.integers(0, modulus, size=total.size)
            masked[i] = (masked[i] + mask) % modulus
            masked[j] = (masked[j] - mask) % modulus
    assert np.array_equal(np.sum(masked, axis=0) % modulus, total)


@pytest.mark.parametrize("spec", ["fp32:v1", "bf16:v1", "int8:v1;block=64", own_spec(2)])
def test_per_member_codecs_are_not_linear(spec: str) -> None:
    codec = codec_from_spec(spec)
    assert not codec.linear_shared
    if isinstance(codec, RotatedCodec):
        with pytest.raises(CodecError, match="do not decode"):
            codec.decode_sum(np.zeros(64, dtype=np.int64), 2, 64, ctx_for(np.ones(64)), 0)


def test_ring_bits_examples() -> None:
    assert ring_bits(2, 1) == 1 and ring_bits(2, 5) == 3 and ring_bits(4, 5) == 4
    assert ring_bits(16, 5) == 7 and ring_bits(256, 256) == 16


# --- specs and the cycle check -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("gzip:v1", "unknown codec 'gzip'"),
        ("fp32:v2", "no version 2"),
        ("int8:v1", "missing"),
        ("int8:v1;block=64;bits=2", "unknown parameters"),
        ("int8:v1;block=064", "not a canonical integer"),
        ("rotated:v1;block=64;bits=2;mult=2.0;rounding=nearest;scale=block", "sorted"),
        (shared_spec(2).replace("mult=2.0", "mult=2"), "not canonical"),
        ("fp32:v1+gzip:v1", "unknown outer layer"),
        ("fp32", "not name:vN"),
        ("", "empty"),
    ],
)
def test_bad_specs_are_rejected_with_a_reason(spec: str, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        codec_from_spec(spec)


def test_specs_round_trip() -> None:
    for spec in SPECS:
        assert codec_from_spec(spec).spec == spec


def test_manifest_codec_must_be_the_cycles() -> None:
    cycle = shared_spec(2)
    assert require_cycle_codec(cycle, cycle).spec == cycle
    with pytest.raises(CodecError, match=r"rotated.bits 1 vs 2"):
        require_cycle_codec(shared_spec(1), cycle)
    with pytest.raises(CodecError, match="another codec"):
        require_cycle_codec("bf16:v1", cycle)


# --- bad bytes ------------------------------------------------------------------------------


def test_decoders_reject_bad_bytes() -> None:
    x = np.ones(100, dtype=np.float32)
    ctx = ctx_for(x)
    rot = codec_from_spec(shared_spec(3))
    good = rot.encode(x, ctx, 0)
    with pytest.raises(CodecError, match="take"):
        rot.decode(good[:-1], 100, ctx, 0)
    with pytest.raises(CodecError, match="padding bits"):
        packing.unpack(b"\xff", 3, 2)
    with pytest.raises(CodecError, match="non-finite"):
        codec_from_spec("fp32:v1").decode(np.array([np.nan], "<f4").tobytes(), 1, ctx, 0)
    with pytest.raises(CodecError, match="-128"):
        codec_from_spec("int8:v1;block=64").decode(b"\0\0\x80\x3f\x80", 1, ctx, 0)
    with pytest.raises(CodecError, match="non-finite"):
        rot.encode(np.array([np.inf], dtype=np.float32), ctx, 0)
    with pytest.raises(CodecError, match="shared ranges"):
        rot.encode(x, CodecContext(1, 1, "a"), 0)


def test_zstd_layer_rejects_bad_frames_and_never_grows() -> None:
    import zstandard

    codec = codec_from_spec("int8:v1;block=64+zstd:v1;level=3")
    ctx = ctx_for(np.zeros(1))
    noise = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    assert len(codec.encode(noise, ctx, 0)) <= 1 + codec.inner.chunk_bytes(64)
    zeros = codec.encode(np.zeros(4096, dtype=np.float32), ctx, 0)
    assert zeros[0] == 1 and len(zeros) < 100
    bomb = b"\x01" + zstandard.ZstdCompressor().compress(bytes(10**6))
    with pytest.raises(CodecError, match="declares"):
        codec.decode(bomb, 4096, ctx, 0)
    with pytest.raises(CodecError, match="0x00 or 0x01"):
        codec.decode(b"\x07" + zeros[1:], 4096, ctx, 0)


# --- the building blocks ---------------------------------------------------------------------


@FAST
@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=300))
def test_packing_round_trips(bits: int, raw: list[int]) -> None:
    codes = np.array(raw, dtype=np.uint8) & np.uint8((1 << bits) - 1)
    data = packing.pack(codes, bits)
    assert len(data) == packing.packed_size(codes.size, bits)
    assert np.array_equal(packing.unpack(data, bits, codes.size), codes)


def test_packing_is_little_endian_bit_order() -> None:
    assert packing.pack(np.array([1, 2, 3, 0], dtype=np.uint8), 2) == bytes([0b00111001])
    assert packing.pack(np.array([5, 6, 7], dtype=np.uint8), 3) == bytes([0b11110101, 0b1])


def test_fwht_is_the_sylvester_matrix_and_rotation_is_orthonormal() -> None:
    h = np.array([[1.0]])
    while h.shape[0] < 16:
        h = np.block([[h, h], [h, -h]])
    x = np.random.default_rng(0).standard_normal((3, 16))
    assert np.allclose(hadamard.fwht(x.copy()), x @ h.T)
    flips = randomness.signs(b"k", 0, 48).reshape(3, 16)
    y = hadamard.rotate(x, flips)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1))
    assert np.allclose(hadamard.unrotate(y, flips), x)
    assert [hadamard.padded_size(m) for m in (1, 8, 9, 100, 4096)] == [8, 8, 16, 104, 4096]
    assert hadamard.tail_sizes(705) == [512, 128, 64, 8] and hadamard.tail_sizes(64) == [64]


@pytest.mark.parametrize("size", [8, 16, 32, 64, 256, 4096])
def test_fast_fwht_gives_the_plain_passes_bits(size: int) -> None:
    # Batches and transposed low passes reorder memory, never an operation: same bits.
    rows = 3 * max(1, hadamard.BATCH_BYTES // (8 * size)) + 1  # crosses batch boundaries
    scales = 2.0 ** (np.arange(rows) % 40 - 20)  # rows of very different magnitudes
    x = np.random.default_rng(size).standard_normal((rows, size)) * scales[:, None]
    fast, plain = hadamard.fwht(x.copy()), hadamard.reference_fwht(x.copy())
    assert np.array_equal(fast.view(np.uint64), plain.view(np.uint64))


def test_streams_are_positional() -> None:
    key = randomness.stream_key("rotation", 0, 1, 2, "up")
    assert np.array_equal(randomness.signs(key, 64, 64), randomness.signs(key, 0, 128)[64:])
    u = randomness.uniforms(key, 10, 5)
    assert np.array_equal(u, randomness.uniforms(key, 0, 15)[10:])
    assert np.all((u >= 0) & (u < 1))


def test_shared_ranges_follow_the_rule() -> None:
    a = np.concatenate([np.full(64, 2.0), np.zeros(64), np.full(10, 1.0)]).astype(np.float32)
    b = np.zeros_like(a)
    stats = pooled([block_stats(b, 64), block_stats(a, 64)])
    assert stats.members == 2 and np.array_equal(stats.square_sums, [256.0, 0.0, 10.0])
    ranges = shared_ranges(stats, a.size, 64, mult=3.0, floor=0.1, init=7.0)
    overall = math.sqrt((64 * 4 + 10) / (2 * (64 + 64 + 16)))
    expected = [3.0 * math.sqrt(2.0), 3.0 * 0.1 * overall, 3.0 * math.sqrt(10 / 32)]
    assert np.allclose(ranges.values, expected)
    rule = {"mult": 3.0, "floor": 0.1, "init": 7.0}
    assert np.all(shared_ranges(None, 138, 64, **rule).values == 7.0)
    assert np.all(shared_ranges(block_stats(b, 64), 138, 64, **rule).values == 7.0)
    with pytest.raises(CodecError, match="expected"):
        shared_ranges(block_stats(a, 32), 138, 64, **rule)
    x = np.random.default_rng(0).standard_normal((2, 1000))
    assert np.allclose(tree_sum(x), x.sum(axis=1))


def test_rule_is_validated() -> None:
    with pytest.raises(CodecError):
        SharedScaleRule(init=0.0)
    with pytest.raises(CodecError):
        RotatedCodec(2, 64, mult=0.0)

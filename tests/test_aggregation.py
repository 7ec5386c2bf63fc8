"""The aggregator's arithmetic: fixed-point grid, layout, chunk decoding, the file-backed sum.

Fast, seeded, no broker. Finalizing (update, next model, server optimizers) is tested in
test_aggregation_finalize.py.
"""

from __future__ import annotations

import itertools
import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.aggregation import (
    DEFAULT_MAX_PARTICIPANTS,
    FRACTION_BITS,
    RESOLUTION,
    SCALE,
    Accumulator,
    AggregationError,
    ModelLayout,
    ServerOptimizer,
    chunk_contributions,
    contribution_bound,
    decode_span,
    dequantize_mean,
    finalize_step,
    quantize,
    quantize_chunk,
    weight_total,
)
from foldfed.aggregation.dtypes import add_in_dtype, from_float64
from foldfed.deltafile import write_delta
from foldfed.errors import Reject, StoreError
from foldfed.format import MIN_CHUNK_SIZE, TensorSpan, chunk_count
from foldfed.payloadfile import read_chunk, read_layout

SERVICES = Path(__file__).resolve().parents[1] / "services"
SHAPES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "trunk.weight": (torch.float32, (400, 1000)),  # 1.6 MB: two chunks of 1 MiB
    "trunk.bias": (torch.float32, (1000,)),
    "head.weight": (torch.bfloat16, (64, 33)),
    "norm.scale": (torch.float16, (77,)),
    "proj": (torch.float64, (5, 7)),
    "unused": (torch.float32, (0, 3)),
}
WEIGHTS = (3.0, 0.25, 1200.0, 7.5, 41.0)


def make_delta(seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """Seeded tensors of SHAPES: a delta, or with a larger scale a model."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        for name, (dtype, shape) in SHAPES.items()
    }


def write_deltas(tmp: Path, count: int = 5) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp / f"delta-{i}.safetensors"
        # A different header per participant moves its tensors to other byte offsets:
        # chunks must be mapped by tensor name, not by position.
        write_delta(path, make_delta(seed=100 + i), metadata={"site": "x" * (3 * i)})
        paths.append(path)
    return paths


def chunk_quanta(
    path: Path, weight: float, chunk_size: int = MIN_CHUNK_SIZE
) -> list[list[tuple[int, np.ndarray]]]:
    """Each chunk of the delta at `path` as the pieces an aggregator would add."""
    spans = read_layout(path)
    size = path.stat().st_size
    layout = ModelLayout.from_spans(spans)
    return [
        quantize_chunk(layout, spans, i, chunk_size, size, read_chunk(path, chunk_size, i), weight)
        for i in range(chunk_count(size, chunk_size))
    ]


def total_of(acc_path: Path, elements: int, chunks: Sequence[list[tuple[int, np.ndarray]]]):
    with Accumulator(acc_path, elements) as acc:
        for pieces in chunks:
            acc.add_all(pieces)
        return acc.read(0, elements)


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_deltas(tmp_path_factory.mktemp("deltas"))


@pytest.fixture(scope="module")
def layout(deltas: list[Path]) -> ModelLayout:
    return ModelLayout.from_spans(read_layout(deltas[0]))


# ------------------------------------------------------------------------ fixed-point grid


def test_the_grid_is_24_fraction_bits_and_bounds_the_sum_of_all_participants() -> None:
    assert FRACTION_BITS == 24 and SCALE == 2.0**24 and RESOLUTION == 2.0**-24
    bound = contribution_bound(DEFAULT_MAX_PARTICIPANTS)
    assert bound == 2**55 - 1
    assert DEFAULT_MAX_PARTICIPANTS * bound < 2**63


@pytest.mark.parametrize("weight", [1.0, 0.25, 3.0, 1200.0, 0.001])
def test_quantize_then_dequantize_is_within_half_a_grid_step_over_the_weight(
    weight: float,
) -> None:
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-8, 2, 100_000)).astype(np.float32)
    back = dequantize_mean(quantize(values, weight), weight)
    error = np.abs(back - values.astype(np.float64))
    # Half a step of rounding, plus float64 rounding of the division.
    assert error.max() <= RESOLUTION / weight / 2 + 1e-15 * np.abs(values).max()


def test_quantize_is_rint_of_the_float64_product() -> None:
    values = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.0]) / SCALE  # ties go to even
    assert quantize(values, 1.0).tolist() == [0, 2, 2, 0, -2, 3]
    x = np.float32(0.1)
    assert quantize(np.array([x]), 3.0)[0] == int(np.rint(3.0 * float(x) * SCALE))


def test_the_weighted_mean_is_exact_to_the_documented_resolution() -> None:
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(50_000).astype(np.float32) * 1e-3 for _ in WEIGHTS]
    total = np.sum([quantize(x, w) for x, w in zip(xs, WEIGHTS, strict=True)], axis=0)
    w_sum = weight_total(WEIGHTS)
    mean = dequantize_mean(total, w_sum)
    direct = sum(w * x.astype(np.float64) for x, w in zip(xs, WEIGHTS, strict=True)) / w_sum
    grid = len(WEIGHTS) * RESOLUTION / 2 / w_sum
    float_noise = (
        4 * 2.0**-52 * sum(w * np.abs(x).max() for x, w in zip(xs, WEIGHTS, strict=True)) / w_sum
    )
    assert np.abs(mean - direct).max() <= grid + float_noise


def test_the_weight_sum_does_not_depend_on_order() -> None:
    weights = [0.1, 1e16, 0.2, -1e16 + 1e16, 0.3, 1e-9, 7.0]
    sums = {weight_total(p) for p in itertools.permutations(weights)}
    assert sums == {math.fsum(weights)}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected_naming_the_tensor_and_count(bad: float) -> None:
    values = np.array([1.0, bad, 2.0, bad], dtype=np.float32)
    with pytest.raises(AggregationError, match=r"tensor 'enc\.w' has 2 non-finite values"):
        quantize(values, 1.0, tensor="enc.w")


def test_values_off_the_grid_are_rejected_with_the_magnitude_and_bound() -> None:
    # 2**31 * 2**24 = 2**55 > 2**55 - 1; the float64 just below 2**31 still fits.
    inside = np.array([np.nextafter(2.0**31, 0), -np.nextafter(2.0**31, 0)])
    assert np.abs(quantize(inside, 1.0)).max() <= contribution_bound()
    with pytest.raises(AggregationError) as caught:
        quantize(np.array([0.0, -(2.0**31)]), 1.0, tensor="big")
    assert "value out of range for the fixed-point grid: |w·x| = 2.14748e+09 > 2.14748e+09" in (
        caught.value.reason
    )
    assert isinstance(caught.value, Reject)


def test_the_bound_shrinks_with_more_participants_and_grows_with_fewer() -> None:
    value = np.array([1e9])
    quantize(value, 1.0, max_participants=2)
    with pytest.raises(AggregationError, match="out of range"):
        quantize(value, 1.0, max_participants=1024)
    with pytest.raises(AggregationError, match="out of range"):
        quantize(np.array([1e300]), 1e300)  # the product overflows to inf


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf, True])
def test_a_weight_must_be_finite_and_positive(weight: float) -> None:
    with pytest.raises(AggregationError, match="weight must be finite and positive"):
        quantize(np.zeros(3), weight)


# ------------------------------------------------------------------------ dtypes


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, info.eps, 1.0, -3.5]
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(20_000, generator=g, dtype=torch.float64) * torch.exp(
        torch.randn(20_000, generator=g, dtype=torch.float64) * 8
    )
    subnormal = torch.tensor([info.tiny / 4, -info.tiny / 8], dtype=torch.float64)
    return torch.cat([torch.tensor(special, dtype=torch.float64), spread, subnormal]).to(dtype)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.bfloat16, "BF16"),
        (torch.float16, "F16"),
        (torch.float32, "F32"),
        (torch.float64, "F64"),
    ],
)
def test_decoding_matches_torch(dtype: torch.dtype, name: str) -> None:
    t = _special_values(dtype)
    body = t.view(torch.uint8).numpy().tobytes()
    decoded = decode_span(memoryview(body), name, tensor="t")
    expected = t.to(torch.float64).numpy()
    assert decoded.dtype == np.float64
    assert np.array_equal(decoded.view(np.uint64), expected.view(np.uint64))  # -0.0 too


@pytest.mark.parametrize("dtype", ["I64", "I32", "I16", "I8", "U8", "BOOL"])
def test_integer_and_bool_tensors_are_not_averaged(dtype: str) -> None:
    with pytest.raises(AggregationError, match=f"tensor 'steps' has dtype {dtype}: only floating"):
        decode_span(b"\0" * 8, dtype, tensor="steps")
    with pytest.raises(AggregationError, match="only floating tensors are averaged"):
        ModelLayout.from_spans([TensorSpan("steps", dtype, (1,), 8, 8 + 8)])


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")]
)
def test_adding_and_rounding_in_a_dtype_match_torch_bit_for_bit(
    dtype: torch.dtype, name: str
) -> None:
    a, b = _special_values(dtype)[:-2], _special_values(dtype).flip(0)[:-2] * 0.37
    b = b.to(dtype)
    storage = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[name]

    def raw(t: torch.Tensor) -> np.ndarray:
        return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()

    ours = add_in_dtype(raw(a).view(storage), raw(b).view(storage), name)
    assert np.array_equal(ours.view(raw(a).dtype), raw(a + b))
    wide = torch.randn(50_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    wide = wide * torch.exp(wide * 12)
    assert np.array_equal(from_float64(wide.numpy(), name).view(raw(a).dtype), raw(wide.to(dtype)))


# ------------------------------------------------------------------------ layout


def test_the_layout_places_tensors_back_to_back(layout: ModelLayout) -> None:
    assert [s.offset for s in layout.slots] == list(
        itertools.accumulate([0, *(s.count for s in layout.slots[:-1])])
    )
    assert layout.elements == sum(math.prod(shape) for _, shape in SHAPES.values())
    assert {s.name for s in layout.slots} == set(SHAPES)


def _spans(**changes: tuple[str, tuple[int, ...]]) -> list[TensorSpan]:
    spec = {"a": ("F32", (2, 3)), "b": ("BF16", (4,))} | changes
    out, cursor = [], 16
    for name, (dtype, shape) in spec.items():
        size = math.prod(shape) * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
        out.append(TensorSpan(name, dtype, shape, cursor, cursor + size))
        cursor += size
    return out


@pytest.mark.parametrize(
    ("spans", "reason"),
    [
        (
            _spans(a=("F32", (3, 2))),
            r"shape mismatch for tensor 'a': expected \[2, 3\], got \[3, 2\]",
        ),
        (_spans(b=("F16", (4,))), "dtype mismatch for tensor 'b': expected BF16, got F16"),
        (_spans(c=("F32", (1,))), "tensor 'c' is not part of the model"),
        (_spans()[:1], "tensor 'b' of the model is missing"),
        (_spans() + _spans()[:1], "lists a tensor name twice"),
    ],
)
def test_a_delta_that_does_not_match_the_model_is_rejected(
    spans: list[TensorSpan], reason: str
) -> None:
    with pytest.raises(AggregationError, match=reason):
        ModelLayout.from_spans(_spans()).check_compatible(spans)


def test_chunk_contributions_cover_every_element_once_at_the_right_offset(
    deltas: list[Path], layout: ModelLayout
) -> None:
    path = deltas[3]
    spans, size = read_layout(path), path.stat().st_size
    layout.check_compatible(spans)
    flat = np.full(layout.elements, np.nan)
    for i in range(chunk_count(size, MIN_CHUNK_SIZE)):
        body = read_chunk(path, MIN_CHUNK_SIZE, i)
        for piece in chunk_contributions(layout, spans, i, MIN_CHUNK_SIZE, size, body):
            window = flat[piece.element_offset : piece.element_offset + piece.values.size]
            assert np.isnan(window).all(), f"{piece.tensor} covered twice"
            window[:] = piece.values
    original = make_delta(seed=103)
    for slot in layout.slots:
        expected = original[slot.name].to(torch.float64).reshape(-1).numpy()
        assert np.array_equal(flat[slot.offset : slot.offset + slot.count], expected), slot.name


def test_a_chunk_with_a_bad_value_yields_nothing(tmp_path: Path) -> None:
    delta = make_delta(seed=5)
    delta["trunk.bias"][7] = math.inf  # chunk 0 holds "proj" (F64) first, then this
    path = tmp_path / "bad.safetensors"
    write_delta(path, delta)
    spans, size = read_layout(path), path.stat().st_size
    body = read_chunk(path, MIN_CHUNK_SIZE, 0)
    layout = ModelLayout.from_spans(spans)
    names = [p.tensor for p in chunk_contributions(layout, spans, 0, MIN_CHUNK_SIZE, size, body)]
    assert names[:2] == ["proj", "trunk.bias"]
    with pytest.raises(AggregationError, match=r"tensor 'trunk\.bias' has 1 non-finite values"):
        quantize_chunk(layout, spans, 0, MIN_CHUNK_SIZE, size, body, 1.0)


def test_a_chunk_of_the_wrong_length_is_rejected(deltas: list[Path], layout: ModelLayout) -> None:
    spans, size = read_layout(deltas[0]), deltas[0].stat().st_size
    with pytest.raises(AggregationError, match="chunk 1 has 10 bytes"):
        chunk_contributions(layout, spans, 1, MIN_CHUNK_SIZE, size, b"\0" * 10)
    with pytest.raises(AggregationError, match="chunk index 9"):
        chunk_contributions(layout, spans, 9, MIN_CHUNK_SIZE, size, b"")


# ------------------------------------------------------------------------ the sum


def test_the_total_is_the_same_for_every_participant_order_and_chunk_interleaving(
    deltas: list[Path], layout: ModelLayout, tmp_path: Path
) -> None:
    per_site = [chunk_quanta(p, w) for p, w in zip(deltas, WEIGHTS, strict=True)]
    chunks = [c for site in per_site for c in site]
    assert len(chunks) == 10
    reference = total_of(tmp_path / "ref", layout.elements, chunks)
    acc_path = tmp_path / "acc"
    for order in itertools.permutations(range(len(deltas))):
        # Round robin over chunk indices, participants in this order.
        arrival = [c for pair in zip(*(per_site[i] for i in order), strict=True) for c in pair]
        assert np.array_equal(total_of(acc_path, layout.elements, arrival), reference), order
    rng = random.Random(6)
    for _ in range(20):
        shuffled = rng.sample(chunks, len(chunks))
        assert np.array_equal(total_of(acc_path, layout.elements, shuffled), reference)


def test_every_arrival_order_finalizes_to_the_same_bytes(
    deltas: list[Path], layout: ModelLayout, tmp_path: Path
) -> None:
    base = tmp_path / "model.safetensors"
    write_delta(base, make_delta(seed=1, scale=0.5))
    chunks = [c for p, w in zip(deltas, WEIGHTS, strict=True) for c in chunk_quanta(p, w)]
    orders = [chunks, chunks[::-1], random.Random(7).sample(chunks, len(chunks))]
    outputs = set()
    for k, arrival in enumerate(orders):
        with Accumulator(tmp_path / f"acc-{k}", layout.elements) as acc:
            for pieces in arrival:
                acc.add_all(pieces)
            result = finalize_step(
                layout,
                acc,
                weight_total(WEIGHTS[::-1]),
                base,
                tmp_path / f"update-{k}",
                tmp_path / f"model-{k}",
                ServerOptimizer("fedadam"),
                tmp_path / f"state-{k}",
                step=0,
            )
        outputs.add((result.update_path.read_bytes(), result.model_path.read_bytes()))
    assert len(outputs) == 1


def test_the_total_does_not_depend_on_the_chunk_size(
    deltas: list[Path], layout: ModelLayout, tmp_path: Path
) -> None:
    totals = [
        total_of(
            tmp_path / f"acc-{size}",
            layout.elements,
            [c for p, w in zip(deltas, WEIGHTS, strict=True) for c in chunk_quanta(p, w, size)],
        )
        for size in (MIN_CHUNK_SIZE, 2 * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE + 8)
    ]
    assert all(np.array_equal(t, totals[0]) for t in totals)


def test_a_crashed_accumulator_is_rebuilt_to_the_same_total(
    deltas: list[Path], layout: ModelLayout, tmp_path: Path
) -> None:
    chunks = [c for p, w in zip(deltas, WEIGHTS, strict=True) for c in chunk_quanta(p, w)]
    before = tmp_path / "before"
    acc = Accumulator(before, layout.elements)
    for pieces in chunks[:7]:
        acc.add_all(pieces)
    acc.add_all([(chunks[7][0][0], chunks[7][0][1][:1000])])  # half a chunk, then "crash"
    del acc
    # A new aggregator: a fresh file, every applied chunk re-added from the store.
    rebuilt = total_of(tmp_path / "after", layout.elements, chunks[::-1])
    assert np.array_equal(rebuilt, total_of(tmp_path / "once", layout.elements, chunks))
    # Reopening the old file starts from zeros: its content is not trusted.
    with Accumulator(before, layout.elements) as reopened:
        assert not reopened.read(0, layout.elements).any()


def test_an_add_that_would_overflow_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with Accumulator(tmp_path / "acc", 4) as acc:
        big = np.full(2, 2**62, dtype=np.int64)
        acc.add(0, big)
        with pytest.raises(StoreError, match="int64 overflow"):
            acc.add_all([(2, np.ones(2, dtype=np.int64)), (0, big)])
        assert acc.read(0, 4).tolist() == [2**62, 2**62, 0, 0]
        acc.add(1, np.array([-(2**62), 2**62], dtype=np.int64))  # near the edge, but fits
        assert acc.read(0, 4).tolist() == [2**62, 0, 2**62, 0]


def test_the_accumulator_checks_its_arguments(tmp_path: Path) -> None:
    with Accumulator(tmp_path / "acc", 8) as acc:
        with pytest.raises(ValueError, match="outside"):
            acc.add(6, np.ones(3, dtype=np.int64))
        with pytest.raises(ValueError, match="int64"):
            acc.add(0, np.ones(3))
        with pytest.raises(ValueError, match="overlap"):
            acc.add_all([(0, np.ones(3, dtype=np.int64)), (2, np.ones(3, dtype=np.int64))])
        acc.add(1, np.arange(3, dtype=np.int64))
        acc.reset()
        assert acc.read(0, 8).tolist() == [0] * 8
        assert (tmp_path / "acc").stat().st_size == 64


_ELEMENTS = 48
_PARTS = 6
_LIMIT = contribution_bound(_PARTS)
_piece = st.tuples(
    st.integers(0, _ELEMENTS - 1),
    st.lists(st.integers(-_LIMIT, _LIMIT), min_size=1, max_size=_ELEMENTS),
).map(lambda p: (p[0], np.array(p[1][: _ELEMENTS - p[0]], dtype=np.int64)))


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(_piece, min_size=1, max_size=_PARTS),
    data=st.data(),
)
def test_chunk_additions_commute_and_associate(
    pieces: list[tuple[int, np.ndarray]], data: st.DataObject
) -> None:
    # At most _PARTS pieces, each within the bound for _PARTS: no sum can overflow.
    exact = [0] * _ELEMENTS
    for offset, q in pieces:
        for k, value in enumerate(q.tolist()):
            exact[offset + k] += value
    order = data.draw(st.permutations(range(len(pieces))))
    split = []  # every piece cut in two at a drawn point: a finer chunking
    for i in order:
        offset, q = pieces[i]
        cut = data.draw(st.integers(0, q.size))
        split += [(offset, q[:cut]), (offset + cut, q[cut:])]
    with tempfile.TemporaryDirectory() as tmp:
        one = total_of(Path(tmp) / "a", _ELEMENTS, [[p] for p in pieces])
        other = total_of(Path(tmp) / "b", _ELEMENTS, [[p] for p in split if p[1].size])
    assert one.tolist() == exact
    assert other.tolist() == exact

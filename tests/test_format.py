"""The payload format, pure: chunk arithmetic, the canonical header encoder, and the header
parser's refusals. No torch and no files: the hub computes all of this from names, dtypes
and shapes (foldfed.format)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foldfed.errors import CodecError
from foldfed.format import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    MAX_CHUNK_SIZE,
    MAX_HEADER_SIZE,
    MIN_CHUNK_SIZE,
    TensorSpan,
    TensorSpec,
    canonical_order,
    chunk_count,
    chunk_range,
    encode_header,
    header_length,
    parse_layout,
    spans_in_chunk,
    validate_chunk_size,
)

# --- properties: pure chunk arithmetic ---------------------------------------------------


@given(payload_size=st.integers(0, 10**13), chunk_size=st.integers(1, 10**8), data=st.data())
def test_chunk_range_is_the_index_times_chunk_size_clipped(
    payload_size: int, chunk_size: int, data: st.DataObject
) -> None:
    count = chunk_count(payload_size, chunk_size)
    assert (count - 1) * chunk_size < payload_size <= count * chunk_size or count == 0
    if count == 0:
        assert payload_size == 0
        return
    index = data.draw(st.integers(0, count - 1))
    begin, end = chunk_range(payload_size, chunk_size, index)
    assert begin == index * chunk_size
    assert end == min(begin + chunk_size, payload_size)
    assert begin < end


@given(payload_size=st.integers(0, 20_000), chunk_size=st.integers(1, 5_000))
def test_chunk_ranges_tile_the_payload(payload_size: int, chunk_size: int) -> None:
    count = chunk_count(payload_size, chunk_size)
    ranges = [chunk_range(payload_size, chunk_size, i) for i in range(count)]
    cursor = 0
    for begin, end in ranges:
        assert begin == cursor and end - begin <= chunk_size
        cursor = end
    assert cursor == payload_size
    assert all(e - b == chunk_size for b, e in ranges[:-1])
    for bad in (-1, count):
        with pytest.raises(CodecError):
            chunk_range(payload_size, chunk_size, bad)


@given(
    start=st.integers(0, 1_000),
    sizes=st.lists(st.integers(0, 3_000), max_size=12),
    chunk_size=st.integers(1, 2_000),
)
def test_spans_in_chunk_covers_every_tensor_byte_exactly_once(
    start: int, sizes: list[int], chunk_size: int
) -> None:
    spans, cursor = [], start
    for i, size in enumerate(sizes):
        spans.append(TensorSpan(f"t{i}", "U8", (size,), cursor, cursor + size))
        cursor += size
    covered: dict[str, list[tuple[int, int]]] = {s.name: [] for s in spans}
    for index in range(chunk_count(cursor, chunk_size)):
        begin, end = chunk_range(cursor, chunk_size, index)
        for span, lo, hi in spans_in_chunk(spans, begin, end):
            assert begin <= lo < hi <= end
            assert span.begin <= lo and hi <= span.end
            covered[span.name].append((lo, hi))
    for span in spans:
        position = span.begin
        for lo, hi in covered[span.name]:
            assert lo == position
            position = hi
        assert position == span.end


def test_validate_chunk_size() -> None:
    for ok in (MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE + 8):
        validate_chunk_size(ok)
    for bad, reason in [
        (MIN_CHUNK_SIZE - 8, "outside"),
        (MAX_CHUNK_SIZE + 8, "outside"),
        (MIN_CHUNK_SIZE + 4, "multiple of 8"),
        (True, "must be an int"),
        (float(MIN_CHUNK_SIZE), "must be an int"),
    ]:
        with pytest.raises(CodecError, match=reason):
            validate_chunk_size(bad)  # type: ignore[arg-type]


# --- malformed headers -------------------------------------------------------------------


def _payload(header: Any, data_size: int = 0, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_size


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


_MALFORMED = {
    "short length prefix": (b"\x10\x00\x00", "truncated"),
    "header cut short": (_payload({"a": _entry("F32", [4], 0, 16)})[:20], "truncated"),
    "header too big": (struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}", "header too big"),
    "not JSON": (_payload(b"{nope"), "not JSON"),
    "not UTF-8": (_payload(b'{"\xff": 1}'), "not JSON"),
    "JSON but not an object": (_payload([1, 2]), "not a JSON object"),
    "duplicate names": (
        _payload(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
        ),
        "duplicate key",
    ),
    "overlapping offsets": (
        _payload({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, 24),
        "overlaps",
    ),
    "shape/size mismatch": (_payload({"a": _entry("F32", [3], 0, 16)}, 16), "needs 12 bytes"),
    "unknown dtype": (_payload({"a": _entry("F31", [4], 0, 16)}, 16), "unknown dtype"),
    "gap between tensors": (
        _payload({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 16, 24)}, 24),
        "gap of 8 bytes",
    ),
    "gap at the start": (_payload({"a": _entry("F32", [2], 8, 16)}, 16), "gap of 8 bytes"),
    "missing data_offsets": (_payload({"a": {"dtype": "F32", "shape": [2]}}), "exactly"),
    "negative dimension": (_payload({"a": _entry("F32", [-2], 0, 8)}), "shape must be"),
    "reversed offsets": (_payload({"a": _entry("U8", [0], 8, 0)}), "reversed"),
    "element misaligned": (
        _payload({"a": _entry("U8", [1], 0, 1), "b": _entry("F32", [1], 1, 5)}, 5),
        "not aligned",
    ),
    "data section misaligned": (
        _payload({"a": _entry("U8", [1], 0, 1)}, 1, pad=False),
        "not a multiple of 8",
    ),
    "metadata not strings": (_payload({"__metadata__": {"k": 1}}), "__metadata__"),
}


@pytest.mark.parametrize(("raw", "reason"), _MALFORMED.values(), ids=_MALFORMED.keys())
def test_parse_layout_rejects_malformed_headers(raw: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        parse_layout(raw)


def test_parse_layout_skips_metadata_and_sorts_by_offset() -> None:
    header = {
        "__metadata__": {"k": "v"},
        "late": _entry("F32", [2], 8, 16),
        "early": _entry("I64", [1], 0, 8),
        "none": _entry("F32", [0, 3], 16, 16),
    }
    raw = _payload(header, 16)
    start = len(raw) - 16
    assert parse_layout(raw) == (
        TensorSpan("early", "I64", (1,), start, start + 8),
        TensorSpan("late", "F32", (2,), start + 8, start + 16),
        TensorSpan("none", "F32", (0, 3), start + 16, start + 16),
    )


# --- the canonical header encoder --------------------------------------------------------

# A header pinned byte for byte: the same bytes `deltafile.write_delta` writes for these
# tensors (tests/test_deltafile.py checks the writer against the encoder), so every chunk
# digest ever announced depends on them.
GOLDEN_HEADER = (
    b'\x98\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"a":"1","step":"7"},'
    b'"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
    b'"b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}}   '
)


def test_the_encoder_writes_the_golden_header() -> None:
    specs = [TensorSpec("b", "BF16", (3,)), TensorSpec("w", "F32", (2, 3))]
    assert encode_header(specs, {"step": "7", "a": "1"}) == GOLDEN_HEADER


_specs = st.lists(
    st.builds(
        TensorSpec,
        name=st.text(min_size=1, max_size=8).filter(lambda n: n != "__metadata__"),
        dtype=st.sampled_from(sorted(DTYPE_SIZES)),
        shape=st.lists(st.integers(0, 40), max_size=3).map(tuple),
    ),
    max_size=8,
    unique_by=lambda s: s.name,
)


@given(specs=_specs, metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
def test_what_the_encoder_writes_the_parser_reads_back(
    specs: list[TensorSpec], metadata: dict[str, str]
) -> None:
    header = encode_header(specs, metadata)
    data = sum(s.nbytes for s in specs)
    assert len(header) % 8 == 0 and header_length(header) == len(header) - 8
    spans = parse_layout(header + bytes(data))
    ordered = canonical_order(specs)
    assert [(s.name, s.dtype, s.shape) for s in spans if s.end > s.begin] == [
        (s.name, s.dtype, s.shape) for s in ordered if s.nbytes
    ]
    assert all(span.begin % span.itemsize == 0 for span in spans)
    assert (spans[-1].end if spans else len(header)) == len(header) + data


@given(specs=_specs)
def test_the_header_does_not_depend_on_the_order_tensors_are_given_in(
    specs: list[TensorSpec],
) -> None:
    assert encode_header(specs) == encode_header(reversed(specs))


@pytest.mark.parametrize(
    ("specs", "metadata", "reason"),
    [
        ([TensorSpec("__metadata__", "F32", (1,))], None, "invalid tensor name"),
        ([TensorSpec("", "F32", (1,))], None, "invalid tensor name"),
        ([TensorSpec("a", "C64", (1,))], None, "not supported"),
        ([TensorSpec("a", "F32", (-1,))], None, "non-negative"),
        ([TensorSpec("a", "F32", (1,)), TensorSpec("a", "U8", (1,))], None, "twice"),
        ([], {"k": 1}, "__metadata__"),
    ],
)
def test_the_encoder_refuses_what_the_format_cannot_hold(
    specs: list[TensorSpec], metadata: Any, reason: str
) -> None:
    with pytest.raises(CodecError, match=reason):
        encode_header(specs, metadata)


def test_the_format_loads_without_torch() -> None:
    probe = "import sys, foldfed.format; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

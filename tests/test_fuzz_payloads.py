"""Fuzzing payload bytes: the safetensors-style header (format.parse_layout, and
payloadfile.read_layout on a file), every codec's chunk decoding, codec specs, the
per-block arrays beside the codes (shared ranges, block statistics) and the stored
error-feedback residual (codecs_store).

Contract (tests/fuzzing.py): the format and codecs raise CodecError with a reason, the
residual store StoreError; otherwise they return a value. Inputs are random bytes and
mutations of a valid encoding; headers are also mutated at the JSON level (a field
replaced by a value of another type), since most byte mutations of JSON only break its
syntax.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from fuzzing import expect_clean, fuzz, hostile_bytes, mutated
from hypothesis import example, given
from hypothesis import strategies as st

from foldfed.codecs import CodecContext, Residual, codec_from_spec
from foldfed.codecs_store import ResidualStore
from foldfed.codedvector import (
    ranges_for,
    ranges_from_bytes,
    ranges_to_bytes,
    stats_from_bytes,
)
from foldfed.errors import CodecError, StoreError
from foldfed.format import TensorSpec, encode_header, parse_layout
from foldfed.payloadfile import read_layout

SPECS = (
    "fp32:v1",
    "bf16:v1",
    "int8:v1;block=64",
    "rotated:v1;bits=3;block=64;mult=2.0;rounding=nearest;scale=block",
    "rotated:v1;bits=2;block=64;floor=0.01;init=0.001;mult=2.0;rounding=stochastic;scale=shared",
    "int8:v1;block=64+zstd:v1;level=3",
    "rotated:v1;bits=1;block=64;mult=0.8;rounding=nearest;scale=block+zstd:v1;level=1",
)
ELEMENTS = 200  # three full blocks of 64 and a short one: the tail path too


def _context(codec_spec: str) -> CodecContext:
    codec = codec_from_spec(codec_spec)
    ranges = ranges_for(codec, ELEMENTS, []) if codec.linear_shared else None
    return CodecContext(1, 2, "org-a", "up", 7, ranges)


# Sparse values so that zstd actually frames them (a flag byte of 0x01).
_X = np.zeros(ELEMENTS, dtype=np.float32)
_X[::7] = np.linspace(-3, 3, len(_X[::7]), dtype=np.float32)
CHUNKS = {spec: codec_from_spec(spec).encode(_X, _context(spec), 0) for spec in SPECS}


def test_the_valid_chunks_decode() -> None:
    for spec, chunk in CHUNKS.items():
        out = codec_from_spec(spec).decode(chunk, ELEMENTS, _context(spec), 0)
        assert out.dtype == np.float32 and out.shape == (ELEMENTS,)
    assert CHUNKS[SPECS[5]][0] == 1, "the int8+zstd sample must hold a zstd frame"


def _decode_chunk(spec: str, data: bytes, elements: int) -> np.ndarray:
    out = codec_from_spec(spec).decode(data, elements, _context(spec), 0)
    assert out.dtype == np.float32 and out.shape == (elements,)
    assert np.all(np.isfinite(out)), "a decoded chunk must be finite"
    return out


@pytest.mark.parametrize("spec", SPECS)
@fuzz(200)
@given(data=st.data())
def test_codec_decode_of_hostile_bytes_is_a_vector_or_a_codec_error(
    spec: str, data: st.DataObject
) -> None:
    raw = data.draw(hostile_bytes(CHUNKS[spec], max_random=2048))
    elements = data.draw(st.one_of(st.just(ELEMENTS), st.integers(1, 2 * ELEMENTS)))
    expect_clean("codec.decode", lambda: _decode_chunk(spec, raw, elements), (CodecError,))


@fuzz(300)
@given(
    text=st.one_of(
        st.text(max_size=60),
        st.sampled_from(SPECS).flatmap(
            lambda s: mutated(s.encode(), most=2).map(lambda b: b.decode("latin-1"))
        ),
    )
)
@example(
    text="rotated:v1;bits=2;block=64;floor=nan;init=0.001;mult=2.0;rounding=nearest;scale=shared"
)
# Regression: an integer parameter of over 4300 digits raised ValueError from int().
@example(text="int8:v1;block=1" + "0" * 5000)
def test_codec_spec_parsing_is_a_codec_or_a_codec_error(text: str) -> None:
    expect_clean("codec.spec", lambda: codec_from_spec(text), (CodecError,))


@fuzz(200)
@given(raw=st.binary(max_size=64), elements=st.integers(0, 40), block=st.sampled_from([8, 64]))
def test_ranges_and_statistics_from_bytes_are_values_or_codec_errors(
    raw: bytes, elements: int, block: int
) -> None:
    expect_clean("codec.ranges", lambda: ranges_from_bytes(raw, elements, block), (CodecError,))
    expect_clean("codec.stats", lambda: stats_from_bytes(raw, elements, block), (CodecError,))


def test_shared_ranges_that_are_not_positive_are_refused() -> None:
    # Block statistics already refuse negatives and non-finite values; ranges are the step's
    # own broadcast, named by their digest, but a reader must not build a grid on zero.
    for value in (0.0, -1.0, float("nan"), float("inf")):
        raw = np.full(1, value, dtype="<f4").tobytes()
        with pytest.raises(CodecError):
            ranges_from_bytes(raw, 8, 8)
    good = ranges_to_bytes(ranges_from_bytes(np.ones(1, "<f4").tobytes(), 8, 8))
    assert ranges_from_bytes(good, 8, 8).values.tolist() == [1.0]


# --------------------------------------------------------------------------- headers

SAMPLE_SPECS = [
    TensorSpec("layer.0.weight", "F32", (4, 8)),
    TensorSpec("layer.0.bias", "BF16", (8,)),
    TensorSpec("step", "I64", ()),
    TensorSpec("mask", "BOOL", (3,)),
]
HEADER = encode_header(SAMPLE_SPECS, {"source": "test"})
PAYLOAD = HEADER + bytes(sum(s.nbytes for s in SAMPLE_SPECS))

_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _raw_header(header: object) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


@st.composite
def json_mutated_headers(draw: st.DrawFn) -> bytes:
    """The sample header with one entry's field (or the entry) replaced by any JSON value."""
    header = json.loads(HEADER[8:])
    name = draw(st.sampled_from(sorted(header)))
    if name != "__metadata__" and draw(st.booleans()):
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = draw(_json_values)
    else:
        header[name] = draw(_json_values)
    return _raw_header(header)


@fuzz(600)
@given(
    raw=st.one_of(
        hostile_bytes(PAYLOAD),
        json_mutated_headers(),
        st.binary(max_size=16).map(lambda b: struct.pack("<Q", len(b)) + b),
    )
)
# Regression: a dtype that is not a string (here a list) raised TypeError, not CodecError.
@example(raw=_raw_header({"a": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}))
def test_parse_layout_is_a_layout_or_a_codec_error(raw: bytes) -> None:
    expect_clean("format.parse_layout", lambda: parse_layout(raw), (CodecError,))


@fuzz(150)
@given(raw=st.one_of(hostile_bytes(PAYLOAD), json_mutated_headers()))
def test_read_layout_of_a_hostile_file_is_a_layout_or_a_codec_error(
    raw: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "payload.safetensors"
    path.write_bytes(raw)
    expect_clean("payloadfile.read_layout", lambda: read_layout(path), (CodecError,))


# --------------------------------------------------------------------------- residuals


def _residual_file(tmp: Path) -> bytes:
    store = ResidualStore(tmp / "valid.resid")
    store.save(Residual(3, 5, np.linspace(-1, 1, 64, dtype=np.float32)))
    return store.path.read_bytes()


@pytest.fixture(scope="module")
def residual_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _residual_file(tmp_path_factory.mktemp("residual"))


def _header_variant(elements: object, nesting: int = 0) -> bytes:
    """A residual file whose header says `elements` (or is `nesting` deep JSON)."""
    if nesting:
        header = b"[" * nesting + b"]" * nesting
    else:
        header = json.dumps(
            {"cycle": 1, "dtype": "<f4", "elements": elements, "format": 1, "step": 1}
        ).encode()
    return b"FFRESID1" + struct.pack("<I", len(header)) + header + bytes(32)


@fuzz(300)
@given(data=st.data())
@example(data=None)
def test_residual_load_is_a_residual_or_a_store_error(
    data: st.DataObject | None,
    residual_bytes: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if data is None:  # regression: a header nested deeper than json's recursion limit
        raw = _header_variant(0, nesting=2000)
    else:
        raw = data.draw(
            st.one_of(
                hostile_bytes(residual_bytes),
                st.sampled_from([2**40, 2**62, -1, 1.5, "64", True, None]).map(_header_variant),
            )
        )
    store = ResidualStore(tmp_path_factory.getbasetemp() / "fuzzed.resid")
    store.path.write_bytes(raw)
    expect_clean("codecs_store.load", store.load, (StoreError,))

"""The model's tensors laid out in one flat accumulator, and a chunk's place in it. Pure.

The accumulator holds one int64 per element of every tensor of the model, tensor after
tensor in the order the layout was built from. A participant's payload may place tensors at
other byte offsets (a longer header, another order): chunks are mapped to the accumulator
by tensor name, never by byte offset, so that does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from foldfed.aggregation.dtypes import decode_narrow, require_floating
from foldfed.aggregation.errors import AggregationError
from foldfed.aggregation.fixedpoint import (
    DEFAULT_MAX_PARTICIPANTS,
    check_weight,
    quantize,
)
from foldfed.errors import CodecError
from foldfed.format import TensorSpan, chunk_range, spans_in_chunk


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the model and where its elements lie in the flat accumulator."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    count: int


class Contribution(NamedTuple):
    """Decoded elements of one tensor found in one chunk, and where they go."""

    element_offset: int
    values: np.ndarray
    tensor: str


@dataclass(frozen=True)
class ModelLayout:
    """The tensors of the model, each with its element offset in the flat accumulator."""

    slots: tuple[TensorSlot, ...]
    _by_name: dict[str, TensorSlot] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {slot.name: slot for slot in self.slots}
        if len(by_name) != len(self.slots):
            raise AggregationError("the model lists a tensor name twice")
        object.__setattr__(self, "_by_name", by_name)

    @classmethod
    def from_spans(cls, spans: Iterable[TensorSpan]) -> ModelLayout:
        """The layout of a payload's tensors (a manifest's or the model file's)."""
        slots: list[TensorSlot] = []
        offset = 0
        for span in spans:
            require_floating(span.name, span.dtype)
            count = math.prod(span.shape)
            slots.append(TensorSlot(span.name, span.dtype, tuple(span.shape), offset, count))
            offset += count
        return cls(tuple(slots))

    @property
    def elements(self) -> int:
        """Elements of all tensors together: the accumulator's length."""
        return sum(slot.count for slot in self.slots)

    def slot(self, name: str) -> TensorSlot:
        try:
            return self._by_name[name]
        except KeyError:
            raise AggregationError(f"tensor {name!r} is not part of the model") from None

    def check_compatible(self, spans: Sequence[TensorSpan]) -> None:
        """Raise AggregationError unless `spans` are exactly the model's tensors."""
        names = [span.name for span in spans]
        if len(set(names)) != len(names):
            raise AggregationError("the delta lists a tensor name twice")
        missing = sorted(self._by_name.keys() - set(names))
        if missing:
            raise AggregationError(f"tensor {missing[0]!r} of the model is missing from it")
        for span in spans:
            _check_span(self.slot(span.name), span)


def _check_span(slot: TensorSlot, span: TensorSpan) -> None:
    if span.dtype != slot.dtype:
        raise AggregationError(
            f"dtype mismatch for tensor {slot.name!r}: expected {slot.dtype}, got {span.dtype}"
        )
    if tuple(span.shape) != slot.shape:
        raise AggregationError(
            f"shape mismatch for tensor {slot.name!r}: "
            f"expected {list(slot.shape)}, got {list(span.shape)}"
        )


def chunk_contributions(
    layout: ModelLayout,
    spans: Sequence[TensorSpan],
    chunk_index: int,
    chunk_size: int,
    payload_size: int,
    body: bytes | memoryview,
) -> list[Contribution]:
    """Every tensor piece in chunk `chunk_index` of a payload, as float64, with its offset.

    `spans` are the payload's (its manifest's) and must have passed `check_compatible`.
    Elements never straddle chunks (see foldfed.format), so each piece decodes alone.
    """
    return [
        Contribution(offset, values.astype(np.float64), name)
        for offset, values, name in _pieces(
            layout, spans, chunk_index, chunk_size, payload_size, body
        )
    ]


def quantize_chunk(
    layout: ModelLayout,
    spans: Sequence[TensorSpan],
    chunk_index: int,
    chunk_size: int,
    payload_size: int,
    body: bytes | memoryview,
    weight: float,
    *,
    max_participants: int = DEFAULT_MAX_PARTICIPANTS,
) -> list[tuple[int, np.ndarray]]:
    """The chunk's (element_offset, int64 quanta) pieces, every one validated.

    All or nothing: a bad value anywhere in the chunk raises before any piece is returned,
    so the caller never adds half a chunk.
    """
    check_weight(weight)
    return [
        (offset, quantize(values, weight, tensor=name, max_participants=max_participants))
        for offset, values, name in _pieces(
            layout, spans, chunk_index, chunk_size, payload_size, body
        )
    ]


def quantize_vector_chunk(
    layout: ModelLayout,
    spans: Sequence[TensorSpan],
    begin: int,
    values: np.ndarray,
    weight: float,
    *,
    max_participants: int = DEFAULT_MAX_PARTICIPANTS,
) -> list[tuple[int, np.ndarray]]:
    """Decoded elements [begin, begin + len(values)) of a coded vector, as (element_offset,
    int64 quanta) pieces of the model's tensors. `spans` give element offsets in the vector
    (foldfed.codedvector) and must have passed `check_compatible`. All or nothing, as
    `quantize_chunk`: the decoded values go onto the same fixed-point grid."""
    check_weight(weight)
    end = begin + values.size
    out = []
    for span in spans:
        lo, hi = max(span.begin, begin), min(span.end, end)
        if lo >= hi:
            continue
        slot = layout.slot(span.name)
        _check_span(slot, span)
        piece = values[lo - begin : hi - begin].astype(np.float64)
        q = quantize(piece, weight, tensor=span.name, max_participants=max_participants)
        out.append((slot.offset + (lo - span.begin), q))
    return out


def chunk_values(
    layout: ModelLayout,
    spans: Sequence[TensorSpan],
    chunk_index: int,
    chunk_size: int,
    payload_size: int,
    body: bytes | memoryview,
) -> list[np.ndarray]:
    """The values of a safetensors payload's chunk, piece by piece in their own float
    dtype, unweighted: what an update bound measures (aggregation.normbound)."""
    return [values for _, values, _ in _pieces(layout, spans, chunk_index, chunk_size,
                                               payload_size, body)]  # fmt: skip


def _pieces(
    layout: ModelLayout,
    spans: Sequence[TensorSpan],
    chunk_index: int,
    chunk_size: int,
    payload_size: int,
    body: bytes | memoryview,
) -> list[tuple[int, np.ndarray, str]]:
    """(element offset, values in their own float dtype, tensor name) of each piece."""
    try:
        begin, end = chunk_range(payload_size, chunk_size, chunk_index)
    except CodecError as exc:
        raise AggregationError(str(exc)) from None
    if len(body) != end - begin:
        raise AggregationError(
            f"chunk {chunk_index} has {len(body)} bytes, its range needs {end - begin}"
        )
    view = memoryview(body)
    out = []
    for span, lo, hi in spans_in_chunk(spans, begin, end):
        slot = layout.slot(span.name)
        _check_span(slot, span)
        skipped, misaligned = divmod(lo - span.begin, span.itemsize)
        if misaligned:
            raise AggregationError(f"chunk {chunk_index} cuts an element of {span.name!r}")
        values = decode_narrow(view[lo - begin : hi - begin], span.dtype, tensor=span.name)
        out.append((slot.offset + skipped, values, span.name))
    return out

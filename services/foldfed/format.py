"""The delta payload format: its safetensors-compatible header and its cut into chunks.

Pure: computed from tensor names, dtypes and shapes only. No torch, no file I/O, so the
hub (which never loads torch) and the trainer write and read the very same bytes.
docs/format.md is the normative description; this module is its executable form.

A payload is an 8-byte little-endian header length N, N bytes of JSON header (padded
with spaces so that 8 + N is a multiple of 8), then the raw little-endian tensor data,
back to back, with no gaps. A header entry gives a tensor's dtype, shape and
`data_offsets` relative to the start of the data section; an optional `"__metadata__"`
entry maps strings to strings.

Canonical form (`encode_header`, what foldfed writes): tensors laid out by element size,
largest first, then by name; `__metadata__` first, its keys sorted; compact JSON. The
same tensors give the same bytes on every run and machine, which content addressing
needs (the safetensors library writes metadata in hash-map order).

Why chunks decode alone: the data section starts at a multiple of 8, and in canonical
order every tensor then begins at a multiple of its element size; a chunk size is a
multiple of 8, so no element ever straddles a chunk boundary (`spans_in_chunk`).
`parse_layout` rejects payloads that break this, whoever wrote them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from foldfed.errors import CodecError

MIN_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_CHUNK_SIZE = 4 << 20
# Bounds the memory a forged header can make us spend before we reject it. An OpenFold3
# header (a few thousand tensors) is well under 1 MiB.
MAX_HEADER_SIZE = 16 << 20
LEN_PREFIX = 8
ALIGN = 8
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

# safetensors dtype string -> element size in bytes.
DTYPE_SIZES: Mapping[str, int] = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the header sees it: no data, only what its bytes must look like."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor lies in a payload: absolute byte offsets, `end` exclusive."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ChunkPlan:
    """A payload cut into chunks: what a manifest announces."""

    payload_size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]
    payload_digest: bytes
    tensors: tuple[TensorSpan, ...]


# --- chunk arithmetic ----------------------------------------------------------------------


def validate_chunk_size(chunk_size: int) -> None:
    """Raise CodecError unless `chunk_size` is allowed on the wire.

    A multiple of 8, because the data section starts at 8 + header length, which
    safetensors pads to a multiple of 8, and tensors are aligned to their element size
    within it: chunk boundaries then never cut an element (at most 8 bytes wide) in two.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise CodecError(f"chunk size must be an int, got {type(chunk_size).__name__}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise CodecError(f"chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if chunk_size % ALIGN:
        raise CodecError(f"chunk size {chunk_size} is not a multiple of {ALIGN}")


def chunk_count(payload_size: int, chunk_size: int) -> int:
    """How many chunks a payload of `payload_size` bytes has: 0 for an empty one."""
    _check_sizes(payload_size, chunk_size)
    return -(-payload_size // chunk_size)


def chunk_range(payload_size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """Absolute [begin, end) of chunk `index`; only the last chunk may be short."""
    count = chunk_count(payload_size, chunk_size)
    if not 0 <= index < count:
        raise CodecError(f"chunk index {index} outside [0, {count})")
    begin = index * chunk_size
    return begin, min(begin + chunk_size, payload_size)


def spans_in_chunk(
    tensors: Sequence[TensorSpan], chunk_begin: int, chunk_end: int
) -> list[tuple[TensorSpan, int, int]]:
    """Each tensor overlapping [chunk_begin, chunk_end), with the overlap's absolute bounds.

    Empty tensors hold no bytes and overlap no chunk: a consumer that needs them (to know
    they exist) takes them from the layout, not from here.
    """
    out: list[tuple[TensorSpan, int, int]] = []
    for span in tensors:
        lo, hi = max(span.begin, chunk_begin), min(span.end, chunk_end)
        if lo < hi:
            out.append((span, lo, hi))
    return out


def _check_sizes(payload_size: int, chunk_size: int) -> None:
    if payload_size < 0:
        raise CodecError(f"payload size {payload_size} is negative")
    if chunk_size <= 0:
        raise CodecError(f"chunk size {chunk_size} is not positive")


# --- header encoding -----------------------------------------------------------------------


def canonical_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order the canonical writer lays tensors out: largest elements first, then name
    (keeps every tensor aligned to its element size, see the module docstring)."""
    return sorted(specs, key=lambda s: (-DTYPE_SIZES[s.dtype], s.name))


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and canonical JSON header of a payload holding `specs`.

    The tensor data that follows must be the tensors' bytes in `canonical_order(specs)`.
    """
    specs = list(specs)
    _check_specs(specs)
    meta = dict(metadata or {})
    check_metadata(meta)
    header: dict[str, Any] = {}
    if meta:
        header[METADATA_KEY] = dict(sorted(meta.items()))
    offset = 0
    for spec in canonical_order(specs):
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(LEN_PREFIX + len(raw)) % ALIGN)
    if len(raw) > MAX_HEADER_SIZE:
        raise CodecError(f"header too big: {len(raw)} bytes > {MAX_HEADER_SIZE}")
    return struct.pack("<Q", len(raw)) + raw


def _check_specs(specs: Sequence[TensorSpec]) -> None:
    names: set[str] = set()
    for spec in specs:
        if not isinstance(spec.name, str) or not spec.name or spec.name == METADATA_KEY:
            raise CodecError(f"invalid tensor name {spec.name!r}")
        if spec.name in names:
            raise CodecError(f"tensor {spec.name!r} listed twice")
        if spec.dtype not in DTYPE_SIZES:
            raise CodecError(f"tensor {spec.name!r}: dtype {spec.dtype} is not supported")
        if not all(_is_uint(d) for d in spec.shape):
            raise CodecError(f"tensor {spec.name!r}: shape must be non-negative ints")
        names.add(spec.name)


def check_metadata(metadata: object) -> None:
    """Raise CodecError unless `metadata` maps strings to strings."""
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("__metadata__ must map strings to strings")


# --- header parsing ------------------------------------------------------------------------


def header_length(source: bytes) -> int:
    """N, the JSON header's length, from the first 8 bytes of a payload (bounded)."""
    if len(source) < LEN_PREFIX:
        raise CodecError(f"truncated header: {len(source)} bytes, need at least {LEN_PREFIX}")
    (length,) = struct.unpack("<Q", source[:LEN_PREFIX])
    if length > MAX_HEADER_SIZE:
        raise CodecError(f"header too big: {length} bytes > {MAX_HEADER_SIZE}")
    return int(length)


def parse_layout(header_bytes_source: bytes) -> tuple[TensorSpan, ...]:
    """The tensor layout of a payload, from its first bytes (at least 8 + header length).

    Validates everything a chunk-wise decoder relies on; raises CodecError with the reason.
    Spans are sorted by `begin` and carry absolute offsets.
    """
    data_start = LEN_PREFIX + header_length(header_bytes_source)
    if len(header_bytes_source) < data_start:
        raise CodecError(
            f"truncated header: need {data_start} bytes, got {len(header_bytes_source)}"
        )
    if data_start % ALIGN:
        # Unaligned data would let chunk boundaries cut elements in two.
        raise CodecError(f"data section starts at {data_start}, not a multiple of {ALIGN}")
    header = _load_header_json(bytes(header_bytes_source[LEN_PREFIX:data_start]))
    spans = [
        _parse_entry(name, entry, data_start)
        for name, entry in header.items()
        if name != METADATA_KEY
    ]
    check_metadata(header.get(METADATA_KEY, {}))
    spans.sort(key=lambda s: (s.begin, s.end, s.name))
    _check_contiguous(spans, data_start)
    return tuple(spans)


def _load_header_json(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"header is not JSON: {exc}") from exc
    except ValueError as exc:  # from _no_duplicate_keys
        raise CodecError(f"header is not valid: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError(f"header is not a JSON object but {type(header).__name__}")
    return header


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys; two entries under one name would let
    # a header hide a tensor, so refuse them.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object, data_start: int) -> TensorSpan:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise CodecError(f"tensor {name!r}: entry must have exactly {sorted(_ENTRY_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CodecError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CodecError(f"tensor {name!r}: shape must be a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise CodecError(f"tensor {name!r}: data_offsets must be two non-negative ints")
    begin, end = offsets
    if begin > end:
        raise CodecError(f"tensor {name!r}: data_offsets [{begin}, {end}] are reversed")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CodecError(
            f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"data_offsets give {end - begin}"
        )
    if (data_start + begin) % DTYPE_SIZES[dtype]:
        raise CodecError(f"tensor {name!r}: offset {begin} not aligned to its element size")
    return TensorSpan(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_contiguous(spans: Sequence[TensorSpan], data_start: int) -> None:
    cursor = data_start
    for span in spans:
        if span.begin < cursor:
            raise CodecError(f"tensor {span.name!r}: overlaps the tensor before it")
        if span.begin > cursor:
            raise CodecError(f"tensor {span.name!r}: gap of {span.begin - cursor} bytes before it")
        cursor = span.end

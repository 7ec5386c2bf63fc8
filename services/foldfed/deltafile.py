"""A delta as a safetensors file, and its cutting into fixed-size chunks.

The payload of a delta is a safetensors file: an 8-byte little-endian header length N, N
bytes of JSON header (padded with spaces so that 8 + N is a multiple of 8), then the raw
little-endian tensor data, back to back, with no gaps. A header entry gives a tensor's
dtype, shape and `data_offsets` relative to the start of the data section; an optional
`"__metadata__"` entry maps strings to strings.

We write the file ourselves instead of calling `safetensors.torch.save_file`, for two
reasons that matter to content addressing: the library writes `__metadata__` in hash-map
order (a different order, hence different bytes and different chunk digests, on every
run), and it needs a byte copy of each tensor. Our writer emits the same bytes for the same
tensors every time, streams tensor memory straight to disk, and `safetensors` still reads
the result (`load_delta` uses it, and the tests check it).

Tensors are laid out by element size, largest first, then by name. With the data section
starting at a multiple of 8, every tensor then begins at a multiple of its element size,
and since a chunk size is a multiple of 8, no element ever straddles a chunk boundary: the
aggregator can decode each chunk on its own (`spans_in_chunk`). `parse_layout` rejects
files that break this, whoever wrote them.

Everything here blocks (disk, hashing): async callers run it in a worker thread.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from foldfed.durable import fsync_dir
from foldfed.errors import CodecError

if TYPE_CHECKING:
    import torch

MIN_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_CHUNK_SIZE = 4 << 20
# Bounds the memory a forged header can make us spend before we reject it. An OpenFold3
# header (a few thousand tensors) is well under 1 MiB.
MAX_HEADER_SIZE = 16 << 20
_LEN_PREFIX = 8
_ALIGN = 8
_METADATA_KEY = "__metadata__"
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


# torch is imported only by what needs tensors (writing and loading): the uploader and
# the hub's ingest read, cut and hash payloads without it, which saves ~200 MiB of RSS and
# two seconds of start-up per process.
@functools.cache
def _torch_dtypes() -> Mapping[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64,
        "I64": torch.int64,
        "F32": torch.float32,
        "I32": torch.int32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


@functools.cache
def _dtype_names() -> Mapping[torch.dtype, str]:
    return {v: k for k, v in _torch_dtypes().items()}


def __getattr__(name: str) -> object:
    # TORCH_DTYPES (safetensors dtype string -> torch.dtype) loads torch on first use.
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# --- chunk arithmetic (pure) ---------------------------------------------------------------


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
    if chunk_size % _ALIGN:
        raise CodecError(f"chunk size {chunk_size} is not a multiple of {_ALIGN}")


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


# --- header parsing (pure, no torch) -------------------------------------------------------


def parse_layout(header_bytes_source: bytes) -> tuple[TensorSpan, ...]:
    """The tensor layout of a payload, from its first bytes (at least 8 + header length).

    Validates everything a chunk-wise decoder relies on; raises CodecError with the reason.
    Spans are sorted by `begin` and carry absolute offsets.
    """
    header_len = _header_length(header_bytes_source)
    data_start = _LEN_PREFIX + header_len
    if len(header_bytes_source) < data_start:
        raise CodecError(
            f"truncated header: need {data_start} bytes, got {len(header_bytes_source)}"
        )
    if data_start % _ALIGN:
        # Unaligned data would let chunk boundaries cut elements in two.
        raise CodecError(f"data section starts at {data_start}, not a multiple of {_ALIGN}")
    header = _load_header_json(bytes(header_bytes_source[_LEN_PREFIX:data_start]))
    spans = [
        _parse_entry(name, entry, data_start)
        for name, entry in header.items()
        if name != _METADATA_KEY
    ]
    _check_metadata(header.get(_METADATA_KEY, {}))
    spans.sort(key=lambda s: (s.begin, s.end, s.name))
    _check_contiguous(spans, data_start)
    return tuple(spans)


def _header_length(source: bytes) -> int:
    if len(source) < _LEN_PREFIX:
        raise CodecError(f"truncated header: {len(source)} bytes, need at least {_LEN_PREFIX}")
    (header_len,) = struct.unpack("<Q", source[:_LEN_PREFIX])
    if header_len > MAX_HEADER_SIZE:
        raise CodecError(f"header too big: {header_len} bytes > {MAX_HEADER_SIZE}")
    return int(header_len)


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
    if dtype not in DTYPE_SIZES:
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


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("__metadata__ must map strings to strings")


def _check_contiguous(spans: Sequence[TensorSpan], data_start: int) -> None:
    cursor = data_start
    for span in spans:
        if span.begin < cursor:
            raise CodecError(f"tensor {span.name!r}: overlaps the tensor before it")
        if span.begin > cursor:
            raise CodecError(f"tensor {span.name!r}: gap of {span.begin - cursor} bytes before it")
        cursor = span.end


# --- files -------------------------------------------------------------------------------


def read_layout(path: Path) -> tuple[TensorSpan, ...]:
    """The layout of the payload at `path`, reading only its header from disk."""
    return _layout_and_size(path)[0]


def _layout_and_size(path: Path) -> tuple[tuple[TensorSpan, ...], int]:
    with open(path, "rb") as f:
        prefix = f.read(_LEN_PREFIX)
        header_len = _header_length(prefix)
        source = prefix + f.read(header_len)
        size = os.fstat(f.fileno()).st_size
    spans = parse_layout(source)
    # Bytes past the last tensor would travel and be hashed but decode to nothing.
    data_end = spans[-1].end if spans else len(source)
    if data_end != size:
        raise CodecError(f"{path.name}: tensors end at byte {data_end}, file has {size}")
    return spans, size


def plan_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkPlan:
    """Cut the payload at `path` into chunks: one sequential read, one chunk in memory."""
    validate_chunk_size(chunk_size)
    tensors, expected = _layout_and_size(path)
    whole = blake3.blake3()
    digests: list[bytes] = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := _read_full(f, view):
            piece = view[:n]
            digests.append(blake3.blake3(piece).digest())
            whole.update(piece)
            size += n
    if size != expected:
        raise CodecError(f"{path.name} changed while being read: {size} != {expected} bytes")
    return ChunkPlan(size, chunk_size, tuple(digests), whole.digest(), tensors)


def _read_full(f: io.FileIO, view: memoryview) -> int:
    # A raw read may return fewer bytes than asked before EOF; a chunk must be whole.
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def read_chunk(path: Path, chunk_size: int, index: int) -> bytes:
    """The bytes of chunk `index` of the payload at `path`."""
    validate_chunk_size(chunk_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        begin, end = chunk_range(os.fstat(fd).st_size, chunk_size, index)
        body = os.pread(fd, end - begin, begin)
    finally:
        os.close(fd)
    if len(body) != end - begin:
        raise CodecError(f"{path.name}: short read of chunk {index}")
    return body


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the payload at `path`, read by the safetensors library."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def write_delta(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` as a safetensors payload at `path`, atomically.

    The same tensors and metadata give the same bytes on every run and machine.
    """
    if sys.byteorder != "little":
        raise CodecError("writing deltas needs a little-endian host")
    ordered = _prepare_tensors(tensors)
    header = _encode_header(ordered, dict(metadata or {}))
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for _, tensor in ordered:
                f.write(_as_bytes(tensor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    import torch

    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == _METADATA_KEY:
            raise CodecError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise CodecError(f"tensor {name!r}: not a dense torch.Tensor")
        if tensor.dtype not in _dtype_names():
            raise CodecError(f"tensor {name!r}: dtype {tensor.dtype} is not supported")
        out.append((name, tensor.detach().to("cpu").contiguous()))
    # Largest elements first keeps every tensor aligned to its element size (see module doc).
    out.sort(key=lambda item: (-item[1].element_size(), item[0]))
    return out


def _encode_header(ordered: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    _check_metadata(metadata)
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _dtype_names()[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(_LEN_PREFIX + len(raw)) % _ALIGN)
    if len(raw) > MAX_HEADER_SIZE:
        raise CodecError(f"header too big: {len(raw)} bytes > {MAX_HEADER_SIZE}")
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    # A flat uint8 view of the tensor's own memory: no copy, whatever the dtype (bf16 too).
    import torch

    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")

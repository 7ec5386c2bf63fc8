"""Deltas as safetensors files: the torch writer (deltafile) and the torch-free reader
(payloadfile) round-trip bit-exact, cut into chunks, and match the golden digest. The pure
format (header codec, chunk arithmetic) is tested in tests/test_format.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldfed.deltafile import TORCH_DTYPES, load_delta, write_delta
from foldfed.digests import digest_of
from foldfed.errors import CodecError
from foldfed.format import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    LEN_PREFIX,
    MIN_CHUNK_SIZE,
    TensorSpec,
    chunk_count,
    chunk_range,
    encode_header,
    header_length,
    spans_in_chunk,
)
from foldfed.payloadfile import plan_chunks, read_chunk, read_layout

MiB = 1 << 20

# Guards the on-disk format: if this changes, every chunk digest ever announced changes.
GOLDEN_PAYLOAD_DIGEST = "e985212eb99f284db96aab76c9d772dd50b5ad0498b67259ee99388795e1056e"
# Guards the guard: the tensors below come from torch's RNG; if torch changed it, this
# fails instead of the format digest, so the two causes are told apart.
GOLDEN_TENSOR_BYTES_DIGEST = "e5f5db5ffc40208ca22598feba707a81ce898617447377e5e8bec1cf4d9cef10"


def _bits(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, so comparisons are bit-exact (NaN payloads, -0.0, bf16)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert _bits(loaded[name]) == _bits(tensor), name


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(700, 1000, generator=g)  # 2.8 MB: spans several 1 MiB chunks
    return {
        "encoder.weight": weight,
        "encoder.weight_t": weight[:50, :40].t(),  # non-contiguous input
        "encoder.bias": torch.randn(1000, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(333, 3, generator=g).to(torch.float16),
        "head.special": torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float32),
        "steps": torch.arange(17, dtype=torch.int64),
        "scale": torch.tensor(0.125),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.tensor([-3, 7], dtype=torch.int8),
        "wide": torch.randn(5, generator=g, dtype=torch.float64),
    }


def _reassemble(path: Path, chunk_size: int, count: int) -> bytes:
    return b"".join(read_chunk(path, chunk_size, i) for i in range(count))


# --- round trips ---------------------------------------------------------------------------


def test_mixed_dtypes_round_trip_bit_exact_through_chunks(tmp_path: Path) -> None:
    tensors = _mixed_state_dict()
    path = tmp_path / "delta.safetensors"
    write_delta(path, tensors, {"step": "3"})
    plan = plan_chunks(path, MIN_CHUNK_SIZE)

    raw = path.read_bytes()
    assert plan.payload_size == len(raw)
    assert plan.payload_digest == digest_of(raw)
    assert len(plan.chunk_digests) == chunk_count(len(raw), MIN_CHUNK_SIZE) > 2
    rebuilt = _reassemble(path, plan.chunk_size, len(plan.chunk_digests))
    assert rebuilt == raw
    for i, digest in enumerate(plan.chunk_digests):
        assert digest_of(read_chunk(path, plan.chunk_size, i)) == digest

    _assert_same(load_delta(path), tensors)
    _assert_same(safetensors.torch.load(rebuilt), tensors)
    assert plan.tensors == read_layout(path)
    assert {s.name for s in plan.tensors} == tensors.keys()


def test_chunks_decode_on_their_own_into_the_original_tensors(tmp_path: Path) -> None:
    # What the streaming aggregator does: each chunk alone, no element cut in two.
    tensors = _mixed_state_dict()
    path = tmp_path / "delta.safetensors"
    write_delta(path, tensors)
    plan = plan_chunks(path, MIN_CHUNK_SIZE)
    decoded = dict.fromkeys(tensors, 0)
    for index in range(len(plan.chunk_digests)):
        begin, end = chunk_range(plan.payload_size, plan.chunk_size, index)
        body = read_chunk(path, plan.chunk_size, index)
        for span, lo, hi in spans_in_chunk(plan.tensors, begin, end):
            assert (lo - span.begin) % span.itemsize == 0
            assert (hi - span.begin) % span.itemsize == 0
            piece = bytearray(body[lo - begin : hi - begin])
            typed = torch.frombuffer(piece, dtype=TORCH_DTYPES[span.dtype])
            first = (lo - span.begin) // span.itemsize
            expected = tensors[span.name].reshape(-1)[first : first + typed.numel()]
            assert _bits(typed) == _bits(expected), span.name
            decoded[span.name] += typed.numel()
    assert decoded == {name: t.numel() for name, t in tensors.items()}


def test_every_tensor_starts_aligned_to_its_element_size(tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    write_delta(path, _mixed_state_dict())
    for span in read_layout(path):
        assert span.begin % span.itemsize == 0, span


def test_write_is_deterministic_whatever_the_insertion_order(tmp_path: Path) -> None:
    tensors = _mixed_state_dict()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_delta(a, tensors, {"x": "1", "a": "2", "m": "3"})
    write_delta(b, dict(reversed(tensors.items())), {"m": "3", "a": "2", "x": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_golden_delta_has_a_fixed_payload_digest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "layer.weight": torch.randn(2, 3),
        "layer.bias": torch.randn(3).to(torch.bfloat16),
    }
    rng_bytes = _bits(tensors["layer.weight"]) + _bits(tensors["layer.bias"])
    assert digest_of(rng_bytes).hex() == GOLDEN_TENSOR_BYTES_DIGEST, "torch RNG changed"
    path = tmp_path / "golden.safetensors"
    write_delta(path, tensors, {"step": "7"})
    plan = plan_chunks(path, DEFAULT_CHUNK_SIZE)
    assert plan.payload_digest.hex() == GOLDEN_PAYLOAD_DIGEST
    assert plan.chunk_digests == (plan.payload_digest,)


def test_the_writer_writes_the_pure_encoders_header(tmp_path: Path) -> None:
    # The hub builds headers with format.encode_header from names, dtypes and shapes, and
    # never loads torch: its files must be the writer's byte for byte.
    tensors = _mixed_state_dict()
    path = tmp_path / "delta.safetensors"
    write_delta(path, tensors, {"step": "3"})
    raw = path.read_bytes()
    specs = [TensorSpec(n, _dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    header = encode_header(specs, {"step": "3"})
    assert raw[: LEN_PREFIX + header_length(raw)] == header


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    write_delta(path, {"a": torch.zeros(3)})
    write_delta(path, {"b": torch.ones(2)})
    assert list(tmp_path.iterdir()) == [path]
    assert load_delta(path).keys() == {"b"}


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"z": torch.zeros(2, dtype=torch.complex64)}, "not supported"),
        ({"__metadata__": torch.zeros(2)}, "invalid tensor name"),
        ({"": torch.zeros(2)}, "invalid tensor name"),
        ({"s": torch.zeros(4).to_sparse()}, "dense"),
    ],
)
def test_write_rejects_what_it_cannot_encode(
    tmp_path: Path, tensors: dict[str, torch.Tensor], reason: str
) -> None:
    path = tmp_path / "delta.safetensors"
    with pytest.raises(CodecError, match=reason):
        write_delta(path, tensors)
    assert list(tmp_path.iterdir()) == []


def test_layout_reads_files_the_safetensors_library_wrote(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in _mixed_state_dict().items()}
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"k": "v"})
    spans = read_layout(path)
    assert {s.name: (s.dtype, s.shape) for s in spans} == {
        name: (_dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()
    }
    plan = plan_chunks(path, MIN_CHUNK_SIZE)
    assert plan.payload_digest == digest_of(path.read_bytes())


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in TORCH_DTYPES.items() if d == dtype)


def test_read_layout_rejects_trailing_bytes_and_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    write_delta(path, {"a": torch.zeros(4)})
    raw = path.read_bytes()
    path.write_bytes(raw + b"\0" * 8)
    with pytest.raises(CodecError, match="file has"):
        read_layout(path)
    path.write_bytes(raw[:-4])
    with pytest.raises(CodecError, match="file has"):
        plan_chunks(path, MIN_CHUNK_SIZE)


def test_read_chunk_rejects_an_index_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    write_delta(path, {"a": torch.zeros(4)})
    with pytest.raises(CodecError, match="outside"):
        read_chunk(path, MIN_CHUNK_SIZE, 1)


# --- property: plan_chunks over real files -----------------------------------------------

_DTYPES = sorted(TORCH_DTYPES)
_layouts = st.lists(
    st.tuples(st.sampled_from(_DTYPES), st.integers(0, (3 * MiB) // 2)), min_size=0, max_size=4
)
_chunk_sizes = st.sampled_from([MIN_CHUNK_SIZE, MIN_CHUNK_SIZE + 8, 2 * MiB - 8, 3 * MiB])


def _random_tensors(layout: list[tuple[str, int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, (dtype, nbytes) in enumerate(layout):
        numel = nbytes // DTYPE_SIZES[dtype]
        raw = torch.randint(0, 256, (numel * DTYPE_SIZES[dtype],), dtype=torch.uint8, generator=g)
        tensor = raw.view(TORCH_DTYPES[dtype]) if dtype != "BOOL" else raw % 2 == 1
        out[f"t{i}.{dtype.lower()}"] = tensor
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=_layouts, chunk_size=_chunk_sizes, seed=st.integers(0, 2**31))
def test_chunks_concatenate_to_the_file_and_match_their_digests(
    layout: list[tuple[str, int]], chunk_size: int, seed: int
) -> None:
    tensors = _random_tensors(layout, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "delta.safetensors"
        write_delta(path, tensors)
        plan = plan_chunks(path, chunk_size)
        raw = path.read_bytes()
        count = len(plan.chunk_digests)
        assert count == chunk_count(len(raw), chunk_size)
        assert _reassemble(path, chunk_size, count) == raw
        assert plan.chunk_digests == tuple(
            digest_of(raw[b:e])
            for b, e in (chunk_range(len(raw), chunk_size, i) for i in range(count))
        )
        assert plan.payload_digest == digest_of(raw)
        _assert_same(load_delta(path), tensors)

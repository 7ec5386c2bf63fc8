"""Pure manifest checks: what the hub refuses before it stores a single byte."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed.deltafile import write_delta
from foldfed.digests import digest_of
from foldfed.domain import CODEC_SAFETENSORS, Manifest
from foldfed.errors import Reject
from foldfed.format import DTYPE_SIZES, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TensorSpan
from foldfed.ingest.checks import check_body_size, check_chunk_body, check_manifest
from foldfed.payloadfile import plan_chunks

MiB = 1 << 20
MAX_PAYLOAD = 64 * MiB
HEADER = 64  # bytes before the first tensor in these hand-made layouts


def _layout(
    *specs: tuple[str, str, tuple[int, ...]], start: int = HEADER
) -> tuple[TensorSpan, ...]:
    spans, cursor = [], start
    for name, dtype, shape in specs:
        size = DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        spans.append(TensorSpan(name, dtype, shape, cursor, cursor + size))
        cursor += size
    return tuple(spans)


def _manifest(
    tensors: tuple[TensorSpan, ...] | None = None,
    payload_size: int | None = None,
    chunk_size: int = MiB,
    n_digests: int | None = None,
) -> Manifest:
    if tensors is None:
        tensors = _layout(("w", "F32", (1024, 600)), ("b", "BF16", (600,)), ("s", "F32", ()))
    if payload_size is None:
        payload_size = max((t.end for t in tensors), default=HEADER)
    if n_digests is None:
        n_digests = -(-payload_size // chunk_size) if chunk_size > 0 else 1
    return Manifest(
        step=1,
        participant="org-a",
        weight=10.0,
        codec=CODEC_SAFETENSORS,
        tensors=tensors,
        chunk_size=chunk_size,
        payload_size=payload_size,
        chunk_digests=tuple(digest_of(i.to_bytes(4, "little")) for i in range(n_digests)),
        payload_digest=digest_of(b"payload"),
    )


def _rejected(m: Manifest, needle: str, max_payload: int = MAX_PAYLOAD) -> str:
    with pytest.raises(Reject) as info:
        check_manifest(m, max_payload)
    assert needle in info.value.reason
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_the_hand_made_manifest_is_valid() -> None:
    m = _manifest()
    assert m.payload_size > 2 * MiB  # several chunks
    check_manifest(m, MAX_PAYLOAD)


def test_a_real_manifest_from_a_delta_file_is_accepted(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "enc.weight": torch.randn(700, 1000, generator=g),
        "enc.bias": torch.randn(1000, generator=g).to(torch.bfloat16),
        "head": torch.randn(33, 3, generator=g).to(torch.float16),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scale": torch.tensor(0.5),
    }
    write_delta(tmp_path / "d.safetensors", tensors)
    plan = plan_chunks(tmp_path / "d.safetensors", MiB)
    m = Manifest(
        step=1,
        participant="org-a",
        weight=3.0,
        codec=CODEC_SAFETENSORS,
        tensors=plan.tensors,
        chunk_size=plan.chunk_size,
        payload_size=plan.payload_size,
        chunk_digests=plan.chunk_digests,
        payload_digest=plan.payload_digest,
    )
    assert len(m.chunk_digests) == 3
    check_manifest(m, MAX_PAYLOAD)
    _rejected(m, "outside", max_payload=plan.payload_size - 1)


@pytest.mark.parametrize(
    "chunk_size",
    [0, MIN_CHUNK_SIZE - 8, MIN_CHUNK_SIZE + 4, MAX_CHUNK_SIZE + 8, 2 * MAX_CHUNK_SIZE],
)
def test_rejects_a_bad_chunk_size(chunk_size: int) -> None:
    _rejected(_manifest(chunk_size=chunk_size, n_digests=3), "bad chunk_size")


def test_rejects_a_zero_payload_size() -> None:
    _rejected(_manifest(tensors=_layout(("e", "F32", (0,))), payload_size=0), "payload_size 0")


def test_rejects_a_payload_over_the_maximum() -> None:
    m = _manifest()
    check_manifest(m, max_payload_bytes=m.payload_size)  # the bound itself is allowed
    _rejected(m, f"payload_size {m.payload_size} outside", max_payload=m.payload_size - 1)


@pytest.mark.parametrize("delta", [-3, -1, 1, 100])
def test_rejects_the_wrong_number_of_chunk_digests(delta: int) -> None:
    good = len(_manifest().chunk_digests)
    _rejected(_manifest(n_digests=good + delta), f"lists {good + delta} chunk digests")


def test_rejects_a_manifest_without_tensors() -> None:
    _rejected(_manifest(tensors=(), payload_size=HEADER), "no tensors")


def test_rejects_a_tensor_listed_twice() -> None:
    tensors = _layout(("w", "F32", (4,)), ("x", "F32", (4,)), ("w", "F32", (4,)))
    _rejected(_manifest(tensors), "'w' listed twice")


@pytest.mark.parametrize("dtype", ["F8", "f32", "", "U64", "COMPLEX64"])
def test_rejects_an_unknown_dtype(dtype: str) -> None:
    tensors = (TensorSpan("w", dtype, (4,), HEADER, HEADER + 16),)
    _rejected(_manifest(tensors), "unknown dtype")


@pytest.mark.parametrize(
    "span",
    [
        TensorSpan("w", "F32", (4, 4), HEADER, HEADER + 63),  # one byte short
        TensorSpan("w", "F32", (4, 4), HEADER, HEADER + 65),  # one byte long
        TensorSpan("w", "F16", (4, 4), HEADER, HEADER + 64),  # F32's size under F16
        TensorSpan("w", "F32", (), HEADER, HEADER),  # a scalar has one element
        TensorSpan("w", "F32", (0, 4), HEADER, HEADER + 4),  # an empty tensor has none
        TensorSpan("w", "F32", (4,), HEADER + 16, HEADER),  # reversed
    ],
)
def test_rejects_a_byte_range_that_does_not_match_the_shape(span: TensorSpan) -> None:
    _rejected(_manifest((span,), payload_size=HEADER + 128), "byte range does not match")


def test_rejects_overlapping_ranges() -> None:
    a, b = _layout(("a", "F32", (8,)), ("b", "F32", (8,)))
    overlapping = dataclasses.replace(b, begin=b.begin - 4, end=b.end - 4)
    _rejected(_manifest((a, overlapping), payload_size=b.end), "overlaps")


def test_rejects_ranges_out_of_payload_order() -> None:
    a, b = _layout(("a", "F32", (8,)), ("b", "F32", (8,)))
    _rejected(_manifest((b, a), payload_size=b.end), "overlaps")


def test_rejects_a_range_past_the_payload() -> None:
    tensors = _layout(("a", "F32", (8,)), ("b", "F32", (8,)))
    _rejected(_manifest(tensors, payload_size=tensors[-1].end - 1), "leaves the payload")


# Layouts as a writer may make them: any dtypes and shapes, laid out back to back.
_specs = st.lists(
    st.tuples(
        st.sampled_from(sorted(DTYPE_SIZES)),
        st.lists(st.integers(0, 40), max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_specs, st.integers(1, 64).map(lambda k: 8 * k), st.integers(1, 3))
def test_any_back_to_back_layout_is_accepted(
    specs: list[tuple[str, tuple[int, ...]]], start: int, trailing: int
) -> None:
    # As write_delta lays them out: largest elements first, so every tensor is aligned.
    specs = sorted(specs, key=lambda spec: -DTYPE_SIZES[spec[0]])
    tensors = _layout(*((f"t{i}", d, s) for i, (d, s) in enumerate(specs)), start=start)
    check_manifest(_manifest(tensors, payload_size=tensors[-1].end), MAX_PAYLOAD)
    # Bytes after the last tensor are not part of any tensor: refused.
    with pytest.raises(Reject, match="tensors end at byte"):
        check_manifest(_manifest(tensors, payload_size=tensors[-1].end + trailing), MAX_PAYLOAD)


def test_rejects_a_gap_and_a_misaligned_tensor() -> None:
    a, b = _layout(("a", "F32", (8,)), ("b", "F32", (8,)))
    gap = dataclasses.replace(b, begin=b.begin + 4, end=b.end + 4)
    _rejected(_manifest((a, gap), payload_size=gap.end), "gap before it")
    c, d = _layout(("c", "I8", (3,)), ("d", "F32", (2,)))
    _rejected(_manifest((c, d), payload_size=d.end), "not aligned")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_specs, st.data())
def test_any_layout_with_one_range_stretched_is_rejected(
    specs: list[tuple[str, tuple[int, ...]]], data: st.DataObject
) -> None:
    tensors = list(_layout(*((f"t{i}", d, s) for i, (d, s) in enumerate(specs))))
    victim = data.draw(st.integers(0, len(tensors) - 1))
    stretch = data.draw(st.sampled_from([-1, 1, 8]))
    tensors[victim] = dataclasses.replace(tensors[victim], end=tensors[victim].end + stretch)
    payload_size = max(t.end for t in tensors) + 8
    with pytest.raises(Reject):
        check_manifest(_manifest(tuple(tensors), payload_size=payload_size), MAX_PAYLOAD)


# ------------------------------------------------------------------------ chunk checks


def test_check_chunk_body_accepts_every_chunk_of_the_manifest() -> None:
    m = _manifest()
    last = len(m.chunk_digests) - 1
    for i, d in enumerate(m.chunk_digests):
        size = m.payload_size - last * MiB if i == last else MiB
        check_chunk_body(m, i, d, size)


def test_check_chunk_body_rejects_index_size_and_digest() -> None:
    m = _manifest()
    n = len(m.chunk_digests)
    with pytest.raises(Reject, match="out of range"):
        check_chunk_body(m, n, m.chunk_digests[0], MiB)
    with pytest.raises(Reject, match="the manifest says"):
        check_chunk_body(m, 0, m.chunk_digests[0], MiB - 8)
    with pytest.raises(Reject, match="the manifest says"):
        check_chunk_body(m, n - 1, m.chunk_digests[n - 1], MiB)  # the last chunk is short
    with pytest.raises(Reject, match="not the manifest's"):
        check_chunk_body(m, 0, m.chunk_digests[1], MiB)


def test_check_body_size_allows_the_maximum_and_no_more() -> None:
    check_body_size(MAX_CHUNK_SIZE)
    with pytest.raises(Reject, match="oversized chunk"):
        check_body_size(MAX_CHUNK_SIZE + 1)

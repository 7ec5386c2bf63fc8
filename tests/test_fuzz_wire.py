"""Fuzzing the wire: every protobuf message type through `messages.decode`, and manifests
through the hub's ingest checks (checks.check_manifest, then codedvector.check_coding).

A peer controls every byte of these. The contract (tests/fuzzing.py): `decode` returns a
message or raises DecodeError with a reason, keeping the raw bytes; the ingest checks
accept or raise Reject with a reason. Inputs: random bytes, mutations of a valid encoding
of each message type (a safetensors manifest, coded manifests with and without shared
ranges, and every other type), and manifests whose fields are drawn at the domain level
(hostile sizes, shapes, offsets, weights and chunk lists) then encoded.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from fuzzing import expect_clean, fuzz, hostile_bytes, mutated
from hypothesis import given
from hypothesis import strategies as st

from foldfed.codecs import CodecContext, block_stats, codec_from_spec, encode_vector
from foldfed.codedvector import CycleCoding, check_coding, chunk_plan, stats_to_bytes, vector_spans
from foldfed.digests import digest_of
from foldfed.domain import (
    CODEC_CODED_VECTOR,
    CODEC_SAFETENSORS,
    Chunk,
    DeliveryReceipt,
    Event,
    FinalizeRequest,
    HaveReply,
    HaveRequest,
    Heartbeat,
    Manifest,
    ModelReport,
    StepFinalized,
    StepReleased,
)
from foldfed.errors import DecodeError, Reject
from foldfed.format import TensorSpan
from foldfed.ingest.checks import check_manifest
from foldfed.ingest.rules import check_chunk
from foldfed.messages import decode, encode

MiB = 1 << 20
MAX_PAYLOAD = 1 << 30
D0, D1, D2 = digest_of(b"0"), digest_of(b"1"), digest_of(b"2")
INT8 = "int8:v1;block=256"
SHARED = (
    "rotated:v1;bits=2;block=256;floor=0.01;init=0.001;mult=2.0;rounding=stochastic;scale=shared"
)
RANGES = digest_of(b"the step's shared ranges")


def _coded_manifest(spec: str) -> Manifest:
    """A manifest that check_coding accepts for `spec` (1000 float32 elements, one chunk)."""
    codec = codec_from_spec(spec)
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    m = Manifest(
        step=3,
        participant="org-a",
        weight=1.0,
        codec=CODEC_CODED_VECTOR,
        tensors=vector_spans([("w", "F32", (10, 100))]),
        chunk_size=MiB,
        payload_size=0,
        chunk_digests=(),
        payload_digest=D0,
        base_model_digest=D1,
        codec_spec=spec,
        cycle=2,
        codec_seed=9,
        shared_ranges_digest=RANGES if codec.linear_shared else b"",
        block_stats=stats_to_bytes(block_stats(x, codec.block)) if codec.linear_shared else b"",
    )
    ranges = None
    if codec.linear_shared:
        from foldfed.codedvector import ranges_for

        ranges = ranges_for(codec, x.size, [])
    ctx = CodecContext(2, 3, "org-a", "up", 9, ranges)
    chunks = encode_vector(codec, x, ctx, chunk_plan(m, codec))
    return dataclasses.replace(
        m,
        payload_size=sum(len(c) for c in chunks),
        chunk_sizes=tuple(len(c) for c in chunks),
        chunk_digests=tuple(digest_of(c) for c in chunks),
    )


SAFETENSORS_MANIFEST = Manifest(
    step=3,
    participant="org-a",
    weight=1.0,
    codec=CODEC_SAFETENSORS,
    tensors=(
        TensorSpan("w", "F32", (512, 1024), 64, 64 + 2 * MiB),
        TensorSpan("b", "BF16", (1024,), 64 + 2 * MiB, 64 + 2 * MiB + 2048),
    ),
    chunk_size=MiB,
    payload_size=64 + 2 * MiB + 2048,
    chunk_digests=(D0, D1, D2),
    payload_digest=D0,
    base_model_digest=D1,
)
MANIFESTS = {
    "safetensors": SAFETENSORS_MANIFEST,
    "int8": _coded_manifest(INT8),
    "shared": _coded_manifest(SHARED),
}
CODINGS = (
    CycleCoding(),
    CycleCoding(INT8, 9, 2),
    CycleCoding(SHARED, 9, 2, RANGES),
    CycleCoding(SHARED, 9, 2, RANGES, (INT8,)),
)

VALID = {
    **{f"manifest-{k}": m for k, m in MANIFESTS.items()},
    "chunk": Chunk(3, "org-a", 1, digest_of(b"body" * 64), b"body" * 64),
    "have-request": HaveRequest(3, "org-a", D0, "req-1"),
    "have-reply": HaveReply(3, "org-a", D0, "req-1", (0, 4, 9), "unknown manifest"),
    "receipt": DeliveryReceipt(3, "org-a", D0, D1, 3, 3 * MiB, 1, 1_700_000_000_000),
    "released": StepReleased(
        4,
        D2,
        ("org-a", "org-b"),
        1_700_000_000_000,
        b"\x08\x01",
        2,
        False,
        SHARED,
        9,
        (INT8,),
        (1.0, 2.5),
        0.5,
    ),
    "finalize": FinalizeRequest(4, ("org-a", "org-b"), 2),
    "finalized": StepFinalized(4, b"\x08\x01", D2, 3.5, 17),
    "model-report": ModelReport(4, "org-a", D2, {"loss": 0.25}, 17),
    "event": Event("delivered", "ingest", "org-a", 3, "ok", {"bytes": 1e9}, 17),
    "heartbeat": Heartbeat("uploader", "org-a", 3, "uploading", 42),
}
ENCODED = {name: encode(msg) for name, msg in VALID.items()}


def test_the_campaign_covers_every_message_type() -> None:
    from foldfed.messages import _PROTO_BY_TYPE

    assert {type_name for type_name, _ in ENCODED.values()} == set(_PROTO_BY_TYPE)


def test_the_valid_samples_pass_every_check() -> None:
    for name, (type_name, data) in ENCODED.items():
        assert decode(type_name, data) == VALID[name]
    for m, coding in zip(MANIFESTS.values(), CODINGS, strict=False):
        check_manifest(m, MAX_PAYLOAD)
        check_coding(m, coding)


def _decode(type_name: str | None, data: bytes) -> object:
    try:
        return decode(type_name, data)
    except DecodeError as exc:
        assert exc.raw == data, "DecodeError must keep the raw bytes for the dead-letter queue"
        raise


@pytest.mark.parametrize("name", sorted(ENCODED))
@fuzz(150)
@given(data=st.data())
def test_decode_of_hostile_bytes_is_a_message_or_a_decode_error(
    name: str, data: st.DataObject
) -> None:
    type_name, valid = ENCODED[name]
    raw = data.draw(hostile_bytes(valid))
    expect_clean("messages.decode", lambda: _decode(type_name, raw), (DecodeError,))


@fuzz(100)
@given(type_name=st.one_of(st.none(), st.text(max_size=40)), raw=st.binary(max_size=64))
def test_decode_of_an_unknown_type_is_a_decode_error(type_name: str | None, raw: bytes) -> None:
    expect_clean("messages.decode", lambda: _decode(type_name, raw), (DecodeError,))


def _ingest(type_name: str, raw: bytes, coding: CycleCoding) -> None:
    """What the hub's ledger runs on a manifest, in its order (ingest/ledger.py)."""
    m = decode(type_name, raw)
    assert isinstance(m, Manifest)
    check_manifest(m, MAX_PAYLOAD)
    check_coding(m, coding)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
@fuzz(200)
@given(data=st.data(), coding=st.sampled_from(CODINGS))
def test_ingest_checks_of_mutated_manifests_accept_or_reject(
    name: str, data: st.DataObject, coding: CycleCoding
) -> None:
    type_name, valid = ENCODED[f"manifest-{name}"]
    raw = data.draw(mutated(valid, most=3))
    expect_clean("ingest.manifest", lambda: _ingest(type_name, raw, coding), (DecodeError, Reject))


_sizes = st.one_of(
    st.integers(0, 4 * MiB), st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])
)
_tensors = st.builds(
    TensorSpan,
    name=st.text(max_size=8),
    dtype=st.sampled_from(["F32", "BF16", "F64", "I8", "U8", "X9", ""]),
    shape=st.lists(st.one_of(st.integers(0, 4096), _sizes), max_size=3).map(tuple),
    begin=_sizes,
    end=_sizes,
)


@st.composite
def hostile_manifests(draw: st.DrawFn) -> Manifest:
    """A manifest whose every field a hostile sender chose (within what protobuf carries)."""
    base = draw(st.sampled_from(list(MANIFESTS.values())))
    digests = st.lists(st.sampled_from([D0, D1, D2]), max_size=20).map(tuple)
    changes = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "weight": st.one_of(
                    st.floats(min_value=1e-300, max_value=1e300), st.sampled_from([1e9, 5e-324])
                ),
                "tensors": st.lists(_tensors, max_size=4).map(tuple),
                "chunk_size": st.one_of(st.sampled_from([0, 8, MiB, MiB + 1, 16 * MiB]), _sizes),
                "payload_size": _sizes,
                "chunk_digests": digests,
                "chunk_sizes": st.lists(_sizes, max_size=20).map(tuple),
                "cycle": st.sampled_from([0, 2, 3, 2**64 - 1]),
                "codec_seed": st.sampled_from([0, 9, 2**64 - 1]),
                "block_stats": st.binary(max_size=64),
                "shared_ranges_digest": st.sampled_from([b"", RANGES, D0]),
                "codec_spec": st.sampled_from([SHARED, INT8, "fp32:v1", "bf16:v1", "int8:v1"]),
            },
        )
    )
    return dataclasses.replace(base, **changes)


@fuzz(600)
@given(m=hostile_manifests(), coding=st.sampled_from(CODINGS))
def test_ingest_checks_of_hostile_manifests_accept_or_reject(
    m: Manifest, coding: CycleCoding
) -> None:
    try:
        type_name, raw = encode(m)
    except (ValueError, TypeError):
        return  # protobuf itself cannot carry this value (e.g. an int over 64 bits)
    expect_clean("ingest.manifest", lambda: _ingest(type_name, raw, coding), (DecodeError, Reject))


@fuzz(300)
@given(
    index=st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32 - 1])),
    body=st.binary(max_size=64),
    claimed=st.sampled_from([D0, D1, D2]),
    manifest=st.sampled_from([None, *MANIFESTS.values()]),
)
def test_chunk_checks_accept_or_reject(
    index: int, body: bytes, claimed: bytes, manifest: Manifest | None
) -> None:
    chunk = Chunk(3, "org-a", index, claimed, body)
    expect_clean(
        "ingest.chunk",
        lambda: check_chunk(decode(*encode(chunk)), manifest, digest_of(body)),
        (DecodeError, Reject),
    )


def test_a_codec_spec_with_a_huge_integer_is_rejected_with_a_reason() -> None:
    # Regression: int() of a 5000-digit parameter raised ValueError out of check_coding.
    m = dataclasses.replace(MANIFESTS["int8"], codec_spec="int8:v1;block=1" + "0" * 5000)
    with pytest.raises(Reject, match="canonical integer"):
        _ingest(*encode(m), CycleCoding(INT8, 9, 2))


def test_a_weight_that_is_not_finite_never_reaches_the_checks() -> None:
    for weight in (math.inf, -1.0, 0.0, math.nan):
        raw = encode(dataclasses.replace(SAFETENSORS_MANIFEST, weight=1.0))[1]
        bad = raw.replace(
            np.float64(1.0).tobytes(), np.float64(weight).tobytes()
        )  # field 4, a double
        with pytest.raises(DecodeError, match="weight"):
            decode("foldfed.v1.DeltaManifest", bad)

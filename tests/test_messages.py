"""The one serde: every domain message survives encode/decode, and decode refuses what the
protobuf schema alone would let through, keeping the raw bytes for the dead-letter queue."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed import domain
from foldfed.digests import DIGEST_SIZE, digest_of
from foldfed.errors import DecodeError
from foldfed.format import TensorSpan
from foldfed.messages import (
    CODEC_SAFETENSORS,
    Chunk,
    DeliveryReceipt,
    Event,
    HaveReply,
    HaveRequest,
    Heartbeat,
    Manifest,
    StepReleased,
    decode,
    encode,
    id_of,
    manifest_id,
    manifest_to_proto,
)
from foldfed.v1 import delta_pb2, events_pb2, step_pb2

MiB = 1 << 20
D0, D1, D2 = digest_of(b"chunk 0"), digest_of(b"chunk 1"), digest_of(b"chunk 2")


def _manifest(**changes: object) -> Manifest:
    m = Manifest(
        step=7,
        participant="org-a",
        weight=1234.5,
        codec=CODEC_SAFETENSORS,
        tensors=(
            TensorSpan("layer.0.weight", "F32", (512, 1024), 64, 64 + 2 * MiB),
            TensorSpan("layer.0.bias", "BF16", (1024,), 64 + 2 * MiB, 64 + 2 * MiB + 2048),
            TensorSpan("scale", "F32", (), 64 + 2 * MiB + 2048, 64 + 2 * MiB + 2052),
        ),
        chunk_size=MiB,
        payload_size=64 + 2 * MiB + 2052,
        chunk_digests=(D0, D1, D2),
        payload_digest=digest_of(b"payload"),
        base_model_digest=digest_of(b"model"),
    )
    return dataclasses.replace(m, **changes)


ALL_MESSAGES = {
    "manifest": (_manifest(), "foldfed.v1.DeltaManifest"),
    "manifest-no-base": (_manifest(base_model_digest=b""), "foldfed.v1.DeltaManifest"),
    "chunk": (Chunk(3, "org-b", 2, D2, b"\x00\x01body\xff" * 100), "foldfed.v1.Chunk"),
    "have-request": (HaveRequest(3, "org-b", D0, "req-1"), "foldfed.v1.HaveRequest"),
    "have-reply": (HaveReply(3, "org-b", D0, "req-1", (0, 4, 9)), "foldfed.v1.HaveReply"),
    "have-reply-error": (
        HaveReply(3, "org-b", D0, "req-2", (), "unknown manifest"),
        "foldfed.v1.HaveReply",
    ),
    "receipt": (
        DeliveryReceipt(3, "org-b", D0, D1, 12, 12 * MiB - 5, 2, 1_700_000_000_999),
        "foldfed.v1.DeliveryReceipt",
    ),
    "step-released": (
        StepReleased(4, D2, ("org-a", "org-b"), 1_700_000_001_000),
        "foldfed.v1.StepReleased",
    ),
    "step-released-first": (StepReleased(1, b"", ("org-a",)), "foldfed.v1.StepReleased"),
    "step-released-weights": (
        StepReleased(2, D2, ("org-a", "org-b"), weights=(1.0, 2.5)),
        "foldfed.v1.StepReleased",
    ),
    "step-released-bound": (
        StepReleased(2, D2, ("org-a",), weights=(4096.0,), update_norm_bound=0.5),
        "foldfed.v1.StepReleased",
    ),
    "event": (
        Event("delivered", "ingest", "org-a", 3, "ok", {"bytes": 1e9, "seconds": 0.25}, 17),
        "foldfed.v1.Event",
    ),
    "event-rejected": (
        Event("rejected", "ingest", "org-a", 0, "malformed Chunk", subject="9f1c2e"),
        "foldfed.v1.Event",
    ),
    "heartbeat": (Heartbeat("uploader", "org-a", 3, "uploading", 42), "foldfed.v1.Heartbeat"),
}


@pytest.mark.parametrize("name", ALL_MESSAGES)
def test_every_message_survives_a_round_trip(name: str) -> None:
    msg, type_name = ALL_MESSAGES[name]
    encoded_type, data = encode(msg)
    assert encoded_type == type_name
    decoded = decode(encoded_type, data)
    assert type(decoded) is type(msg)
    assert decoded == msg


def test_every_event_kind_survives_a_round_trip() -> None:
    for kind in ("rejected", "upload_started", "upload_finished", "delivered", "step_released"):
        event = Event(kind, "ingest", "org-a", 1)
        assert decode(*encode(event)) == event


def test_messages_re_exports_the_pure_domain_classes() -> None:
    for cls in (Manifest, Chunk, HaveRequest, HaveReply, DeliveryReceipt, StepReleased, Event):
        assert getattr(domain, cls.__name__) is cls
    assert domain.Heartbeat is Heartbeat
    assert domain.CODEC_SAFETENSORS == CODEC_SAFETENSORS
    assert not hasattr(Manifest, "id"), "a manifest's id is messages.id_of(m)"


def test_round_trip_covers_every_message_class() -> None:
    classes = {type(msg) for msg, _ in ALL_MESSAGES.values()}
    assert classes == {
        Manifest,
        Chunk,
        HaveRequest,
        HaveReply,
        DeliveryReceipt,
        StepReleased,
        Event,
        Heartbeat,
    }


_digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)
_spans = st.builds(
    TensorSpan,
    name=st.text(min_size=1, max_size=20),
    dtype=st.sampled_from(["F32", "BF16", "F16", "I64"]),
    shape=st.lists(st.integers(0, 2**20), max_size=4).map(tuple),
    begin=st.integers(0, 2**40),
    end=st.integers(0, 2**40),
)
_manifests = st.builds(
    Manifest,
    step=st.integers(0, 2**63),
    participant=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    weight=st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    codec=st.just(CODEC_SAFETENSORS),
    tensors=st.lists(_spans, max_size=5).map(tuple),
    chunk_size=st.integers(1, 2**32 - 1),
    payload_size=st.integers(0, 2**63),
    chunk_digests=st.lists(_digests, max_size=5).map(tuple),
    payload_digest=_digests,
    base_model_digest=st.one_of(st.just(b""), _digests),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_manifests)
def test_any_manifest_survives_a_round_trip(m: Manifest) -> None:
    type_name, data = encode(m)
    assert decode(type_name, data) == m
    assert encode(m)[1] == data


# ------------------------------------------------------------------------ rejections


def _assert_decode_error(type_name: str | None, data: bytes, needle: str) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(type_name, data)
    assert needle in str(info.value)
    assert info.value.raw == data
    return info.value


@pytest.mark.parametrize("type_name", [None, "", "foldfed.v1.Nope", "foldfed.v1.TensorLayout"])
def test_decode_rejects_an_unknown_type_name(type_name: str | None) -> None:
    data = encode(_manifest())[1]
    _assert_decode_error(type_name, data, "unknown message type")


@pytest.mark.parametrize("name", ALL_MESSAGES)
@pytest.mark.parametrize("garbage", [b"garbage!", b"\xff" * 11, b"\x0a\xff"])
def test_decode_rejects_garbage_bytes(name: str, garbage: bytes) -> None:
    _, type_name = ALL_MESSAGES[name]
    _assert_decode_error(type_name, garbage, "malformed")


def test_decode_rejects_a_message_truncated_mid_field() -> None:
    type_name, data = encode(ALL_MESSAGES["chunk"][0])
    _assert_decode_error(type_name, data[:-3], "malformed")


BAD_DIGESTS = {
    "chunk.digest": Chunk(1, "org-a", 0, b"\x01" * 31, b"x"),
    "manifest.chunk_digests": _manifest(chunk_digests=(D0, D1[:16], D2)),
    "manifest.payload_digest": _manifest(payload_digest=b"\x02" * 33),
    "manifest.base_model_digest": _manifest(base_model_digest=b"\x03" * 31),
    "have_request.manifest_id": HaveRequest(1, "org-a", b"\x04" * 31, "r"),
    "have_request.empty_manifest_id": HaveRequest(1, "org-a", b"", "r"),
    "have_reply.manifest_id": HaveReply(1, "org-a", b"\x05" * 64, "r", (1,)),
    "receipt.manifest_id": DeliveryReceipt(1, "org-a", b"\x06", D0, 1, 1, 0, 0),
    "receipt.payload_digest": DeliveryReceipt(1, "org-a", D0, b"", 1, 1, 0, 0),
    "step_released.model_digest": StepReleased(1, b"\x07" * 20, ("org-a",)),
}


@pytest.mark.parametrize("name", BAD_DIGESTS)
def test_decode_rejects_a_digest_of_the_wrong_length(name: str) -> None:
    type_name, data = encode(BAD_DIGESTS[name])
    _assert_decode_error(type_name, data, f"must be {DIGEST_SIZE} bytes")


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-300])
def test_decode_rejects_a_weight_that_is_not_finite_and_positive(weight: float) -> None:
    type_name, data = encode(_manifest(weight=weight))
    _assert_decode_error(type_name, data, "weight")


@pytest.mark.parametrize("version", [0, 2, 2**32 - 1])
def test_decode_rejects_an_unsupported_format_version(version: int) -> None:
    proto = manifest_to_proto(_manifest())
    proto.format_version = version
    _assert_decode_error("foldfed.v1.DeltaManifest", proto.SerializeToString(), "format_version")


@pytest.mark.parametrize("codec", [delta_pb2.CODEC_UNSPECIFIED, 99])
def test_decode_rejects_an_unspecified_or_unknown_codec(codec: int) -> None:
    proto = manifest_to_proto(_manifest())
    proto.codec = codec
    _assert_decode_error("foldfed.v1.DeltaManifest", proto.SerializeToString(), "codec")


def test_decode_rejects_an_unspecified_event_kind() -> None:
    data = events_pb2.Event(kind=events_pb2.EVENT_KIND_UNSPECIFIED, service="x").SerializeToString()
    _assert_decode_error("foldfed.v1.Event", data, "event kind")


def test_an_empty_manifest_is_rejected_not_defaulted() -> None:
    # Zero bytes parse as a DeltaManifest full of defaults: format_version 0 must stop it.
    _assert_decode_error("foldfed.v1.DeltaManifest", b"", "format_version")


# ------------------------------------------------------------------------ manifest id


def test_manifest_id_is_blake3_of_the_deterministic_serialization() -> None:
    m = _manifest()
    first, second = encode(m)[1], encode(_manifest())[1]
    assert first == second
    assert id_of(m) == id_of(_manifest()) == manifest_id(first) == digest_of(first)
    assert len(id_of(m)) == DIGEST_SIZE


def test_manifest_id_survives_a_round_trip() -> None:
    m = _manifest()
    decoded = decode(*encode(m))
    assert isinstance(decoded, Manifest)
    assert id_of(decoded) == id_of(m)


def test_event_metrics_serialize_the_same_whatever_their_insertion_order() -> None:
    keys = [f"metric-{i}" for i in range(20)]
    forward = Event("delivered", "ingest", "org-a", 1, metrics={k: 1.0 for k in keys})
    backward = Event("delivered", "ingest", "org-a", 1, metrics={k: 1.0 for k in reversed(keys)})
    assert encode(forward)[1] == encode(backward)[1]


_T0 = _manifest().tensors[0]
FIELD_CHANGES: dict[str, dict[str, object]] = {
    "step": {"step": 8},
    "participant": {"participant": "org-b"},
    "weight": {"weight": 1234.25},
    "codec": {},  # only one codec exists; covered by the "tensors" variants instead
    "tensors": {"tensors": _manifest().tensors[:2]},
    "tensors.name": {"tensors": (dataclasses.replace(_T0, name="x"), *_manifest().tensors[1:])},
    "tensors.dtype": {"tensors": (dataclasses.replace(_T0, dtype="I32"), *_manifest().tensors[1:])},
    "tensors.shape": {
        "tensors": (dataclasses.replace(_T0, shape=(1024, 512)), *_manifest().tensors[1:])
    },
    "tensors.begin": {"tensors": (dataclasses.replace(_T0, begin=72), *_manifest().tensors[1:])},
    "tensors.end": {"tensors": (dataclasses.replace(_T0, end=65), *_manifest().tensors[1:])},
    "chunk_size": {"chunk_size": 2 * MiB},
    "payload_size": {"payload_size": _manifest().payload_size + 1},
    "chunk_digests": {"chunk_digests": (D0, D2, D1)},
    "chunk_digests.one": {"chunk_digests": (D0, D1, digest_of(b"other"))},
    "payload_digest": {"payload_digest": digest_of(b"other payload")},
    "base_model_digest": {"base_model_digest": digest_of(b"other model")},
    "base_model_digest.empty": {"base_model_digest": b""},
    # The coded-vector fields (they change the id whatever the codec field says).
    "codec_spec": {"codec_spec": "bf16:v1"},
    "cycle": {"cycle": 2},
    "codec_seed": {"codec_seed": 5},
    "chunk_sizes": {"chunk_sizes": (10, 20)},
    "shared_ranges_digest": {"shared_ranges_digest": digest_of(b"ranges")},
    "block_stats": {"block_stats": b"\x00" * 8},
    "next_ranges_digest": {"next_ranges_digest": digest_of(b"next ranges")},
    # The id names the signed manifest: a signature is part of the bytes it hashes.
    "signature": {"signature": b"\x01" * 64},
    # The masked-ring fields (secure aggregation; docs/format.md 9.10).
    "ring_bits": {"ring_bits": 32},
    "attested_norm": {"attested_norm": 1.5},
}


def test_manifest_id_changes_when_any_field_changes() -> None:
    top_level = {f.name for f in dataclasses.fields(Manifest)}
    assert top_level <= set(FIELD_CHANGES), "a new Manifest field needs a case here"
    base = _manifest()
    ids = {"base": id_of(base)}
    for name, change in FIELD_CHANGES.items():
        if change:
            ids[name] = id_of(_manifest(**change))
    assert len(set(ids.values())) == len(ids), "two different manifests share an id"


# ------------------------------------------------------------------------ golden bytes

GOLDEN = Manifest(
    step=7,
    participant="org-a",
    weight=1234.5,
    codec=CODEC_SAFETENSORS,
    tensors=(
        TensorSpan("layer.0.weight", "F32", (4, 8), 16, 144),
        TensorSpan("layer.0.bias", "BF16", (8,), 144, 160),
    ),
    chunk_size=MiB,
    payload_size=160,
    chunk_digests=(digest_of(b"golden chunk 0"),),
    payload_digest=digest_of(b"golden payload"),
    base_model_digest=digest_of(b"golden model"),
)
# If either constant changes, every manifest id ever issued changes: that is a new
# format_version, not a fix to this test. (They were recomputed once, before any release,
# when field 12 `created_unix_ms` was retired: the bytes are the old ones minus that field.)
GOLDEN_MANIFEST_HEX = (
    "080110071a056f72672d612100000000004a93402801321e0a0e6c617965722e302e776569676874"
    "12034633321a0204082010289001321d0a0c6c617965722e302e626961731204424631361a010820"
    "900128a0013880804040a0014a202c18634d6960930880064bbee2138fa9648eba3a30048d9e816e"
    "6b67c2ca4e485220b3e919b0e81c94e7676b3c7f4b0f3f2676f38345076d189f0ff9653c4643bb9a"
    "5a20e6e35d1d02e4a1c09f05c1de819b7c7721518609e9309e5b999d8976e54e866e"
)
GOLDEN_MANIFEST_ID = "44a3d1b2b175c0b1c00232dfd11071ffb64c674915af0cea9192e7ce5421e8f8"


def test_golden_manifest_bytes_and_id_are_stable() -> None:
    type_name, data = encode(GOLDEN)
    assert type_name == "foldfed.v1.DeltaManifest"
    assert data.hex() == GOLDEN_MANIFEST_HEX
    assert digest_of(data).hex() == GOLDEN_MANIFEST_ID
    assert id_of(GOLDEN).hex() == GOLDEN_MANIFEST_ID


def test_golden_manifest_bytes_decode_to_the_golden_manifest() -> None:
    assert decode("foldfed.v1.DeltaManifest", bytes.fromhex(GOLDEN_MANIFEST_HEX)) == GOLDEN


def test_the_retired_created_unix_ms_field_is_neither_written_nor_kept() -> None:
    # Field 12 (varint) as an older encoder wrote it: it parses as an unknown field and
    # is dropped, so the canonical re-encoding is the golden bytes again.
    old = bytes.fromhex(GOLDEN_MANIFEST_HEX) + bytes.fromhex("6080d095ffbc31")
    decoded = decode("foldfed.v1.DeltaManifest", old)
    assert decoded == GOLDEN
    assert encode(decoded)[1].hex() == GOLDEN_MANIFEST_HEX
    assert not hasattr(GOLDEN, "created_unix_ms")
    assert "created_unix_ms" not in delta_pb2.DeltaManifest.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize(
    ("weights", "reason"),
    [((1.0,), "lists 1 weights for 2 participants"), ((1.0, math.nan), "agreed weight nan")],
)
def test_decode_rejects_agreed_weights_that_do_not_fit(
    weights: tuple[float, ...], reason: str
) -> None:
    proto = step_pb2.StepReleased(step=1, participants=["org-a", "org-b"], weights=weights)
    _assert_decode_error("foldfed.v1.StepReleased", proto.SerializeToString(), reason)


@pytest.mark.parametrize("bound", [-1.0, math.nan, math.inf])
def test_decode_rejects_an_update_bound_that_is_not_a_norm(bound: float) -> None:
    proto = step_pb2.StepReleased(step=1, participants=["org-a"], update_norm_bound=bound)
    _assert_decode_error("foldfed.v1.StepReleased", proto.SerializeToString(), "update norm bound")

"""Secure aggregation without a broker: members' masked payloads (uploader/masking.py)
summed by the hub's sink give exactly the plaintext fixed-point sum, chunk order and
chunking aside; the hub's checks refuse what would not cancel; a member refuses what it
must not send."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed.aggregation import quantize_chunk
from foldfed.aggregator.sink import AggregationSink
from foldfed.chunkstore import ChunkStore
from foldfed.deltafile import write_delta
from foldfed.domain import Manifest, StepReleased
from foldfed.errors import ConfigError, DecodeError, Reject
from foldfed.format import chunk_range
from foldfed.ingest.checks import check_manifest, check_masking
from foldfed.keyfiles import write_keyring, write_private_key
from foldfed.messages import decode, encode
from foldfed.payloadfile import plan_chunks, read_chunk
from foldfed.secagg.masks import MaskRangeError
from foldfed.signing import Keyring, SigningKey
from foldfed.spool import DeltaRecord
from foldfed.uploader.coding import UplinkCoder
from foldfed.uploader.masking import MaskedUplink

MEMBERS = ("org-a", "org-b", "org-c")
CHUNK = 1 << 20
CYCLE = 5
STEP = 1
SHAPES = {"big.weight": (300, 1000), "small.bias": (7,)}  # 1.2 MB: two masked chunks


def _model(path: Path, seed: int, scale: float) -> Path:
    g = torch.Generator().manual_seed(seed)
    write_delta(path, {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()})
    return path


@pytest.fixture
def world(tmp_path: Path):
    keys = {m: SigningKey.generate(m) for m in MEMBERS}
    for name, key in keys.items():
        write_private_key(tmp_path / f"{name}.key", key)
    write_keyring(tmp_path / "ring", Keyring(tuple(k.verify_key() for k in keys.values()), 1))
    base = _model(tmp_path / "base.safetensors", 0, 1.0)
    deltas = {
        m: DeltaRecord(STEP, _model(tmp_path / f"{m}.delta", i + 1, 1e-2), 0, 100.0 + i, b"", {})
        for i, m in enumerate(MEMBERS)
    }
    return tmp_path, base, deltas


def _uplink(tmp: Path, member: str, *, bits: int = 32, codec: str = "fp32:v1") -> MaskedUplink:
    spool = tmp / "spool" / member
    coder = UplinkCoder(spool, member, CHUNK, ChunkStore(spool / "downloads"))
    release = StepReleased(STEP, b"", MEMBERS, cycle=CYCLE, codec=codec)
    coder.remember(release, None)
    return MaskedUplink(coder, tmp / f"{member}.key", tmp / "ring", bits)


def _masked(tmp: Path, deltas: dict[str, DeltaRecord], bits: int = 32) -> dict[str, tuple]:
    out = {}
    for member in MEMBERS:
        prepared = _uplink(tmp, member, bits=bits).prepare(deltas[member])
        out[member] = (prepared.manifest, prepared.payload.read_bytes(), prepared.serialized)
    return out


def _plain_sum(tmp: Path, base: Path, deltas: dict[str, DeltaRecord]) -> np.ndarray:
    sink = AggregationSink(tmp / "plain")
    (tmp / "plain").mkdir()
    sink.open_step(STEP, base)
    layout, accumulator = sink._ready()
    for record in deltas.values():
        plan = plan_chunks(record.path, CHUNK)
        for index in range(len(plan.chunk_digests)):
            body = read_chunk(record.path, CHUNK, index)
            size, weight = plan.payload_size, record.weight
            pieces = quantize_chunk(layout, plan.tensors, index, CHUNK, size, body, weight)
            accumulator.add_all(pieces)
    total = accumulator.read(0, layout.elements)
    sink.close()
    return total


@pytest.mark.parametrize("bits", [32, 64])
def test_the_masked_sum_is_the_plaintext_sum_bit_for_bit(world, bits: int) -> None:
    tmp, base, deltas = world
    masked = _masked(tmp, deltas, bits)
    (tmp / "hub").mkdir()
    sink = AggregationSink(tmp / "hub", ring_bits=bits)
    sink.open_step(STEP, base)
    chunks = []
    for m, payload, serialized in masked.values():
        assert m.masked and m.ring_bits == bits and len(m.chunk_digests) >= 2
        assert decode("foldfed.v1.DeltaManifest", serialized) == m
        check_manifest(m, 1 << 30)
        check_masking(m, secure=True, ring_bits=bits, cycle=CYCLE)
        sink.check_manifest(m)
        for index in range(len(m.chunk_digests)):
            chunks.append((m, index, payload[slice(*chunk_range(len(payload), CHUNK, index))]))
    for m, index, body in reversed(chunks):  # any order: integer sums
        sink.apply(m, index, sink.validate(m, index, body))
    layout, accumulator = sink._ready()
    assert np.array_equal(accumulator.read(0, layout.elements), _plain_sum(tmp, base, deltas))
    sink.close()


def test_a_member_masks_deterministically_and_its_payload_hides_its_delta(world) -> None:
    tmp, _, deltas = world
    first = _uplink(tmp, "org-b").prepare(deltas["org-b"])
    payload = first.payload.read_bytes()
    stamp = first.payload.stat().st_mtime_ns
    reused = _uplink(tmp, "org-b").prepare(deltas["org-b"])  # a restart after the commit
    assert reused.serialized == first.serialized and reused.payload.stat().st_mtime_ns == stamp
    # A crash before the commit (the manifest file): made again, to the same bytes and id.
    (first.payload.parent / f"delta-{STEP:012d}.manifest").unlink()
    again = _uplink(tmp, "org-b").prepare(deltas["org-b"])
    assert again.serialized == first.serialized and again.payload.read_bytes() == payload
    raw = deltas["org-b"].path.read_bytes()
    assert raw[-4096:-4064] not in payload
    assert first.manifest.attested_norm > 0


def test_a_member_refuses_a_codec_a_stranger_release_and_a_ring_too_small(world) -> None:
    tmp, _, deltas = world
    with pytest.raises(ConfigError, match="does not compose with secure aggregation"):
        _uplink(tmp, "org-a", codec="bf16:v1").prepare(deltas["org-a"])
    outsider = replace(deltas["org-a"])
    uplink = _uplink(tmp, "org-a")
    uplink.coder.participant = "org-z"
    with pytest.raises(ConfigError, match="does not name 'org-z'"):
        uplink.prepare(outsider)
    huge = replace(deltas["org-a"], weight=1e9)
    with pytest.raises(MaskRangeError, match="FOLDFED_SECAGG_RING_BITS=64"):
        _uplink(tmp, "org-a").prepare(huge)
    with pytest.raises(ConfigError, match="FOLDFED_MEMBER_KEYS"):
        MaskedUplink(_uplink(tmp, "org-a").coder, tmp / "org-a.key", None, 32)


def test_the_hub_refuses_what_would_not_cancel(world) -> None:
    tmp, base, deltas = world
    m, _, _ = _masked(tmp, deltas)["org-a"]
    plain = Manifest(1, "org-a", 1.0, "safetensors", m.tensors, CHUNK, 8, (b"x" * 32,), b"y" * 32)
    with pytest.raises(Reject, match="must be masked"):
        check_masking(plain, secure=True, ring_bits=32, cycle=CYCLE)
    with pytest.raises(Reject, match="does not run secure aggregation"):
        check_masking(m, secure=False, ring_bits=32, cycle=CYCLE)
    with pytest.raises(Reject, match=r"the hub's is 64"):
        check_masking(m, secure=True, ring_bits=64, cycle=CYCLE)
    with pytest.raises(Reject, match="for cycle 5"):
        check_masking(m, secure=True, ring_bits=32, cycle=6)
    with pytest.raises(Reject, match="masked payload of"):
        check_manifest(replace(m, payload_size=m.payload_size + 8), 1 << 30)
    swapped = replace(m, tensors=(replace(m.tensors[0], begin=1, end=m.tensors[0].end + 1),
                                  *m.tensors[1:]))  # fmt: skip
    with pytest.raises(Reject, match="element range"):
        check_manifest(swapped, 1 << 30)
    (tmp / "hub").mkdir()
    sink = AggregationSink(tmp / "hub", ring_bits=32)
    sink.open_step(STEP, base)
    sink.bound = m.attested_norm / 2
    with pytest.raises(Reject, match="attested norm"):
        sink.check_manifest(m)
    sink.bound = m.attested_norm * 2
    sink.check_manifest(m)
    sink.close()


def test_masked_manifest_fields_round_trip_and_are_refused_elsewhere(world) -> None:
    tmp, _, deltas = world
    m, _, _ = _masked(tmp, deltas)["org-c"]
    assert decode("foldfed.v1.DeltaManifest", encode(m)[1]) == m
    bad = replace(m, codec="safetensors")
    with pytest.raises(DecodeError, match="need a masked payload"):
        decode("foldfed.v1.DeltaManifest", encode(bad)[1])
    with pytest.raises(DecodeError, match="ring_bits must be 32 or 64"):
        decode("foldfed.v1.DeltaManifest", encode(replace(m, ring_bits=16))[1])

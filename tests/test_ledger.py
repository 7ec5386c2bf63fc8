"""The hub's durable record: real deltas, cut into real chunks, delivered in every order the
broker may produce, plus the messages the hub must refuse without losing the step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from foldfed.deltafile import write_delta
from foldfed.digests import digest_of
from foldfed.errors import Reject
from foldfed.format import MAX_CHUNK_SIZE, ChunkPlan
from foldfed.ingest.ledger import IngestLedger
from foldfed.ingest.rules import Effects
from foldfed.messages import (
    CODEC_SAFETENSORS,
    Chunk,
    DeliveryReceipt,
    HaveRequest,
    Manifest,
    StepReleased,
    decode,
    encode,
    id_of,
    manifest_to_proto,
)
from foldfed.payloadfile import plan_chunks, read_chunk
from foldfed.v1 import delta_pb2

MiB = 1 << 20
PARTICIPANTS = ("org-a", "org-b")
MAX_PAYLOAD = 64 * MiB
MODEL = digest_of(b"global model after step 0")
OTHER_MODEL = digest_of(b"some other model")


@dataclass(frozen=True)
class Delta:
    path: Path
    plan: ChunkPlan
    bodies: tuple[bytes, ...]

    @property
    def digests(self) -> tuple[bytes, ...]:
        return self.plan.chunk_digests


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Delta:
    write_delta(path, tensors)
    plan = plan_chunks(path, MiB)
    bodies = tuple(read_chunk(path, MiB, i) for i in range(len(plan.chunk_digests)))
    return Delta(path, plan, bodies)


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Delta, Delta]:
    """Two consecutive deltas of one participant: only the tail tensor changed, so the
    first two chunks of the second are byte-identical to the first's."""
    root = tmp_path_factory.mktemp("deltas")
    g = torch.Generator().manual_seed(1234)
    step1 = {
        "layer0.weight": torch.randn(600_000, generator=g),  # 2.4 MB: chunks 0, 1, 2
        "layer1.bias": torch.randn(1000, generator=g),
        "layer1.weight": torch.randn(300_000, generator=g),  # chunks 2, 3
    }
    step2 = dict(step1, **{"layer1.weight": step1["layer1.weight"] + 0.01})
    return _write(root / "step1.safetensors", step1), _write(root / "step2.safetensors", step2)


@pytest.fixture
def delta(deltas: tuple[Delta, Delta]) -> Delta:
    return deltas[0]


def test_the_test_deltas_have_the_intended_shape(deltas: tuple[Delta, Delta]) -> None:
    one, two = deltas
    assert len(one.digests) == len(two.digests) == 4
    assert len(one.bodies[-1]) < MiB  # a short last chunk
    assert one.digests[:2] == two.digests[:2]
    assert set(one.digests[2:]).isdisjoint(two.digests)
    assert len(set(one.digests)) == 4


def manifest_for(
    delta: Delta,
    step: int = 1,
    participant: str = "org-a",
    *,
    weight: float = 10.0,
    base: bytes = MODEL,
) -> tuple[Manifest, bytes]:
    """As the uploader builds it (services/foldfed/uploader/upload.py `_manifest`)."""
    plan = delta.plan
    manifest = Manifest(
        step=step,
        participant=participant,
        weight=weight,
        codec=CODEC_SAFETENSORS,
        tensors=plan.tensors,
        chunk_size=plan.chunk_size,
        payload_size=plan.payload_size,
        chunk_digests=plan.chunk_digests,
        payload_digest=plan.payload_digest,
        base_model_digest=base,
    )
    return manifest, encode(manifest)[1]


def chunk_of(delta: Delta, index: int, step: int = 1, participant: str = "org-a") -> Chunk:
    return Chunk(step, participant, index, delta.digests[index], delta.bodies[index])


def send_chunks(
    ledger: IngestLedger,
    delta: Delta,
    indices: Iterable[int],
    step: int = 1,
    participant: str = "org-a",
) -> list[Effects]:
    return [ledger.on_chunk(chunk_of(delta, i, step, participant)) for i in indices]


def receipts_of(effects: Iterable[Effects]) -> list[DeliveryReceipt]:
    return [r for e in effects for r in e.receipts]


def ask(
    ledger: IngestLedger, manifest: Manifest, request_id: str = "req"
) -> tuple[tuple[int, ...], Effects]:
    effects = ledger.on_have_request(
        HaveRequest(manifest.step, manifest.participant, id_of(manifest), request_id)
    )
    (reply,) = effects.replies
    assert reply.request_id == request_id
    assert reply.manifest_id == id_of(manifest)
    assert (reply.step, reply.participant) == (manifest.step, manifest.participant)
    assert reply.error == ""
    return reply.missing, effects


def assert_receipt(
    receipt: DeliveryReceipt, manifest: Manifest, serialized: bytes, duplicates: int = 0
) -> None:
    assert receipt.step == manifest.step
    assert receipt.participant == manifest.participant
    assert receipt.manifest_id == digest_of(serialized) == id_of(manifest)
    assert receipt.payload_digest == manifest.payload_digest
    assert receipt.chunk_count == len(manifest.chunk_digests)
    assert receipt.payload_size == manifest.payload_size
    assert receipt.duplicate_chunks == duplicates
    assert receipt.completed_unix_ms > 0


def assert_stored(ledger: IngestLedger, delta: Delta) -> None:
    bodies = [ledger.store.get(d) for d in delta.digests]  # get() verifies each digest
    assert bodies == list(delta.bodies)
    assert digest_of(b"".join(bodies)) == delta.plan.payload_digest


def open_ledger(state_dir: Path, first_step: int = 1, *, release: bool = True) -> IngestLedger:
    """A hub ledger; `release`: with step `first_step` released on MODEL, as the barrier
    does first (a reopened ledger has it already: the release is then a duplicate)."""
    ledger = IngestLedger(state_dir, PARTICIPANTS, first_step, MAX_PAYLOAD)
    if release:
        ledger.on_step_released(StepReleased(first_step, MODEL, PARTICIPANTS))
    return ledger


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[IngestLedger]:
    ledger = open_ledger(tmp_path / "hub")
    try:
        yield ledger
    finally:
        ledger.close()


# ------------------------------------------------------------------------ happy paths


def test_manifest_then_every_chunk_gives_exactly_one_receipt(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    first = ledger.on_manifest(m, ser)
    assert first == Effects()
    effects = send_chunks(ledger, delta, range(4))
    assert [bool(e.receipts) for e in effects] == [False, False, False, True]
    assert not any(e.duplicate for e in effects)
    (receipt,) = receipts_of(effects)
    assert_receipt(receipt, m, ser, duplicates=0)
    assert ledger.delivered(1) == {"org-a"}
    assert ledger.manifest(1, "org-a") == m
    assert_stored(ledger, delta)


def test_a_have_request_before_any_chunk_lists_every_index(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    missing, effects = ask(ledger, m)
    assert missing == (0, 1, 2, 3)
    assert effects.receipts == []
    assert ledger.delivered(1) == set()


def test_a_have_request_after_half_lists_the_other_half(ledger: IngestLedger, delta: Delta) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    send_chunks(ledger, delta, [3, 0])
    missing, effects = ask(ledger, m)
    assert missing == (1, 2)
    assert effects.receipts == []


def test_a_have_request_for_an_unknown_manifest_says_so(ledger: IngestLedger, delta: Delta) -> None:
    m, _ = manifest_for(delta)
    effects = ledger.on_have_request(HaveRequest(1, "org-a", id_of(m), "r1"))
    (reply,) = effects.replies
    assert reply.error == "unknown manifest"
    assert reply.missing == ()
    assert effects.receipts == []


def test_a_completed_manifest_has_nothing_missing_and_its_receipt_is_sent_again(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    (original,) = receipts_of(send_chunks(ledger, delta, range(4)))
    missing, effects = ask(ledger, m)
    assert missing == ()
    assert effects.receipts == [original]


def test_a_duplicate_chunk_is_flagged_and_counted_in_the_receipt(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    first, again = send_chunks(ledger, delta, [1, 1])
    assert not first.duplicate
    assert again.duplicate
    assert again.receipts == []
    (receipt,) = receipts_of(send_chunks(ledger, delta, [0, 2, 3]))
    assert_receipt(receipt, m, ser, duplicates=1)


def test_chunks_redelivered_after_completion_make_no_second_receipt(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    (original,) = receipts_of(send_chunks(ledger, delta, range(4)))
    late = send_chunks(ledger, delta, [3, 0])
    assert all(e.duplicate for e in late)
    assert receipts_of(late) == []
    assert ledger.on_manifest(m, ser) == Effects(duplicate=True)
    _, effects = ask(ledger, m)
    (reissued,) = effects.receipts
    assert reissued.duplicate_chunks == 2
    assert reissued.completed_unix_ms == original.completed_unix_ms


def test_chunks_before_their_manifest_are_kept_and_counted_when_it_arrives(
    ledger: IngestLedger, delta: Delta
) -> None:
    early = send_chunks(ledger, delta, [2, 0])
    assert early == [Effects(), Effects()]
    assert all(ledger.store.has(delta.digests[i]) for i in (0, 2))
    m, ser = manifest_for(delta)
    assert ledger.on_manifest(m, ser) == Effects()
    missing, _ = ask(ledger, m)
    assert missing == (1, 3)
    (receipt,) = receipts_of(send_chunks(ledger, delta, missing))
    assert_receipt(receipt, m, ser, duplicates=0)
    assert_stored(ledger, delta)


def test_a_manifest_arriving_after_all_its_chunks_completes_at_once(
    ledger: IngestLedger, delta: Delta
) -> None:
    assert receipts_of(send_chunks(ledger, delta, [3, 2, 1, 0])) == []
    m, ser = manifest_for(delta)
    (receipt,) = ledger.on_manifest(m, ser).receipts
    assert_receipt(receipt, m, ser, duplicates=0)


def test_unchanged_chunks_held_from_an_earlier_step_need_not_be_sent_again(
    ledger: IngestLedger, deltas: tuple[Delta, Delta]
) -> None:
    one, two = deltas
    m1, ser1 = manifest_for(one, step=1)
    ledger.on_manifest(m1, ser1)
    assert len(receipts_of(send_chunks(ledger, one, range(4)))) == 1
    ledger.on_step_released(StepReleased(2, MODEL, PARTICIPANTS))
    m2, ser2 = manifest_for(two, step=2, base=MODEL)
    assert ledger.on_manifest(m2, ser2) == Effects()
    missing, _ = ask(ledger, m2)
    unchanged = {i for i, d in enumerate(two.digests) if d in one.digests}
    assert unchanged == {0, 1}
    assert missing == (2, 3)
    (receipt,) = receipts_of(send_chunks(ledger, two, missing, step=2))
    assert_receipt(receipt, m2, ser2, duplicates=0)
    assert_stored(ledger, two)


def test_a_digest_another_participant_delivered_is_still_missing(
    ledger: IngestLedger, delta: Delta
) -> None:
    ma, sera = manifest_for(delta, participant="org-a")
    ledger.on_manifest(ma, sera)
    send_chunks(ledger, delta, range(4), participant="org-a")
    # org-b announces the very same chunk digests: the hub must not let it learn that
    # they are held, so it asks for every one of them.
    mb, serb = manifest_for(delta, participant="org-b")
    assert ledger.on_manifest(mb, serb) == Effects()
    missing, effects = ask(ledger, mb)
    assert missing == (0, 1, 2, 3)
    assert effects.receipts == []
    # Nor may org-b ask about org-a's manifest by its id.
    reply = ledger.on_have_request(HaveRequest(1, "org-b", id_of(ma), "probe")).replies[0]
    assert reply.error == "unknown manifest"
    assert reply.missing == ()
    (receipt,) = receipts_of(send_chunks(ledger, delta, range(4), participant="org-b"))
    assert_receipt(receipt, mb, serb, duplicates=0)
    assert ledger.delivered(1) == {"org-a", "org-b"}


def test_a_chunk_another_participant_sent_before_a_manifest_does_not_count(
    ledger: IngestLedger, delta: Delta
) -> None:
    send_chunks(ledger, delta, [0, 1], participant="org-a")  # no manifest from org-a
    mb, serb = manifest_for(delta, participant="org-b")
    ledger.on_manifest(mb, serb)
    missing, _ = ask(ledger, mb)
    assert missing == (0, 1, 2, 3)


# ------------------------------------------------------------------------ rejections

Case = Callable[[IngestLedger, Delta], object]


def _tampered(body: bytes) -> bytes:
    return bytes([body[0] ^ 1]) + body[1:]


# Field 101, varint 1: a field this schema does not know, as a newer encoder might add.
UNKNOWN_FIELD = b"\xa8\x06\x01"


def _with_unknown_field(manifest_and_bytes: tuple[Manifest, bytes]) -> tuple[Manifest, bytes]:
    m, ser = manifest_and_bytes
    return m, ser + UNKNOWN_FIELD


def _oversized() -> Chunk:
    body = bytes(MAX_CHUNK_SIZE + 1)
    return Chunk(1, "org-a", 2, digest_of(body), body)


REJECTIONS: dict[str, tuple[Case, str]] = {
    "unknown participant chunk": (
        lambda lg, d: lg.on_chunk(chunk_of(d, 2, participant="org-z")),
        "unknown participant 'org-z'",
    ),
    "unknown participant manifest": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, participant="org-z", base=MODEL)),
        "unknown participant 'org-z'",
    ),
    "unknown participant have-request": (
        lambda lg, d: lg.on_have_request(HaveRequest(1, "org-z", d.digests[0], "r")),
        "unknown participant 'org-z'",
    ),
    "closed step chunk": (lambda lg, d: lg.on_chunk(chunk_of(d, 2, step=0)), "step 0 is closed"),
    "closed step manifest": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, step=0, base=MODEL)),
        "step 0 is closed",
    ),
    "future step chunk": (lambda lg, d: lg.on_chunk(chunk_of(d, 2, step=2)), "unknown step 2"),
    "future step manifest": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, step=2, base=MODEL)),
        "unknown step 2",
    ),
    "body does not hash to its digest": (
        lambda lg, d: lg.on_chunk(Chunk(1, "org-a", 2, d.digests[2], _tampered(d.bodies[2]))),
        "digest mismatch",
    ),
    "digest not the manifest's": (
        lambda lg, d: lg.on_chunk(Chunk(1, "org-a", 2, d.digests[0], d.bodies[0])),
        "is not the manifest's",
    ),
    "size not the manifest's": (
        lambda lg, d: lg.on_chunk(Chunk(1, "org-a", 2, d.digests[3], d.bodies[3])),
        f"the manifest says {MiB}",
    ),
    "index out of range": (
        lambda lg, d: lg.on_chunk(Chunk(1, "org-a", 4, d.digests[0], d.bodies[0])),
        "chunk index 4 out of range",
    ),
    "oversized body": (lambda lg, d: lg.on_chunk(_oversized()), "oversized chunk"),
    "conflicting manifest": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, weight=11.0, base=MODEL)),
        "conflicting manifest for step 1",
    ),
    "manifest against another model": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, participant="org-b", base=OTHER_MODEL)),
        "delta was computed against model",
    ),
    "manifest against no model": (
        lambda lg, d: lg.on_manifest(*manifest_for(d, participant="org-b", base=b"")),
        "delta was computed against model (none)",
    ),
    "manifest not in canonical form": (
        lambda lg, d: lg.on_manifest(
            *_with_unknown_field(manifest_for(d, participant="org-b", base=MODEL))
        ),
        "not in canonical form",
    ),
}


@pytest.mark.parametrize("name", REJECTIONS)
def test_a_rejected_message_leaves_the_step_intact(
    ledger: IngestLedger, delta: Delta, name: str
) -> None:
    case, reason = REJECTIONS[name]
    ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS))
    m, ser = manifest_for(delta, base=MODEL)
    ledger.on_manifest(m, ser)
    send_chunks(ledger, delta, [0, 1])

    with pytest.raises(Reject) as info:
        case(ledger, delta)
    assert reason in info.value.reason

    missing, _ = ask(ledger, m)
    assert missing == (2, 3)
    (receipt,) = receipts_of(send_chunks(ledger, delta, missing))
    assert_receipt(receipt, m, ser, duplicates=0)
    assert_stored(ledger, delta)
    assert set(ledger.store.digests()) == set(delta.digests)  # nothing rejected was kept
    assert ledger.manifest(1, "org-a") == m
    assert (ledger.open_step, ledger.model_digest) == (1, MODEL)


def test_a_chunk_with_a_wrong_digest_is_refused_even_before_its_manifest(
    ledger: IngestLedger, delta: Delta
) -> None:
    with pytest.raises(Reject, match="digest mismatch"):
        ledger.on_chunk(Chunk(1, "org-a", 0, delta.digests[0], _tampered(delta.bodies[0])))
    assert list(ledger.store.digests()) == []
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    missing, _ = ask(ledger, m)
    assert missing == (0, 1, 2, 3)


def test_a_manifest_that_fails_its_checks_is_not_recorded(
    ledger: IngestLedger, delta: Delta
) -> None:
    good, good_ser = manifest_for(delta)
    bad = dataclasses.replace(good, chunk_digests=good.chunk_digests[:3])
    with pytest.raises(Reject, match="lists 3 chunk digests"):
        ledger.on_manifest(bad, encode(bad)[1])
    assert ledger.manifest(1, "org-a") is None
    # The good manifest is not "conflicting": the bad one left no trace.
    assert ledger.on_manifest(good, good_ser) == Effects()
    assert len(receipts_of(send_chunks(ledger, delta, range(4)))) == 1


def test_a_manifest_without_a_base_model_is_refused_once_a_model_is_released(
    ledger: IngestLedger, delta: Delta
) -> None:
    ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS))
    bare, bare_ser = manifest_for(delta, base=b"")
    with pytest.raises(Reject, match="computed against model") as info:
        ledger.on_manifest(bare, bare_ser)
    assert "(none)" in info.value.reason
    assert ledger.manifest(1, "org-a") is None
    # The refusal left no trace: the manifest on the released model is not "conflicting".
    m, ser = manifest_for(delta, base=MODEL)
    assert ledger.on_manifest(m, ser) == Effects()
    (receipt,) = receipts_of(send_chunks(ledger, delta, range(4)))
    assert_receipt(receipt, m, ser, duplicates=0)


def _reordered(m: Manifest) -> bytes:
    """`m` as another encoder may write it: payload_digest first. Protobuf parses fields in
    any order (and merges concatenated messages), so this decodes to `m` all the same."""
    head = delta_pb2.DeltaManifest(payload_digest=m.payload_digest).SerializeToString()
    rest = manifest_to_proto(dataclasses.replace(m, payload_digest=b"")).SerializeToString()
    return head + rest


@pytest.mark.parametrize("variant", ["unknown field", "field order"])
def test_a_manifest_not_in_canonical_form_is_refused(
    ledger: IngestLedger, delta: Delta, variant: str
) -> None:
    m, ser = manifest_for(delta)
    other = ser + UNKNOWN_FIELD if variant == "unknown field" else _reordered(m)
    assert other != ser
    # It parses, and to the very same manifest: only its id (the hash of the bytes) differs.
    decoded = decode("foldfed.v1.DeltaManifest", other)
    assert decoded == m
    assert encode(decoded)[1] == ser
    with pytest.raises(Reject, match="not in canonical form"):
        ledger.on_manifest(decoded, other)
    assert ledger.manifest(1, "org-a") is None
    reply = ledger.on_have_request(HaveRequest(1, "org-a", digest_of(other), "r")).replies[0]
    assert reply.error == "unknown manifest"
    # The canonical bytes are then accepted as if nothing had come before.
    assert ledger.on_manifest(m, ser) == Effects()
    (receipt,) = receipts_of(send_chunks(ledger, delta, range(4)))
    assert_receipt(receipt, m, ser, duplicates=0)


def test_an_unknown_field_in_an_accepted_manifest_is_no_duplicate(
    ledger: IngestLedger, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    assert ledger.on_manifest(m, ser) == Effects()
    with pytest.raises(Reject, match="conflicting manifest"):
        ledger.on_manifest(m, ser + UNKNOWN_FIELD)
    assert ledger.on_manifest(m, ser) == Effects(duplicate=True)


def test_nothing_counts_before_the_first_release(tmp_path: Path, delta: Delta) -> None:
    """The race of issue 14: a delta counted before its step's release was wiped from the
    sum when the release opened the step. Now nothing of it is accepted or stored; after
    the release the same delta goes through as if nothing had come before."""
    ledger = open_ledger(tmp_path / "hub", release=False)
    try:
        assert (ledger.open_step, ledger.model_digest) == (1, b"")
        m, ser = manifest_for(delta)
        with pytest.raises(Reject, match="step 1 is not released yet"):
            ledger.on_manifest(m, ser)
        with pytest.raises(Reject, match="step 1 is not released yet"):
            ledger.on_chunk(chunk_of(delta, 0))
        with pytest.raises(Reject, match="step 1 is not released yet"):
            ledger.on_have_request(HaveRequest(1, "org-a", id_of(m), "r"))
        assert ledger.manifest(1, "org-a") is None
        assert list(ledger.store.digests()) == []
        ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS))
        assert ledger.on_manifest(m, ser) == Effects()
        (receipt,) = receipts_of(send_chunks(ledger, delta, range(4)))
        assert_receipt(receipt, m, ser, duplicates=0)
    finally:
        ledger.close()


def test_a_step_opened_by_hand_is_not_opened_again(tmp_path: Path, delta: Delta) -> None:
    """A release without a model (`foldfed release`) opens the step once: a second release
    naming a model would zero the running sum under what the step already counted."""
    ledger = open_ledger(tmp_path / "hub", release=False)
    try:
        ledger.on_step_released(StepReleased(1, b"", PARTICIPANTS))
        m, ser = manifest_for(delta, base=b"")
        ledger.on_manifest(m, ser)
        with pytest.raises(Reject, match=r"already released with model \(none\)"):
            ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS))
        assert ledger.on_step_released(StepReleased(1, b"", PARTICIPANTS)).duplicate
        assert ledger.manifest(1, "org-a") == m
    finally:
        ledger.close()


# ------------------------------------------------------------------------ step release


def test_step_releases_only_move_forward(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path / "hub", release=False)
    assert (ledger.open_step, ledger.model_digest) == (1, b"")
    first = StepReleased(1, MODEL, PARTICIPANTS)
    assert ledger.on_step_released(first).released == [first]
    assert (ledger.open_step, ledger.model_digest) == (1, MODEL)

    replay = ledger.on_step_released(first)
    assert replay == Effects(duplicate=True)

    with pytest.raises(Reject, match="step 1 was already released"):
        ledger.on_step_released(StepReleased(1, OTHER_MODEL, PARTICIPANTS))
    assert (ledger.open_step, ledger.model_digest) == (1, MODEL)

    second = StepReleased(2, OTHER_MODEL, PARTICIPANTS)
    assert ledger.on_step_released(second).released == [second]
    assert (ledger.open_step, ledger.model_digest) == (2, OTHER_MODEL)

    # A late replay of step 1, with either digest, changes nothing.
    for stale in (first, StepReleased(1, digest_of(b"x"), PARTICIPANTS)):
        assert ledger.on_step_released(stale) == Effects(duplicate=True)
        assert (ledger.open_step, ledger.model_digest) == (2, OTHER_MODEL)
    assert ledger.on_step_released(second) == Effects(duplicate=True)
    ledger.close()


def test_a_release_closes_the_previous_step(ledger: IngestLedger, delta: Delta) -> None:
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    ledger.on_step_released(StepReleased(2, MODEL, PARTICIPANTS))
    with pytest.raises(Reject, match="step 1 is closed"):
        ledger.on_chunk(chunk_of(delta, 0))
    with pytest.raises(Reject, match="step 1 is closed"):
        ledger.on_have_request(HaveRequest(1, "org-a", id_of(m), "r"))


def test_the_open_step_survives_a_restart(tmp_path: Path) -> None:
    first = open_ledger(tmp_path / "hub", first_step=1)
    first.on_step_released(StepReleased(3, MODEL, PARTICIPANTS))
    first.close()
    second = open_ledger(tmp_path / "hub", first_step=1)  # the stored state wins
    try:
        assert (second.open_step, second.model_digest) == (3, MODEL)
    finally:
        second.close()


# ------------------------------------------------------------------------ crash safety


def _reference_receipt(state_dir: Path, delta: Delta) -> DeliveryReceipt:
    ledger = open_ledger(state_dir)
    try:
        ledger.on_manifest(*manifest_for(delta))
        (receipt,) = receipts_of(send_chunks(ledger, delta, range(4)))
        return receipt
    finally:
        ledger.close()


def _without_time(r: DeliveryReceipt) -> tuple[object, ...]:
    return (r.step, r.participant, r.manifest_id, r.payload_digest, r.chunk_count,
            r.payload_size, r.duplicate_chunks)  # fmt: skip


def test_a_reopened_ledger_continues_where_it_stopped(tmp_path: Path, delta: Delta) -> None:
    reference = _reference_receipt(tmp_path / "reference", delta)
    m, ser = manifest_for(delta)

    before = open_ledger(tmp_path / "hub")
    before.on_manifest(m, ser)
    send_chunks(before, delta, [0, 1])
    before.close()

    after = open_ledger(tmp_path / "hub")
    try:
        assert after.on_manifest(m, ser) == Effects(duplicate=True)  # the redelivery
        missing, _ = ask(after, m)
        assert missing == (2, 3)
        (receipt,) = receipts_of(send_chunks(after, delta, missing))
        assert _without_time(receipt) == _without_time(reference)
        assert_receipt(receipt, m, ser, duplicates=0)
        assert_stored(after, delta)
        assert after.delivered(1) == {"org-a"}
    finally:
        after.close()


def test_a_chunk_stored_but_not_recorded_before_a_crash_is_not_a_duplicate(
    tmp_path: Path, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    before = open_ledger(tmp_path / "hub")
    before.on_manifest(m, ser)
    send_chunks(before, delta, [0])
    # The crash window of on_chunk: the chunk file is written, the SQLite commit is not.
    assert before.store.put(delta.digests[1], delta.bodies[1])
    before.close()

    after = open_ledger(tmp_path / "hub")
    try:
        missing, _ = ask(after, m)
        assert missing == (1, 2, 3)
        effects = send_chunks(after, delta, missing)
        assert not any(e.duplicate for e in effects)
        (receipt,) = receipts_of(effects)
        assert_receipt(receipt, m, ser, duplicates=0)
    finally:
        after.close()


def test_a_receipt_lost_with_a_crash_is_reissued_after_restart(
    tmp_path: Path, delta: Delta
) -> None:
    m, ser = manifest_for(delta)
    before = open_ledger(tmp_path / "hub")
    before.on_manifest(m, ser)
    (original,) = receipts_of(send_chunks(before, delta, range(4)))
    before.close()

    after = open_ledger(tmp_path / "hub")
    try:
        missing, effects = ask(after, m)
        assert missing == ()
        assert effects.receipts == [original]
    finally:
        after.close()


def test_a_delivered_delta_may_ask_for_its_receipt_after_its_step_closed(
    ledger: IngestLedger, delta: Delta
) -> None:
    """An uploader killed after its last chunk but before the receipt restarts when the
    step has moved on: it re-sends the manifest and asks again, and gets its receipt."""
    m, ser = manifest_for(delta)
    ledger.on_manifest(m, ser)
    send_chunks(ledger, delta, range(len(delta.digests)))
    ledger.on_step_released(StepReleased(2, b"", PARTICIPANTS))

    assert ledger.on_manifest(m, ser).duplicate
    missing, effects = ask(ledger, m)
    assert missing == ()
    (receipt,) = effects.receipts
    assert receipt.manifest_id == id_of(m)
    # Anything else about the closed step is still refused.
    other, other_ser = manifest_for(delta, participant="org-b")
    with pytest.raises(Reject, match="is closed"):
        ledger.on_manifest(other, other_ser)


def test_a_configured_participant_outside_the_steps_cycle_is_refused(
    tmp_path: Path, delta: Delta
) -> None:
    # org-b is configured at the hub but the release of step 1 names only org-a (org-b
    # joins at the next cycle): its delta must not reach the running sum.
    ledger = open_ledger(tmp_path / "hub", release=False)
    try:
        ledger.on_step_released(StepReleased(1, MODEL, ("org-a",)))
        m, ser = manifest_for(delta, base=MODEL, participant="org-b")
        with pytest.raises(Reject, match="not a member of the cycle"):
            ledger.on_manifest(m, ser)
        assert ledger.manifest(1, "org-b") is None
        mine, mine_ser = manifest_for(delta, base=MODEL)
        assert ledger.on_manifest(mine, mine_ser) == Effects()
    finally:
        ledger.close()
    # The membership is durable: a restarted ingest still refuses org-b.
    reopened = open_ledger(tmp_path / "hub", release=False)
    try:
        assert reopened.members == frozenset({"org-a"})
    finally:
        reopened.close()


def test_a_forged_weight_is_refused_and_the_honest_delta_completes(
    tmp_path: Path, delta: Delta
) -> None:
    """Weights are agreed per cycle: the release fixes 1.0 for each member."""
    ledger = open_ledger(tmp_path / "hub", release=False)
    try:
        ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS, weights=(1.0, 1.0)))
        forged, forged_ser = manifest_for(delta, weight=1e9)
        with pytest.raises(Reject, match="differs from the weight the cycle agreed"):
            ledger.on_manifest(forged, forged_ser)
        assert ledger.manifest(1, "org-a") is None
        honest, honest_ser = manifest_for(delta, weight=1.0)
        assert ledger.on_manifest(honest, honest_ser) == Effects()
        assert len(receipts_of(send_chunks(ledger, delta, range(4)))) == 1
        assert ledger.weights(1) == {"org-a": 1.0}
    finally:
        ledger.close()
    reopened = open_ledger(tmp_path / "hub", release=False)  # the agreement is durable
    try:
        assert dict(reopened.facts.open_step().weights) == {"org-a": 1.0, "org-b": 1.0}
    finally:
        reopened.close()

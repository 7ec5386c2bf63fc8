"""Signed contributions and step records: what a signature covers, what the hub rejects,
and how a chain of records breaks (issue 14 item 5; docs/threat-model.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_ledger import (
    MAX_PAYLOAD,
    MODEL,
    PARTICIPANTS,
    Delta,
    _write,
    manifest_for,
    receipts_of,
    send_chunks,
)

from foldfed import dsse
from foldfed.audit.chain import Break, check_chain, check_contribution, open_record
from foldfed.audit.record import RecordError, StepRecord, make_record, record_from_json
from foldfed.audit.signatures import (
    MANIFEST_TYPE,
    RECORD_TYPE,
    manifest_signature_problem,
    sign_manifest,
)
from foldfed.digests import digest_of
from foldfed.errors import Reject
from foldfed.ingest.ledger import IngestLedger
from foldfed.messages import Manifest, StepReleased, decode, encode, id_of, unsigned_bytes
from foldfed.signing import SigningKey, canonical_json

KEYS = {name: SigningKey.generate(name) for name in (*PARTICIPANTS, "hub")}
PUBLIC = {name: key.verify_key() for name, key in KEYS.items()}


@pytest.fixture(scope="module")
def delta(tmp_path_factory: pytest.TempPathFactory) -> Delta:
    """A real delta of four 1 MiB chunks (as test_ledger's)."""
    g = torch.Generator().manual_seed(99)
    tensors = {"w": torch.randn(900_000, generator=g), "b": torch.randn(1000, generator=g)}
    return _write(tmp_path_factory.mktemp("delta") / "d.safetensors", tensors)


def signed(m: Manifest, key: SigningKey) -> tuple[Manifest, bytes]:
    out = dataclasses.replace(m, signature=sign_manifest(key, unsigned_bytes(m)))
    return out, encode(out)[1]


def test_a_manifest_signature_covers_every_byte_and_is_deterministic(delta: Delta) -> None:
    m, _ = manifest_for(delta)
    one, one_bytes = signed(m, KEYS["org-a"])
    _, two_bytes = signed(m, KEYS["org-a"])
    assert one_bytes == two_bytes  # a restarted uploader keeps its manifest id
    assert id_of(one) == digest_of(one_bytes) != id_of(m)
    assert manifest_signature_problem("org-a", unsigned_bytes(one), one.signature, PUBLIC) == ""
    back = decode("foldfed.v1.DeltaManifest", one_bytes)
    assert back == one
    # Any other weight, step or chunk digest: the signature no longer covers it.
    for change in ({"weight": 2.0}, {"step": 9}, {"chunk_digests": m.chunk_digests[::-1]}):
        forged = dataclasses.replace(one, **change)
        problem = manifest_signature_problem("org-a", unsigned_bytes(forged), one.signature, PUBLIC)
        assert "does not verify" in problem
    # Another member's key, or a signature of another kind of document, does not pass.
    theirs, _ = signed(m, KEYS["org-b"])
    assert "does not verify" in manifest_signature_problem(
        "org-a", unsigned_bytes(theirs), theirs.signature, PUBLIC
    )
    as_record = KEYS["org-a"].sign(dsse.pae(RECORD_TYPE, unsigned_bytes(m)))
    assert "does not verify" in manifest_signature_problem(
        "org-a", unsigned_bytes(m), as_record, PUBLIC
    )
    assert MANIFEST_TYPE != RECORD_TYPE
    assert "not signed" in manifest_signature_problem("org-a", unsigned_bytes(m), b"", PUBLIC)
    assert "no key" in manifest_signature_problem("org-c", unsigned_bytes(m), one.signature, {})


def test_a_hub_with_the_keyring_rejects_unsigned_and_forged_manifests_and_keeps_the_step(
    tmp_path: Path, delta: Delta
) -> None:
    ledger = IngestLedger(tmp_path / "hub", PARTICIPANTS, 1, MAX_PAYLOAD, member_keys=PUBLIC)
    try:
        ledger.on_step_released(StepReleased(1, MODEL, PARTICIPANTS))
        m, ser = manifest_for(delta)
        with pytest.raises(Reject, match="not signed"):
            ledger.on_manifest(m, ser)
        forged, forged_ser = signed(m, KEYS["org-b"])  # org-b signing as org-a
        with pytest.raises(Reject, match="does not verify against 'org-a'"):
            ledger.on_manifest(forged, forged_ser)
        assert ledger.manifest(1, "org-a") is None  # nothing of the step changed
        honest, honest_ser = signed(m, KEYS["org-a"])
        ledger.on_manifest(honest, honest_ser)
        assert len(receipts_of(send_chunks(ledger, delta, range(4)))) == 1
        assert ledger.manifest(1, "org-a") == honest
        assert ledger.store.get_manifest(1, "org-a") == honest_ser  # kept for `verify`
    finally:
        ledger.close()


def _record(step: int, before: bytes, after: bytes, **changes: object) -> StepRecord:
    record = make_record(
        cycle=1,
        step=step,
        weights={"org-a": 4096.0, "org-b": 4096.0},
        weight_sum=8192.0,
        manifests={"org-a": digest_of(b"a"), "org-b": digest_of(b"b")},
        model_before=before,
        model_after=after,
        update_digest=digest_of(b"u"),
        update_manifest=digest_of(b"um"),
        codec="fp32:v1",
        downlink_codec="fp32:v1",
        optimizer="fedavg",
        server_lr=1.0,
    )
    return dataclasses.replace(record, **changes)


def test_a_record_reads_back_exactly_and_refuses_what_it_does_not_know() -> None:
    record = _record(3, digest_of(b"m3"), digest_of(b"m4"))
    assert record_from_json(record.to_json()) == record
    assert record.payload() == canonical_json(record.to_json())
    for bad in (
        {**record.to_json(), "extra": 1},
        {**record.to_json(), "weights": {"org-a": 4096.0}},
        {**record.to_json(), "weight_sum": -1.0},
        {**record.to_json(), "model_after": "zz"},
        {**record.to_json(), "members": ["org-b", "org-a"]},
        {**record.to_json(), "format": "other"},
    ):
        with pytest.raises(RecordError):
            record_from_json(bad)


def test_only_the_hubs_signature_opens_a_record() -> None:
    record = _record(3, digest_of(b"m3"), digest_of(b"m4"))
    envelope = dsse.sign(RECORD_TYPE, record.payload(), [KEYS["hub"]])
    assert open_record(envelope, PUBLIC["hub"], 3) == record
    with pytest.raises(Break, match="not signed by the hub"):
        open_record(dsse.sign(RECORD_TYPE, record.payload(), [KEYS["org-a"]]), PUBLIC["hub"], 3)
    changed = dsse.Envelope(RECORD_TYPE, record.payload().replace(b"4096.0", b"4097.0"),
                            envelope.signatures)  # fmt: skip
    with pytest.raises(Break, match="not signed by the hub"):
        open_record(changed, PUBLIC["hub"], 3)
    with pytest.raises(Break, match="payload type"):
        open_record(dsse.sign("other", record.payload(), [KEYS["hub"]]), PUBLIC["hub"], 3)
    with pytest.raises(Break, match="holds step 3"):
        open_record(envelope, PUBLIC["hub"], 4)


def test_records_chain_model_to_model_and_step_to_step() -> None:
    m = [digest_of(bytes([i])) for i in range(5)]
    records = [_record(s, m[s - 1], m[s]) for s in (1, 2, 3)]
    check_chain(records)
    with pytest.raises(Break, match="no step records"):
        check_chain([])
    with pytest.raises(Break, match="step 2: its record is missing"):
        check_chain([records[0], records[2]])
    forked = [records[0], _record(2, m[4], m[2]), records[2]]
    with pytest.raises(Break, match="step 2: starts from model"):
        check_chain(forked)


def test_a_contribution_must_be_the_signed_manifest_the_record_names(delta: Delta) -> None:
    m, _ = manifest_for(delta)
    one, one_bytes = signed(dataclasses.replace(m, weight=4096.0), KEYS["org-a"])
    record = _record(1, MODEL, digest_of(b"next"), manifests=(("org-a", id_of(one).hex()),
                     ("org-b", "00" * 32)))  # fmt: skip
    args = (unsigned_bytes(one), PUBLIC)
    check_contribution(record, "org-a", digest_of(one_bytes), one, *args)
    with pytest.raises(Break, match="missing from the store"):
        check_contribution(record, "org-a", None, None, b"", PUBLIC)
    with pytest.raises(Break, match="not the one the record names"):
        check_contribution(record, "org-a", digest_of(b"changed"), one, *args)
    heavy = dataclasses.replace(record, weights=(("org-a", 1e9), ("org-b", 4096.0)))
    with pytest.raises(Break, match="claims weight"):
        check_contribution(heavy, "org-a", digest_of(one_bytes), one, *args)
    unsigned = dataclasses.replace(one, signature=b"")
    with pytest.raises(Break, match="not signed"):
        check_contribution(record, "org-a", digest_of(one_bytes), unsigned, *args)

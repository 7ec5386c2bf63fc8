"""Ed25519 keys, canonical bytes, DSSE envelopes, key files and signed data cards."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldfed import dsse
from foldfed.digests import digest_of
from foldfed.keyfiles import (
    read_keyring,
    read_private_key,
    read_public_key,
    write_keyring,
    write_private_key,
    write_public_key,
)
from foldfed.of3.data.datacard import (
    UNSIGNED,
    CardSignatureError,
    build_card,
    sign_card,
    signed_bytes,
    verify_card,
)
from foldfed.of3.data.schema import InclusionCriteria, failed, passed
from foldfed.signing import BadKey, Keyring, SigningKey, VerifyKey, canonical_json, key_id

# Fixed seeds: the tests are deterministic (Ed25519 signatures are, too).
A = SigningKey("company-a", bytes(range(32)))
B = SigningKey("company-b", bytes(range(1, 33)))


# ---------------------------------------------------------------------------------------
# Keys and signatures


def test_a_key_id_is_the_blake3_of_the_public_key() -> None:
    assert A.keyid == digest_of(A.public).hex() == key_id(A.public)
    assert len(A.public) == 32 and A.keyid != B.keyid
    with pytest.raises(BadKey, match="32 bytes"):
        key_id(b"short")
    assert A.seed.hex() not in repr(A)


def test_sign_and_verify() -> None:
    signature = A.sign(b"message")
    assert len(signature) == 64 and A.sign(b"message") == signature  # deterministic
    assert A.verify_key().verify(b"message", signature)
    assert not A.verify_key().verify(b"messagE", signature)
    assert not B.verify_key().verify(b"message", signature)
    assert not A.verify_key().verify(b"message", signature[:-1])
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not A.verify_key().verify(b"message", flipped)


def test_generated_keys_differ_and_work() -> None:
    one, two = SigningKey.generate("x"), SigningKey.generate("x")
    assert one.seed != two.seed
    assert one.verify_key().verify(b"m", one.sign(b"m"))


def test_canonical_json_ignores_order_and_spacing_and_refuses_nan() -> None:
    first = json.loads('{"b": 1, "a": [1.5, "é"], "c": {"y": null, "x": true}}')
    second = json.loads('{ "c": {"x": true, "y": null},\n "a": [1.5, "é"], "b": 1 }')
    assert canonical_json(first) == canonical_json(second)
    assert canonical_json(first) == '{"a":[1.5,"é"],"b":1,"c":{"x":true,"y":null}}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_keyring_rules() -> None:
    a, b = A.verify_key(), B.verify_key()
    assert Keyring((a, b), 2).find(b.keyid) == b
    with pytest.raises(BadKey, match="threshold"):
        Keyring((a, b), 3)
    with pytest.raises(BadKey, match="threshold"):
        Keyring((a, b), 0)
    with pytest.raises(BadKey, match="once"):
        Keyring((a, VerifyKey("company-a", B.public)), 1)
    with pytest.raises(BadKey, match="once"):
        Keyring((a, VerifyKey("other", A.public)), 1)


# ---------------------------------------------------------------------------------------
# DSSE


def test_pae_matches_the_dsse_specification() -> None:
    # The test vector of the DSSE v1 protocol description.
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert dsse.pae("", b"") == b"DSSEv1 0  0 "


def test_an_envelope_round_trips_and_verifies() -> None:
    envelope = dsse.sign("application/x-test", b'{"x": 1}', [A, B])
    document = json.loads(json.dumps(envelope.to_json()))
    assert set(document) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(document["payload"]) == b'{"x": 1}'
    back = dsse.envelope_from_json(document)
    assert back == envelope
    keys = {k.keyid: k for k in (A.verify_key(), B.verify_key())}
    assert [k.name for k in dsse.verified_keys(back, keys)] == ["company-a", "company-b"]
    assert back.payload_json() == {"x": 1}


def test_a_signature_is_bound_to_the_payload_type_and_bytes() -> None:
    envelope = dsse.sign("application/x-card", b"body", [A])
    keys = {A.keyid: A.verify_key()}
    for changed in (
        dsse.Envelope("application/x-approval", b"body", envelope.signatures),
        dsse.Envelope("application/x-card", b"bodY", envelope.signatures),
    ):
        assert dsse.verified_keys(changed, keys) == []


def test_url_safe_base64_is_accepted() -> None:
    envelope = dsse.sign("t", bytes([0xFB, 0xFF]) * 7, [A])
    document = envelope.to_json()
    document["payload"] = base64.urlsafe_b64encode(envelope.payload).decode().rstrip("=")
    assert dsse.envelope_from_json(document).payload == envelope.payload


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], "JSON object"),
        ({"payload": "eA==", "signatures": []}, "payloadType"),
        ({"payload": "not base64!", "payloadType": "t", "signatures": []}, "not base64"),
        ({"payload": "eA==", "payloadType": "t", "signatures": {}}, "not a list"),
        ({"payload": "eA==", "payloadType": "t", "signatures": [{"sig": "eA=="}]}, "keyid"),
    ],
)
def test_a_malformed_envelope_is_refused_with_a_reason(document: object, reason: str) -> None:
    with pytest.raises(dsse.MalformedEnvelope, match=reason):
        dsse.envelope_from_json(document)


@settings(max_examples=50, deadline=None)
@given(payload_type=st.text(min_size=1, max_size=40), payload=st.binary(max_size=300))
def test_any_envelope_round_trips(payload_type: str, payload: bytes) -> None:
    envelope = dsse.sign(payload_type, payload, [A])
    back = dsse.envelope_from_json(json.loads(json.dumps(envelope.to_json())))
    assert back == envelope
    assert dsse.verified_keys(back, {A.keyid: A.verify_key()}) == [A.verify_key()]


# ---------------------------------------------------------------------------------------
# Key files


def test_key_files_round_trip_and_the_private_one_is_owner_only(tmp_path: Path) -> None:
    write_private_key(tmp_path / "a.key", A)
    write_public_key(tmp_path / "a.pub", A.verify_key())
    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600
    assert read_private_key(tmp_path / "a.key") == A
    assert read_public_key(tmp_path / "a.pub") == A.verify_key()
    assert read_public_key(tmp_path / "a.key") == A.verify_key()  # its public half
    public = json.loads((tmp_path / "a.pub").read_text())
    assert public["format"] == "foldfed.ed25519-public/1" and "private" not in public
    write_keyring(tmp_path / "ring.json", Keyring((A.verify_key(), B.verify_key()), 2))
    ring = read_keyring(tmp_path / "ring.json")
    assert ring.threshold == 2 and [k.name for k in ring.keys] == ["company-a", "company-b"]


def test_bad_key_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    write_private_key(tmp_path / "a.key", A)
    (tmp_path / "a.key").chmod(0o644)
    with pytest.raises(BadKey, match="readable by others"):
        read_private_key(tmp_path / "a.key")
    document = json.loads((tmp_path / "a.key").read_text())
    document["public"] = B.public.hex()
    (tmp_path / "b.key").write_text(json.dumps(document))
    (tmp_path / "b.key").chmod(0o600)
    with pytest.raises(BadKey, match="does not belong"):
        read_private_key(tmp_path / "b.key")
    write_public_key(tmp_path / "a.pub", A.verify_key())
    document = json.loads((tmp_path / "a.pub").read_text())
    document["keyid"] = B.keyid
    (tmp_path / "c.pub").write_text(json.dumps(document))
    with pytest.raises(BadKey, match="keyid"):
        read_public_key(tmp_path / "c.pub")
    with pytest.raises(BadKey, match=r"not a foldfed\.keyring/1"):
        read_keyring(tmp_path / "a.pub")
    ring = {"format": "foldfed.keyring/1", "threshold": 3, "keys": [document | {"keyid": A.keyid}]}
    (tmp_path / "ring.json").write_text(json.dumps(ring))
    with pytest.raises(BadKey, match="threshold 3"):
        read_keyring(tmp_path / "ring.json")


# ---------------------------------------------------------------------------------------
# Signed data cards


def _card() -> dict:
    reports = [[passed("parse")], [failed("parse", "cut")]]
    return build_card(reports, [b"\x01" * 32, b"\x02" * 32], InclusionCriteria(), {"x": "1"})


def test_a_signed_card_verifies_after_a_trip_through_a_file(tmp_path: Path) -> None:
    card = _card()
    assert card["signature"] is None and card["signature_status"] == UNSIGNED
    signed = sign_card(card, A)
    assert signed["signature"]["keyid"] == A.keyid and "signed" in signed["signature_status"]
    assert {k: v for k, v in signed.items() if not k.startswith("signature")} == {
        k: v for k, v in card.items() if not k.startswith("signature")
    }
    (tmp_path / "datacard.json").write_text(json.dumps(signed, indent=1))
    back = json.loads((tmp_path / "datacard.json").read_text())
    assert verify_card(back, [B.verify_key(), A.verify_key()]).name == "company-a"
    # The signature fields are not covered: the signed bytes ignore them.
    assert signed_bytes(signed) == signed_bytes(card)


def test_a_changed_unsigned_or_foreign_card_is_refused() -> None:
    signed = sign_card(_card(), A)
    changed = {**signed, "valid": signed["valid"] + 1}
    with pytest.raises(CardSignatureError, match="does not verify"):
        verify_card(changed, [A.verify_key()])
    with pytest.raises(CardSignatureError, match="unknown key"):
        verify_card(signed, [B.verify_key()])
    with pytest.raises(CardSignatureError, match="unsigned"):
        verify_card(_card(), [A.verify_key()])
    # A DSSE signature of the same bytes under another payload type does not pass.
    body = {k: v for k, v in signed.items() if not k.startswith("signature")}
    other = dsse.sign("application/vnd.in-toto+json", canonical_json(body), [A])
    other_sig = other.to_json()["signatures"][0]["sig"]
    forged = {**signed, "signature": {**signed["signature"], "sig": other_sig}}
    with pytest.raises(CardSignatureError, match="does not verify"):
        verify_card(forged, [A.verify_key()])


def test_data_validate_signs_the_card_and_verify_card_checks_it(tmp_path: Path) -> None:
    """The real commands: a card written with --key verifies against the keyring, and
    fails, naming the reason, once a count in it is changed."""
    root = Path(__file__).resolve().parents[1]
    path = f"{root / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=path)

    def foldfed(*args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "foldfed.cli", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.cif").write_text("data_cut\n")  # fails to parse: no atoms
    assert foldfed("keys", "generate", "company-a", "--out", tmp_path).returncode == 0
    ring = tmp_path / "ring.json"
    made = foldfed("keys", "keyring", tmp_path / "company-a.pub", "--threshold", "1", "--out", ring)
    assert made.returncode == 0
    done = foldfed("data", "validate", tmp_path / "in", "--key", tmp_path / "company-a.key")
    assert done.returncode == 0, done.stderr
    card_path = tmp_path / "in" / "validation" / "datacard.json"
    card = json.loads(card_path.read_text())
    assert card["signature"]["keyid"] == read_public_key(tmp_path / "company-a.pub").keyid
    done = foldfed("data", "verify-card", card_path, "--keyring", ring)
    assert done.returncode == 0 and "signed by company-a" in done.stdout, done.stderr
    card_path.write_text(json.dumps({**card, "structures": card["structures"] + 1}))
    done = foldfed("data", "verify-card", card_path, "--keyring", ring)
    assert done.returncode == 1 and "REFUSED" in done.stderr and "was changed" in done.stderr

"""Fuzzing signed documents: DSSE envelopes (dsse.py), checkpoint proposals, approvals and
releases (governance/), signed data cards (of3/data/datacard.py) and key files
(keyfiles.py).

Every one of these arrives as a file another party wrote. Contract (tests/fuzzing.py):

- reading an envelope file gives an Envelope or ConfigError / MalformedEnvelope;
- `judge` never raises: it returns a Verdict whose reason names the first break;
- `verify_card` returns the signer or raises CardSignatureError;
- reading a key file or keyring gives a key or BadKey.

Two kinds of input: the bytes of a valid file, mutated; and the valid document changed at
the JSON level (one value anywhere replaced by a hostile one: another type, NaN, a lone
surrogate, a huge number) and then *signed again by a consortium key*, so the change gets
past the signature check into the decoder behind it, as an insider's document would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fuzzing import expect_clean, fuzz, json_mutated, mutated
from hypothesis import example, given
from hypothesis import strategies as st

from foldfed.dsse import Envelope, MalformedEnvelope, envelope_from_json, verified_keys
from foldfed.errors import ConfigError
from foldfed.governance.bundle import read_envelope
from foldfed.governance.release import (
    PAYLOAD_TYPE,
    Proposal,
    Verdict,
    WeightsDigest,
    approval_statement,
    approve,
    assemble_release,
    judge,
    proposal_from_json,
)
from foldfed.keyfiles import (
    read_keyring,
    read_private_key,
    read_public_key,
    write_keyring,
    write_private_key,
    write_public_key,
)
from foldfed.of3.data.datacard import CardSignatureError, build_card, sign_card, verify_card
from foldfed.of3.data.schema import InclusionCriteria, failed, passed
from foldfed.signing import BadKey, Keyring, SigningKey, canonical_json

A = SigningKey("company-a", bytes([1]) * 32)
B = SigningKey("company-b", bytes([2]) * 32)
C = SigningKey("company-c", bytes([3]) * 32)
KEYRING = Keyring((A.verify_key(), B.verify_key(), C.verify_key()), 2)
WEIGHTS = WeightsDigest("theta.safetensors", 1000, "b3" * 32, "5a" * 32)
PROPOSAL = Proposal(WEIGHTS, cycle=1, step=12, tensors=4, proposed_at="2026-12-08T00:00:00")
EVAL = {"held_out": {"lddt": 0.81}}
APPROVALS = (approve(PROPOSAL, EVAL, A), approve(PROPOSAL, EVAL, B))
RELEASE = assemble_release(PROPOSAL, APPROVALS, KEYRING, A)
RELEASE_BYTES = json.dumps(RELEASE.to_json(), indent=1).encode()
CARD = sign_card(
    build_card(
        [[passed("parse")], [failed("parse", "cut")]],
        [b"\x01" * 32, b"\x02" * 32],
        InclusionCriteria(),
        {"x": "1"},
    ),
    A,
)

# --------------------------------------------------------------------------- JSON mutation


def _dumps(document: Any) -> bytes:
    # json.dumps writes NaN and lone surrogates (escaped); a hostile writer would too.
    return json.dumps(document).encode()


def _resigned(payload: Any, key: SigningKey = A) -> Envelope:
    """A statement signed by a consortium key, even when it is hostile."""
    return Envelope(PAYLOAD_TYPE, _dumps(payload)).signed_by(key)


# --------------------------------------------------------------------------- envelopes


def _read_and_use(path: Path) -> Verdict:
    envelope = read_envelope(path, "release")
    verified_keys(envelope, KEYRING.by_keyid())
    return judge(envelope, WEIGHTS, KEYRING)


@fuzz(300)
@given(
    raw=st.one_of(
        mutated(RELEASE_BYTES),
        st.builds(_dumps, json_mutated(RELEASE.to_json())),
        st.binary(max_size=128),
    )
)
# Regression: a payloadType with a lone surrogate raised UnicodeEncodeError out of pae().
@example(
    raw=b'{"payload": "", "payloadType": "\\ud800", "signatures": [{"keyid": "'
    + (KEYRING.keys[0].keyid.encode())
    + b'", "sig": ""}]}'
)
# Regression: nesting deeper than json's recursion limit raised RecursionError.
@example(raw=b"[" * 100_000)
def test_an_envelope_file_is_read_or_refused_and_judged(
    raw: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "release.dsse.json"
    path.write_bytes(raw)
    verdict = expect_clean(
        "governance.envelope", lambda: _read_and_use(path), (ConfigError, MalformedEnvelope)
    )
    assert verdict is None or (isinstance(verdict, Verdict) and verdict.reason)


def _release_with(statement: Any) -> Envelope:
    return _resigned(statement)


def _approval_with(statement: Any, key: SigningKey = B) -> dict[str, Any]:
    return _resigned(statement, key).to_json()


RELEASE_STATEMENT = json.loads(RELEASE.payload)
APPROVAL_STATEMENT = approval_statement(PROPOSAL, B.name, EVAL)


@st.composite
def hostile_releases(draw: st.DrawFn) -> Envelope:
    """A release signed by a consortium key whose statement, or one of whose approvals
    (signed by its own consortium key), was changed anywhere."""
    if draw(st.booleans()):
        return _release_with(draw(json_mutated(RELEASE_STATEMENT)))
    statement = json.loads(json.dumps(RELEASE_STATEMENT))
    approval = draw(json_mutated(APPROVAL_STATEMENT))
    statement["predicate"]["approvals"][1] = _approval_with(approval)
    return _release_with(statement)


@fuzz(400)
@given(envelope=hostile_releases())
@example(  # Regression: a NaN in an approval's evaluation must not break the judge
    envelope=_release_with(
        {
            **RELEASE_STATEMENT,
            "predicate": {
                **RELEASE_STATEMENT["predicate"],
                "approvals": [
                    RELEASE_STATEMENT["predicate"]["approvals"][0],
                    _approval_with({**APPROVAL_STATEMENT, "evaluation": {"x": math.nan}}),
                ],
            },
        }
    )
)
def test_judge_of_a_signed_hostile_release_is_a_verdict(envelope: Envelope) -> None:
    verdict = expect_clean("governance.judge", lambda: judge(envelope, WEIGHTS, KEYRING), ())
    assert isinstance(verdict, Verdict) and verdict.reason


@fuzz(200)
@given(document=json_mutated(PROPOSAL.to_json()))
def test_a_hostile_proposal_is_a_proposal_or_refused(document: Any) -> None:
    from foldfed.governance.release import ReleaseRefused

    expect_clean("governance.proposal", lambda: proposal_from_json(document), (ReleaseRefused,))


@fuzz(200)
@given(document=json_mutated(RELEASE.to_json()))
def test_envelope_from_json_is_an_envelope_or_malformed(document: Any) -> None:
    envelope = expect_clean(
        "dsse.envelope", lambda: envelope_from_json(document), (MalformedEnvelope,)
    )
    if envelope is not None:
        expect_clean("dsse.verify", lambda: verified_keys(envelope, KEYRING.by_keyid()), ())
        expect_clean("dsse.payload", envelope.payload_json, (MalformedEnvelope,))


# --------------------------------------------------------------------------- data cards


def _verify_card_bytes(raw: bytes) -> object:
    try:
        card = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # `foldfed data verify-card` refuses an unreadable card itself
    if not isinstance(card, dict):
        return None
    return verify_card(card, KEYRING.keys)


@fuzz(300)
@given(
    raw=st.one_of(
        mutated(_dumps(CARD)),
        st.builds(_dumps, json_mutated(CARD)),
    )
)
# Regressions: a NaN (json.loads reads it) or a lone surrogate anywhere in a card made the
# canonical encoding raise ValueError / UnicodeEncodeError instead of refusing the card.
@example(raw=_dumps({**CARD, "valid_rate": math.nan}))
@example(raw=_dumps({**CARD, "tools": {"x": "\ud800"}}))
def test_a_hostile_data_card_is_verified_or_refused(raw: bytes) -> None:
    expect_clean("datacard.verify", lambda: _verify_card_bytes(raw), (CardSignatureError,))


# --------------------------------------------------------------------------- key files


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("keys")
    write_private_key(folder / "a.key", A)
    write_public_key(folder / "a.pub", A.verify_key())
    write_keyring(folder / "ring.json", KEYRING)
    return {name: (folder / name).read_bytes() for name in ("a.key", "a.pub", "ring.json")}


_READERS = {"a.key": read_private_key, "a.pub": read_public_key, "ring.json": read_keyring}


@pytest.mark.parametrize("name", sorted(_READERS))
@fuzz(150)
@given(data=st.data())
def test_a_hostile_key_file_is_a_key_or_bad_key(
    name: str,
    data: st.DataObject,
    key_files: dict[str, bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    valid = key_files[name]
    raw = data.draw(
        st.one_of(
            mutated(valid),
            st.builds(_dumps, json_mutated(json.loads(valid))),
            st.just(b"[" * 100_000),
        )
    )
    path = tmp_path_factory.getbasetemp() / name
    path.write_bytes(raw)
    path.chmod(0o600)
    expect_clean("keyfiles.read", lambda: _READERS[name](path), (BadKey,))


def test_the_valid_documents_pass() -> None:
    assert judge(RELEASE, WEIGHTS, KEYRING).valid
    assert verify_card(CARD, KEYRING.keys).name == A.name
    assert canonical_json(PROPOSAL.to_json())

"""Checkpoint governance: a release needs M-of-N signed approvals of the exact weights.

The decision (`governance.release.judge`) is tested as a pure function first; then the
whole process runs through the real command line, as separate processes on real files:
three companies' keys, 2-of-3 approve and publish, verify passes, then fails after one
byte of the weights changes, with too few approvals, and with a foreign approval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from foldfed.dsse import Envelope
from foldfed.governance.release import (
    PAYLOAD_TYPE,
    Proposal,
    ReleaseRefused,
    WeightsDigest,
    approval_statement,
    approve,
    assemble_release,
    judge,
)
from foldfed.signing import Keyring, SigningKey, canonical_json

ROOT = Path(__file__).resolve().parents[1]

A = SigningKey("company-a", bytes([1]) * 32)
B = SigningKey("company-b", bytes([2]) * 32)
C = SigningKey("company-c", bytes([3]) * 32)
OUTSIDER = SigningKey("outsider", bytes([9]) * 32)
KEYRING = Keyring((A.verify_key(), B.verify_key(), C.verify_key()), 2)
WEIGHTS = WeightsDigest("theta.safetensors", 1000, "b3" * 32, "5a" * 32)
PROPOSAL = Proposal(WEIGHTS, cycle=1, step=12, tensors=4, proposed_at="2026-12-08T00:00:00")
EVAL = {"held_out": {"lddt": 0.81, "theta0_lddt": 0.78}}


def _release(*approvals: Envelope, publisher: SigningKey = A) -> Envelope:
    """A release envelope as `assemble_release` builds it, without judging it first."""
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [WEIGHTS.subject()],
        "predicateType": "urn:foldfed:checkpoint-release:v1",
        "predicate": {
            "proposal": PROPOSAL.to_json(),
            "threshold": 2,
            "approvals": [a.to_json() for a in approvals],
        },
    }
    return Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(publisher)


# ---------------------------------------------------------------------------------------
# The decision, pure


def test_two_of_three_approvals_release_the_weights() -> None:
    release = assemble_release(PROPOSAL, [approve(PROPOSAL, EVAL, k) for k in (A, C)], KEYRING, B)
    verdict = judge(release, WEIGHTS, KEYRING)
    assert verdict.valid, verdict.reason
    assert verdict.approvers == ("company-a", "company-c")
    assert verdict.evaluations["company-c"] == EVAL and verdict.proposal == PROPOSAL


def test_changed_weights_are_refused() -> None:
    release = _release(approve(PROPOSAL, EVAL, A), approve(PROPOSAL, EVAL, B))
    other = WeightsDigest(WEIGHTS.name, WEIGHTS.size, "00" * 32, WEIGHTS.sha256)
    assert "weights file was modified" in judge(release, other, KEYRING).reason
    longer = WeightsDigest(WEIGHTS.name, WEIGHTS.size + 1, WEIGHTS.blake3, WEIGHTS.sha256)
    assert "1001 bytes" in judge(release, longer, KEYRING).reason
    # The file's name does not matter, its bytes do.
    renamed = WeightsDigest("copy.safetensors", WEIGHTS.size, WEIGHTS.blake3, WEIGHTS.sha256)
    assert judge(release, renamed, KEYRING).valid


def _forged() -> Envelope:
    """company-b's approval with its evaluation changed after signing."""
    genuine = approve(PROPOSAL, EVAL, B)
    statement = approval_statement(PROPOSAL, "company-b", {"held_out": {"lddt": 0.99}})
    return Envelope(PAYLOAD_TYPE, canonical_json(statement), genuine.signatures)


def _impostor() -> Envelope:
    """An approval in company-b's name, signed by the outsider, claiming b's key id."""
    statement = approval_statement(PROPOSAL, "company-b", EVAL)
    signed = Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(OUTSIDER)
    (sig,) = signed.signatures
    return Envelope(signed.payload_type, signed.payload, (type(sig)(B.keyid, sig.sig),))


def _misnamed() -> Envelope:
    """Signed by company-c, but naming company-b as the approver."""
    statement = approval_statement(PROPOSAL, "company-b", EVAL)
    return Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(C)


def _other_proposal() -> Envelope:
    later = Proposal(WEIGHTS, 1, 13, 4, PROPOSAL.proposed_at)
    return approve(later, EVAL, B)


def _two_signatures() -> Envelope:
    return approve(PROPOSAL, EVAL, B).signed_by(C)


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (lambda: approve(PROPOSAL, EVAL, A), "duplicate approval by company-a"),
        (lambda: approve(PROPOSAL, EVAL, OUTSIDER), "not in the consortium's keyring"),
        (_forged, "signature of company-b does not verify"),
        (_impostor, "signature of company-b does not verify"),
        (_misnamed, "names 'company-b' but is signed by company-c"),
        (_other_proposal, "approves another proposal"),
        (_two_signatures, "2 signatures"),
        (lambda: {"payload": 1}, "approval 1: the envelope has no payloadType"),
    ],
    ids=["duplicate", "unknown-key", "forged", "impostor", "misnamed", "other", "two", "junk"],
)
def test_a_bad_approval_refuses_the_bundle(second: object, reason: str) -> None:
    first = approve(PROPOSAL, EVAL, A)
    extra = second()  # type: ignore[operator]
    statement = json.loads(_release(first).payload)
    raw = extra if isinstance(extra, dict) else extra.to_json()
    third = approve(PROPOSAL, EVAL, C).to_json()
    statement["predicate"]["approvals"] = [first.to_json(), raw, third]
    release = Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(A)
    verdict = judge(release, WEIGHTS, KEYRING)
    assert not verdict.valid and reason in verdict.reason, verdict.reason


def test_too_few_approvals_are_refused() -> None:
    verdict = judge(_release(approve(PROPOSAL, EVAL, A)), WEIGHTS, KEYRING)
    assert not verdict.valid
    assert verdict.reason == (
        "too few approvals: 1 of the 3 consortium keys approved, the threshold is 2"
    )
    # The threshold is the verifier's keyring's, whatever the bundle says.
    strict = Keyring(KEYRING.keys, 3)
    two = _release(approve(PROPOSAL, EVAL, A), approve(PROPOSAL, EVAL, B))
    assert judge(two, WEIGHTS, KEYRING).valid
    assert "threshold is 3" in judge(two, WEIGHTS, strict).reason


def test_the_release_must_be_signed_by_a_consortium_key() -> None:
    approvals = (approve(PROPOSAL, EVAL, A), approve(PROPOSAL, EVAL, B))
    verdict = judge(_release(*approvals, publisher=OUTSIDER), WEIGHTS, KEYRING)
    assert "no valid signature by a consortium key" in verdict.reason
    with pytest.raises(ReleaseRefused, match="consortium key"):
        assemble_release(PROPOSAL, list(approvals), KEYRING, OUTSIDER)
    # A publisher cannot change the statement after signing it.
    release = _release(*approvals)
    altered = Envelope(
        release.payload_type, release.payload.replace(b"12", b"13", 1), release.signatures
    )
    assert not judge(altered, WEIGHTS, KEYRING).valid


def test_an_approval_is_an_in_toto_statement_about_the_weights() -> None:
    statement = json.loads(approve(PROPOSAL, EVAL, A).payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"] == [
        {"name": "theta.safetensors", "digest": {"blake3": "b3" * 32, "sha256": "5a" * 32}}
    ]
    assert statement["predicate"]["evaluation"] == EVAL
    with pytest.raises(ReleaseRefused, match="evaluation summary is over"):
        approve(PROPOSAL, {"x": "y" * 70_000}, A)


# ---------------------------------------------------------------------------------------
# The whole process through the command line


def foldfed(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    path = f"{ROOT / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three companies' keys and their 2-of-3 keyring; an outsider's key; a checkpoint."""
    root = tmp_path_factory.mktemp("consortium")
    for name in ("company-a", "company-b", "company-c", "outsider"):
        foldfed("keys", "generate", name, "--out", root / "keys")
    pubs = [root / "keys" / f"company-{x}.pub" for x in "abc"]
    foldfed("keys", "keyring", *pubs, "--threshold", "2", "--out", root / "keyring.json")
    rng = np.random.default_rng(0)
    tensors = {
        f"layer{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(3)
    }
    save_file(tensors, str(root / "theta.safetensors"))
    foldfed(
        "checkpoint",
        "propose",
        root / "theta.safetensors",
        "--cycle",
        "1",
        "--step",
        "12",
        "--out",
        root / "proposal.json",
    )
    for name in ("company-a", "company-b", "company-c", "outsider"):
        (root / f"eval-{name}.json").write_text(json.dumps({"held_out": {"lddt": 0.8}}))
        foldfed(
            "checkpoint",
            "approve",
            root / "proposal.json",
            "--weights",
            root / "theta.safetensors",
            "--key",
            root / "keys" / f"{name}.key",
            "--evaluation",
            root / f"eval-{name}.json",
            "--out",
            root / f"approval-{name}.dsse.json",
        )
    return root


def publish(root: Path, out: Path, *approvers: str, check: bool = True):  # type: ignore[no-untyped-def]
    approvals = [root / f"approval-{name}.dsse.json" for name in approvers]
    return foldfed(
        "checkpoint",
        "publish",
        root / "proposal.json",
        *approvals,
        "--weights",
        root / "theta.safetensors",
        "--keyring",
        root / "keyring.json",
        "--key",
        root / "keys" / "company-a.key",
        "--out",
        out,
        check=check,
    )


def verify(root: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    return foldfed("checkpoint", "verify", bundle, "--keyring", root / "keyring.json", check=False)


def test_two_of_three_publish_and_verify_then_one_byte_breaks_it(consortium: Path) -> None:
    root = consortium
    proposal = json.loads((root / "proposal.json").read_text())
    assert proposal["tensors"] == 3 and proposal["step"] == 12
    assert stat_mode(root / "keys" / "company-a.key") == 0o600
    bundle = root / "release"
    publish(root, bundle, "company-a", "company-c")
    assert sorted(p.name for p in bundle.iterdir()) == ["release.dsse.json", "theta.safetensors"]
    done = verify(root, bundle)
    assert done.returncode == 0, done.stderr
    assert "approved by company-a, company-c" in done.stdout
    envelope = json.loads((bundle / "release.dsse.json").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    # One flipped byte in the weights: refused, with the reason.
    weights = bundle / "theta.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    done = verify(root, bundle)
    assert done.returncode == 1
    assert "REFUSED: the weights file was modified" in done.stderr


def test_too_few_approvals_cannot_be_published_or_verified(consortium: Path) -> None:
    root = consortium
    done = publish(root, root / "one", "company-b", check=False)
    assert done.returncode != 0 and "too few approvals: 1 of the 3" in done.stderr
    assert not (root / "one" / "release.dsse.json").exists()
    # A bundle cut down to one approval after publishing fails verification.
    publish(root, root / "cut", "company-a", "company-b")
    release = json.loads((root / "cut" / "release.dsse.json").read_text())
    cut = _rewrite(release, lambda approvals: approvals[:1], root)
    (root / "cut" / "release.dsse.json").write_text(json.dumps(cut))
    done = verify(root, root / "cut")
    assert done.returncode == 1 and "too few approvals" in done.stderr


def test_an_approval_by_a_key_outside_the_keyring_fails(consortium: Path) -> None:
    root = consortium
    done = publish(root, root / "foreign", "company-a", "outsider", check=False)
    assert done.returncode != 0 and "not in the consortium's keyring" in done.stderr
    # Slipped into a valid bundle afterwards, it is found by verify.
    publish(root, root / "slipped", "company-a", "company-b")
    release = json.loads((root / "slipped" / "release.dsse.json").read_text())
    outsider = json.loads((root / "approval-outsider.dsse.json").read_text())
    slipped = _rewrite(release, lambda approvals: [*approvals, outsider], root)
    (root / "slipped" / "release.dsse.json").write_text(json.dumps(slipped))
    done = verify(root, root / "slipped")
    assert done.returncode == 1 and "not in the consortium's keyring" in done.stderr


def test_a_company_approves_only_the_weights_it_holds(consortium: Path, tmp_path: Path) -> None:
    root = consortium
    other = tmp_path / "theta.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(other))
    done = foldfed(
        "checkpoint",
        "approve",
        root / "proposal.json",
        "--weights",
        other,
        "--key",
        root / "keys" / "company-b.key",
        "--evaluation",
        root / "eval-company-b.json",
        "--out",
        tmp_path / "x.json",
        check=False,
    )
    assert done.returncode != 0 and "not the proposed checkpoint" in done.stderr


def _rewrite(release: dict, change, root: Path) -> dict:  # type: ignore[no-untyped-def]
    """`release` with its approvals changed and re-signed by company-a, the publisher: a
    dishonest publisher can do this, so only the approvals may carry authority."""
    from foldfed.dsse import envelope_from_json
    from foldfed.keyfiles import read_private_key

    envelope = envelope_from_json(release)
    statement = envelope.payload_json()
    statement["predicate"]["approvals"] = change(statement["predicate"]["approvals"])
    key = read_private_key(root / "keys" / "company-a.key")
    return Envelope(PAYLOAD_TYPE, canonical_json(statement)).signed_by(key).to_json()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_missing_or_broken_bundle_is_refused(consortium: Path, tmp_path: Path) -> None:
    done = verify(consortium, tmp_path)
    assert done.returncode == 1 and "not a published bundle" in done.stderr
    (tmp_path / "release.dsse.json").write_text('{"payload": "eA=="}')
    done = verify(consortium, tmp_path)
    assert done.returncode == 1 and "REFUSED" in done.stderr and "payloadType" in done.stderr

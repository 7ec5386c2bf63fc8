"""Gating after a published release (gate/next_cycle.py), without a broker: a valid
bundle gives the next cycle's number, θ0 file and digest; an altered or under-approved
one is refused with `verify`'s reason; once ready, a late joiner's spool holds the
release's model at the release's step, and a member's spool is left as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from foldfed.digests import file_digest
from foldfed.errors import ConfigError
from foldfed.gate.next_cycle import adopt_theta0, from_release
from foldfed.governance.bundle import safetensors_tensor_count, weights_digest, write_bundle
from foldfed.governance.release import Proposal, approve, assemble_release
from foldfed.signing import Keyring, SigningKey
from foldfed.spool import Spool

COMPANIES = ("org-a", "org-b", "org-c")
KEYS = {c: SigningKey(name=c, seed=bytes([i]) * 32) for i, c in enumerate(COMPANIES)}
KEYRING = Keyring(tuple(k.verify_key() for k in KEYS.values()), 2)
FINAL_STEP = 3  # cycle 1: steps 1-2, final release 3


def _weights(path: Path, seed: int = 7) -> Path:
    from foldfed.trainer.task import initial_model

    path.parent.mkdir(parents=True, exist_ok=True)
    initial_model(path, seed)
    return path


def _bundle(tmp_path: Path, approvers: tuple[str, ...] = ("org-a", "org-b")) -> Path:
    weights = _weights(tmp_path / "model-000000000003.safetensors")
    proposal = Proposal(
        weights_digest(weights), 1, FINAL_STEP, safetensors_tensor_count(weights), "now"
    )
    approvals = [approve(proposal, {"eval_loss": 0.1}, KEYS[c]) for c in approvers]
    release = assemble_release(proposal, approvals, Keyring(KEYRING.keys, 1), KEYS["org-a"])
    bundle = tmp_path / "release-c1"
    write_bundle(bundle, weights, weights.name, release)
    return bundle


def test_a_release_names_the_next_cycle_and_its_theta0(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    nxt = from_release(bundle, KEYRING)
    assert (nxt.cycle, nxt.step, nxt.approvers) == (2, FINAL_STEP, ("org-a", "org-b"))
    assert nxt.weights == bundle / "model-000000000003.safetensors"
    assert nxt.digest == file_digest(nxt.weights).hex()


def test_an_altered_or_under_approved_release_is_refused(tmp_path: Path) -> None:
    few = _bundle(tmp_path / "few", approvers=("org-c",))
    with pytest.raises(ConfigError, match="too few approvals"):
        from_release(few, KEYRING)
    bundle = _bundle(tmp_path / "altered")
    weights = bundle / "model-000000000003.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="the weights file was modified"):
        from_release(bundle, KEYRING)


def test_a_late_joiner_holds_the_release_at_its_step_and_a_member_keeps_its_model(
    tmp_path: Path,
) -> None:
    nxt = from_release(_bundle(tmp_path), KEYRING)
    late = tmp_path / "late-spool"
    assert adopt_theta0(nxt, late)
    current = Spool(late).current_model()
    assert current is not None and current.step == FINAL_STEP
    assert current.model_digest.hex() == nxt.digest
    assert file_digest(current.path).hex() == nxt.digest
    assert not adopt_theta0(nxt, late)  # again: nothing to do

    member = Spool(tmp_path / "member-spool")
    own = _weights(member.snapshot_path(FINAL_STEP))
    member.commit_model(FINAL_STEP, file_digest(own))
    assert not adopt_theta0(nxt, member.root)
    assert member.current_model() is not None
    assert member.current_model().path == own  # type: ignore[union-attr]

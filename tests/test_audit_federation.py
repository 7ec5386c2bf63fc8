"""`foldfed verify` on a real federation's hub state: every signature, every
θ_{t+1} = θ_t + U_t and every U_t = the aggregate of the signed contributions hold, and
any single changed byte of a record, a manifest, a chunk, a model or an update is found
and named (issue 14 item 5)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_federation import STEPS, run_federation

from foldfed.demo.cluster import LocalFederation
from foldfed.keyfiles import read_keyring
from foldfed.verifier.state import verify_state

from conftest import PARTICIPANTS, BrokerHandle

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def federation(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> LocalFederation:
    """A whole run, retention off (FOLDFED_RETAIN_STEPS=0): every file stays to recompute.
    The demo's cluster provisions the keys: members sign, the hub checks and signs."""
    federation, record = run_federation(broker, tmp_path_factory.mktemp("audited"))
    assert record.finished, record
    return federation


def _verify(federation: LocalFederation) -> tuple[bool, str, list[str]]:
    outcome = verify_state(
        federation.hub_dir, read_keyring(federation.keyring), federation.initial_model
    )
    return outcome.ok, outcome.broken, outcome.steps


def test_verify_passes_on_the_hub_state_and_recomputes_every_step(
    federation: LocalFederation,
) -> None:
    ok, broken, steps = _verify(federation)
    assert ok, broken
    assert len(steps) == STEPS
    for line in steps:
        assert f"{len(PARTICIPANTS)} signed contributions" in line
        assert "θ_{t+1} = θ_t + U_t recomputed" in line
        assert "U_t recomputed from the signed contributions" in line
    cli = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", "verify", str(federation.hub_dir),
         "--keyring", str(federation.keyring), "--initial-model", str(federation.initial_model)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert f"OK: {STEPS} steps verified" in cli.stdout


def _targets(federation: LocalFederation) -> dict[str, tuple[Path, str]]:
    """Stored files of step 2, and the words the break must name."""
    hub = federation.hub_dir
    member = PARTICIPANTS[0]
    manifest = hub / "store" / "manifests" / f"{2:012d}" / f"{member}.manifest"
    chunk = sorted((hub / "store" / "chunks").rglob("*"))
    from foldfed.messages import decode

    m = decode("foldfed.v1.DeltaManifest", manifest.read_bytes())
    first_chunk = hub / "store" / "chunks" / m.chunk_digests[0].hex()[:2] / m.chunk_digests[0].hex()
    assert chunk and first_chunk.is_file()
    return {
        "record": (hub / "records" / f"step-{2:012d}.dsse.json", "step 2: the record"),
        "manifest": (manifest, f"step 2: manifest of {member!r}"),
        "chunk": (first_chunk, f"step 2: chunk 0 of {member!r}"),
        "model": (hub / "models" / f"model-{3:012d}.safetensors", "step 2: θ_3 (model-"),
        "update": (hub / "updates" / f"update-{2:012d}.safetensors", "step 2: U_2 (update-"),
        "initial model": (federation.initial_model, "step 1: θ_1"),
    }


@pytest.mark.parametrize(
    "what", ["record", "manifest", "chunk", "model", "update", "initial model"]
)
def test_any_single_changed_byte_breaks_verify_with_a_named_reason(
    federation: LocalFederation, what: str
) -> None:
    path, named = _targets(federation)[what]
    original = path.read_bytes()
    mode = path.stat().st_mode
    path.chmod(0o644)
    try:
        for position in (0, 9, len(original) // 2, len(original) - 1):
            changed = bytearray(original)
            changed[position] ^= 0x01
            path.write_bytes(bytes(changed))
            ok, broken, _ = _verify(federation)
            assert not ok, f"{what} byte {position} changed and verify passed"
            assert broken.startswith(named), (what, position, broken)
    finally:
        path.write_bytes(original)
        path.chmod(mode)
    assert _verify(federation)[0]


def test_after_retention_the_signed_digests_still_chain_and_a_changed_record_breaks(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """What retention deletes (chunks, models, updates) is held by the signed records:
    verify says so per step; manifests and records are kept, and still checked."""
    kept = tmp_path / "hub"
    shutil.copytree(federation.hub_dir, kept)
    for deleted in ("store/chunks", "models", "updates"):
        shutil.rmtree(kept / deleted)
    keyring = read_keyring(federation.keyring)
    outcome = verify_state(kept, keyring)
    assert outcome.ok, outcome.broken
    for line in outcome.steps:
        assert "held by the signed digests" in line and "U_t held by its signed digest" in line
    record = kept / "records" / f"step-{3:012d}.dsse.json"
    changed = bytearray(record.read_bytes())
    changed[len(changed) // 3] ^= 0x01
    record.write_bytes(bytes(changed))
    assert verify_state(kept, keyring).broken.startswith("step 3: the record")

"""Secure aggregation in a whole federation (issue 14, "What it must show"): a masked run
ends on the same model digest as the plaintext run, and the hub's store, its logs and a
dump of the live aggregator's memory hold no participant's unmasked delta (neither its
fp32 bytes nor its fixed-point q), while the same search finds them in a plaintext run."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from test_federation import STEPS, direct_fedavg, final_digests, run_federation

from foldfed.deltafile import load_delta
from foldfed.demo.cluster import LocalFederation
from foldfed.domain import Manifest
from foldfed.keyfiles import read_keyring
from foldfed.messages import decode
from foldfed.spool import Spool
from foldfed.verifier.state import verify_state

from conftest import PARTICIPANTS, BrokerHandle

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SECURE = {"FOLDFED_SECURE_AGGREGATION": "on"}
SLOW = PARTICIPANTS[-1]  # delivers late, so the others' deltas sit in the hub's sum a while
WINDOW = 32  # bytes per searched window
WINDOWS = 6  # windows per delta and encoding


def _sent_delta(federation: LocalFederation, participant: str, step: int):
    for record in Spool(federation.spool_of(participant)).sent_deltas():
        if record.step == step:
            return record
    return None


def _windows(federation: LocalFederation, participant: str, step: int) -> list[bytes]:
    """32-byte windows of the member's unmasked delta: its fp32 bytes and its int64 q,
    taken where every element is non-zero (an all-zero window would be found anywhere)."""
    record = _sent_delta(federation, participant, step)
    assert record is not None
    out = []
    for _name, value in sorted(load_delta(record.path).items()):
        x = value.numpy().reshape(-1).astype(np.float32)
        q = np.rint(x.astype(np.float64) * record.weight * 2**24).astype(np.int64)
        for values, size in ((x, 4), (q, 8)):
            per = WINDOW // size
            for start in range(0, values.size - per, max(1, values.size // WINDOWS)):
                piece = values[start : start + per]
                if np.all(piece != 0) and len(out) < 4 * WINDOWS * 2:
                    out.append(piece.tobytes())
        if len(out) >= 2 * WINDOWS:
            break
    assert len(out) >= 2 * WINDOWS // 2, f"{participant}: too few non-zero windows"
    return out


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _found_in_files(paths: list[Path], windows: list[bytes]) -> list[str]:
    hits = []
    for path in paths:
        data = path.read_bytes()
        hits += [f"{path.name}@{data.find(w)}" for w in windows if w in data]
    return hits


def _memory(pid: int) -> bytes:
    """The readable memory of process `pid` (/proc/PID/maps and /proc/PID/mem, as root)."""
    parts = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            try:
                mem.seek(begin)
                parts.append(mem.read(end - begin))
            except (OSError, ValueError, OverflowError):
                continue  # a region that went away or cannot be read
    return b"".join(parts)


class _MemoryWatch:
    """Dumps the aggregator's memory once the others' step-1 deltas are counted (their
    sent mark follows the hub's receipt) and the slow member's is not yet."""

    def __init__(self) -> None:
        self.dump: bytes | None = None
        self.federation: LocalFederation | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            federation = self.federation
            if federation is None or "aggregator" not in federation.processes:
                continue
            fast = [p for p in PARTICIPANTS if p != SLOW]
            if all(_sent_delta(federation, p, 1) for p in fast) and not _sent_delta(
                federation, SLOW, 1
            ):
                self.dump = _memory(federation.processes["aggregator"].proc.pid)
                return


@pytest.fixture(scope="module")
def plain(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run_federation(broker, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def masked(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    watch = _MemoryWatch()
    original = LocalFederation.start_all

    def start_all(self: LocalFederation) -> None:
        watch.federation = self
        original(self)

    watch.thread.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalFederation, "start_all", start_all)
        federation, record = run_federation(
            broker,
            tmp_path_factory.mktemp("masked"),
            env=SECURE,
            participant_env={SLOW: {"FOLDFED_UPLOADER_EXTRA_DELAY_S": "3"}},
        )
    watch.stop.set()
    watch.thread.join()
    return federation, record, watch.dump


def test_masked_run_ends_on_exact_fedavg_and_all_agree(masked) -> None:
    """Bit-identical to the plaintext run: test_federation shows a plaintext run ends on
    direct_fedavg's digest too (the long test below runs both side by side)."""
    federation, record, _ = masked
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert not record.mismatches
    assert set(digests.values()) == {direct_fedavg(federation)}
    assert set(digests.values()) == {record.expected_models[STEPS + 1]}


@pytest.mark.long
def test_masked_run_ends_on_the_plaintext_runs_model(plain, masked) -> None:
    _, plain_record = plain
    _, record, _ = masked
    assert final_digests(record) == final_digests(plain_record)


@pytest.mark.long
def test_the_search_finds_deltas_in_a_plaintext_hubs_store(plain) -> None:
    """The detector works on a hub: a plaintext hub stores every delta's bytes as they are."""
    federation, _ = plain
    windows = _windows(federation, PARTICIPANTS[0], 1)
    assert _found_in_files(_files(federation.hub_dir / "store" / "chunks"), windows)


def test_no_unmasked_delta_in_the_hubs_store_logs_or_memory(masked) -> None:
    federation, _, dump = masked
    # The detector works: the windows are in the member's own delta file.
    own = _sent_delta(federation, PARTICIPANTS[0], 1)
    assert own is not None
    assert _found_in_files([own.path], _windows(federation, PARTICIPANTS[0], 1))
    hub_files = _files(federation.hub_dir)
    hub_logs = [p for p in _files(federation.logs) if re.match(r"(aggregator|barrier)", p.name)]
    assert hub_files and hub_logs
    for participant in PARTICIPANTS:
        for step in range(1, STEPS + 1):
            windows = _windows(federation, participant, step)
            assert not _found_in_files(hub_files + hub_logs, windows), (participant, step)
    assert dump is not None, "the aggregator's memory was never dumped mid-step"
    assert len(dump) > 1 << 20
    for participant in PARTICIPANTS:
        windows = _windows(federation, participant, 1)
        assert not [w for w in windows if w in dump], participant
    # The dump is real: it holds the hub's own manifests, e.g. the member names.
    assert PARTICIPANTS[0].encode() in dump


def test_verify_checks_a_masked_run_against_the_sum_of_its_masked_chunks(masked) -> None:
    federation, _, _ = masked
    keyring = read_keyring(federation.keyring)
    outcome = verify_state(federation.hub_dir, keyring, federation.initial_model)
    assert outcome.ok, outcome.broken
    assert len(outcome.steps) == STEPS
    for line in outcome.steps:
        assert "U_t recomputed from the signed contributions (masked: their sum on the ring)" in (
            line
        )
    manifest = federation.hub_dir / "store" / "manifests" / f"{2:012d}" / f"{SLOW}.manifest"
    m = decode("foldfed.v1.DeltaManifest", manifest.read_bytes())
    assert isinstance(m, Manifest) and m.masked
    digest = m.chunk_digests[0].hex()
    chunk = federation.hub_dir / "store" / "chunks" / digest[:2] / digest
    for path, named in ((chunk, f"step 2: chunk 0 of {SLOW!r}"),
                        (manifest, f"step 2: manifest of {SLOW!r}")):  # fmt: skip
        original, mode = path.read_bytes(), path.stat().st_mode
        path.chmod(0o644)
        try:
            changed = bytearray(original)
            changed[len(changed) // 2] ^= 0x01
            path.write_bytes(bytes(changed))
            outcome = verify_state(federation.hub_dir, keyring, federation.initial_model)
            assert outcome.broken.startswith(named), outcome.broken
        finally:
            path.write_bytes(original)
            path.chmod(mode)
    assert verify_state(federation.hub_dir, keyring, federation.initial_model).ok


@pytest.mark.long
@pytest.mark.parametrize(
    "crash",
    [
        (f"{PARTICIPANTS[1]}-uploader", "uploader:after-first-chunk@2"),
        ("aggregator", "aggregator:after-delivery@2"),
    ],
    ids=["uploader-mid-upload", "aggregator-mid-step"],
)
def test_a_sigkilled_member_or_hub_changes_nothing_under_masking(
    broker: BrokerHandle, tmp_path: Path, masked, crash: tuple[str, str]
) -> None:
    """A restarted member regenerates the same masked bytes (its manifest id is unchanged,
    else the hub would refuse it as conflicting); a restarted aggregator rebuilds the
    masked sum from its store. Either way the model is the undisturbed masked run's."""
    _, baseline, _ = masked
    federation, record = run_federation(broker, tmp_path, crash=crash, env=SECURE)
    assert federation.restarted == {crash[0]}, "the crash point was never reached"
    assert final_digests(record) == final_digests(baseline)
    assert not record.mismatches

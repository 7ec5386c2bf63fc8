"""Retention in whole runs (real broker, real processes, real files): disk use stays flat
over the steps at the hub and at every participant, and a SIGKILL in the middle of a GC
loses nothing a restart needs: the run ends bit-identical (docs/retention.md)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_codec_federation import CODED
from test_federation import _watch_with_restarts

from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.observer import RunRecord
from foldfed.trainer.task import initial_model

from conftest import PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STEPS = 6
WARM_UP = 2  # steps before the hub's and participants' disk use reaches its plateau


@dataclass
class DiskSamples:
    """Bytes of step files, sampled while the run goes, by the newest θ_t the hub made."""

    hub: dict[int, int] = field(default_factory=dict)
    participants: dict[int, int] = field(default_factory=dict)

    def add(self, step: int, hub: int, participant: int) -> None:
        self.hub[step] = max(self.hub.get(step, 0), hub)
        self.participants[step] = max(self.participants.get(step, 0), participant)


def _bytes(folder: Path, pattern: str = "*") -> int:
    total = 0
    for path in folder.rglob(pattern):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue  # deleted while we looked
    return total


def _newest_model(hub: Path) -> int:
    steps = [int(p.name[6:18]) for p in (hub / "models").glob("model-*.safetensors")]
    return max(steps, default=1)


def _sample(federation: LocalFederation, samples: DiskSamples, done: threading.Event) -> None:
    hub = federation.hub_dir
    while not done.wait(0.05):
        step = _newest_model(hub)
        held = sum(_bytes(hub / d) for d in ("store/chunks", "models", "updates"))
        spools = [federation.spool_of(p) for p in PARTICIPANTS]
        worst = max(
            _bytes(s / "outbox", "*.safetensors")
            + _bytes(s / "inbox", "*.safetensors")
            + _bytes(s / "model", "*.safetensors")
            + _bytes(s / "downloads" / "chunks")
            + _bytes(s / "coding", "*.coded")
            for s in spools
        )
        samples.add(step, held, worst)


def run(
    broker: BrokerHandle,
    workdir: Path,
    crash: tuple[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[LocalFederation, RunRecord, DiskSamples]:
    asyncio.run(reset_topology(broker.admin_url))
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        # The default policy (keep one step); no checkpoint falls inside the run.
        common_env={"FOLDFED_SEED": "7", "FOLDFED_RETAIN_CHECKPOINT_EVERY": "0", **(env or {})},
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    initial_model(federation.initial_model, 7)
    record = RunRecord(spec.participants, spec.steps)
    if crash is not None:
        name, point = crash
        federation.crash_env = {name: {"FOLDFED_CRASH_AT": point}}
    samples, done = DiskSamples(), threading.Event()
    sampler = threading.Thread(target=_sample, args=(federation, samples, done), daemon=True)
    sampler.start()
    try:
        asyncio.run(_watch_with_restarts(federation, record))
    finally:
        done.set()
        sampler.join()
        federation.stop()
    return federation, record, samples


def final_digests(record: RunRecord) -> dict[str, bytes]:
    return {p: r.model_digest for (s, p), r in record.reports.items() if s == STEPS + 1}


@pytest.fixture(scope="module")
def collected(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    return run(broker, tmp_path_factory.mktemp("retention"))


def test_every_participant_ends_on_the_hubs_model(collected) -> None:
    _, record, _ = collected
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert set(digests.values()) == {record.expected_models[STEPS + 1]}
    assert not record.mismatches


def test_disk_use_stays_flat_over_the_steps(collected) -> None:
    federation, _, samples = collected
    size = federation.initial_model.stat().st_size  # S
    n = len(PARTICIPANTS)
    late = [s for s in samples.hub if s > WARM_UP]
    assert late, samples
    # The hub: the open step's N deltas, θ_t, U_{t-1}, and while finalizing U_t, θ_{t+1}
    # and U_t's broadcast copy (docs/retention.md); a little slack for the headers.
    assert max(samples.hub[s] for s in late) <= (n + 5) * size * 1.05, samples.hub
    # A participant: θ_t, its newest delta, the update's chunks and its file.
    assert max(samples.participants[s] for s in late) <= 4 * size * 1.05, samples
    # Flat: those bounds do not grow with the steps, while keeping everything would hold
    # (N + 2) S more per step: by the last step, far above them.
    assert (n + 5) * size * 1.05 < STEPS * (n + 2) * size


def test_what_is_left_is_what_the_policy_keeps(collected) -> None:
    federation, _, _ = collected
    hub = federation.hub_dir
    size = federation.initial_model.stat().st_size
    # The final release goes to the participants only: the hub's open step stays R, so it
    # keeps θ_R, θ_{R+1}, U_{R-1}, U_R and step R's chunks until a next cycle opens.
    models = sorted(p.name for p in (hub / "models").glob("model-*"))
    assert models == [f"model-{s:012d}.safetensors" for s in (STEPS, STEPS + 1)]
    updates = sorted(p.name for p in (hub / "updates").glob("update-*"))
    assert updates == [f"update-{s:012d}.safetensors" for s in (STEPS - 1, STEPS)]
    chunks = _bytes(hub / "store" / "chunks")
    assert chunks <= (len(PARTICIPANTS) + 1) * size * 1.05
    # Manifests are kept for ever (audit).
    manifests = list((hub / "store" / "manifests").rglob("*.manifest"))
    assert len(manifests) == STEPS * len(PARTICIPANTS)
    for participant in PARTICIPANTS:
        spool = federation.spool_of(participant)
        deltas = sorted(p.name for p in (spool / "outbox").glob("delta-*.safetensors"))
        assert deltas == [f"delta-{STEPS:012d}.safetensors"]
        assert len(list((spool / "outbox").glob("delta-*.sent"))) == STEPS
        assert len(list((spool / "uploads").glob("step-*/manifest.pb"))) == STEPS
        assert not [p for p in (spool / "downloads" / "chunks").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "crash",
    [
        ("aggregator", "aggregator:mid-gc@4"),
        (f"{PARTICIPANTS[1]}-uploader", "uploader:mid-gc@4"),
    ],
    ids=["aggregator", "uploader"],
)
def test_sigkill_during_gc_loses_nothing(
    broker: BrokerHandle, tmp_path: Path, collected, crash: tuple[str, str]
) -> None:
    _, baseline, _ = collected
    federation, record, _ = run(broker, tmp_path, crash=crash)
    assert federation.restarted == {crash[0]}, "the crash point was never reached"
    assert final_digests(record) == final_digests(baseline)
    assert not record.mismatches


def test_coded_cycles_keep_the_shared_ranges_their_deltas_need(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Shared ranges are chunks no participant manifest names: GC must pin them at the
    hub (the open step's) and at participants (until the step's delta is sent)."""
    _, record, _ = run(broker, tmp_path, env=CODED)
    digests = final_digests(record)
    assert set(digests) == set(PARTICIPANTS)
    assert set(digests.values()) == {record.expected_models[STEPS + 1]}
    assert not record.mismatches

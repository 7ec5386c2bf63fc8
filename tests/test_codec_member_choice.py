"""Member codec choices in a whole federated run, every service a real process over the real
broker: the cycle allows two per-member specs besides its own (FOLDFED_CODEC_CHOICES), and
each participant's uploader picks by its own link (FOLDFED_UPLOAD_BUDGET_S and its measured
goodput, here written where the uploader keeps it, as a measured link would leave it): a
fast link sends the least lossy spec, a slow one the most compressing, one without a budget
the cycle's. The hub decodes each delta with the spec its manifest names; every party holds
the same θ at every step, and the hub's model is the one an independent computation gets
from the trainers' deltas, each member's own codec and error feedback, shared ranges from
the members that coded with the cycle's spec only, and the hub's downlink feedback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_codec_federation import CHUNK, DOWNLINK, UPLINK, _sent
from test_federation import STEPS, final_digests, run_federation

from foldfed.aggregation import dequantize_mean, quantize, weight_total
from foldfed.codecs import (
    CodecContext,
    Residual,
    block_stats,
    codec_from_spec,
    compensate,
    plan_chunks,
)
from foldfed.codedvector import ranges_for
from foldfed.deltafile import load_delta, write_delta
from foldfed.demo.cluster import LocalFederation
from foldfed.digests import file_digest
from foldfed.domain import Manifest
from foldfed.messages import decode
from foldfed.spool import Spool

from conftest import PARTICIPANTS, BrokerHandle

pytestmark = [pytest.mark.broker, pytest.mark.slow]

INT8 = "int8:v1;block=4096+zstd:v1;level=3"
ROT1 = "rotated:v1;bits=1;block=4096;mult=1.0;rounding=nearest;scale=block"
SEED = 11
HUB_ENV = {
    "FOLDFED_CODEC": UPLINK,
    "FOLDFED_CODEC_CHOICES": f"{ROT1},{INT8}",  # any order: each uploader orders them
    "FOLDFED_DOWNLINK_CODEC": DOWNLINK,
    "FOLDFED_CODEC_SEED": str(SEED),
}
FAST, SLOW, PLAIN = PARTICIPANTS[1], PARTICIPANTS[2], PARTICIPANTS[0]
# What each member's link and budget make it send (the CPU task's deltas are a few KB, too
# small to re-measure the link: the written goodput holds for the whole run).
EXPECTED = {PLAIN: UPLINK, FAST: INT8, SLOW: ROT1}
GOODPUT = {FAST: 1e9, SLOW: 1.0}  # bytes/s


@pytest.fixture(scope="module")
def chosen(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("choices")
    for participant, rate in GOODPUT.items():
        coding = workdir / "participants" / participant / "spool" / "coding"
        coding.mkdir(parents=True)
        (coding / "goodput.json").write_text(json.dumps({"bytes_per_s": rate, "uploads": 3}))
    budget = {p: {"FOLDFED_UPLOAD_BUDGET_S": "1"} for p in GOODPUT}
    return run_federation(broker, workdir, env=HUB_ENV, participant_env=budget)


def sent_manifest(federation: LocalFederation, participant: str, step: int) -> Manifest:
    path = federation.spool_of(participant) / "coding" / f"delta-{step:012d}.manifest"
    manifest = decode("foldfed.v1.DeltaManifest", path.read_bytes())
    assert isinstance(manifest, Manifest)
    return manifest


def test_each_member_sends_the_spec_its_link_allows(chosen) -> None:
    federation, _ = chosen
    for step in range(1, STEPS + 1):
        specs = {p: sent_manifest(federation, p, step).codec_spec for p in PARTICIPANTS}
        assert specs == EXPECTED, step
    log = (federation.logs / f"{SLOW}-uploader.log").read_text()
    assert "uplink codec chosen" in log and "no candidate fits" in log


def test_every_party_agrees_at_every_step(chosen) -> None:
    _, record = chosen
    assert not record.mismatches
    for step in range(2, STEPS + 2):
        reported = {p: r.model_digest for (s, p), r in record.reports.items() if s == step}
        assert set(reported) == set(PARTICIPANTS), step
        assert set(reported.values()) == {record.expected_models[step]}, step


def test_hub_model_is_the_independent_computation_with_each_members_codec(chosen) -> None:
    federation, record = chosen
    (digest,) = set(final_digests(record).values())
    assert digest == independent_model(federation)


def independent_model(federation: LocalFederation) -> bytes:
    theta = {k: v.numpy().copy() for k, v in load_delta(federation.initial_model).items()}
    shared, down = codec_from_spec(UPLINK), codec_from_spec(DOWNLINK)
    names: list[str] = []
    residuals: dict[str, Residual | None] = dict.fromkeys(PARTICIPANTS)
    hub: Residual | None = None
    previous: list = []
    for step in range(1, STEPS + 1):
        deltas, weights = {}, []
        for p in PARTICIPANTS:
            record = _sent(Spool(federation.spool_of(p)), step)
            tensors = load_delta(record.path)
            names = names or list(tensors)
            deltas[p] = np.concatenate([tensors[n].numpy().reshape(-1) for n in names])
            weights.append(record.weight)
        n = next(iter(deltas.values())).size
        ranges = ranges_for(shared, n, previous)
        total = np.zeros(n, dtype=np.int64)
        for p, weight in zip(PARTICIPANTS, weights, strict=True):
            codec = codec_from_spec(EXPECTED[p])
            mine = ranges if EXPECTED[p] == UPLINK else None
            ctx = CodecContext(1, step, p, "up", SEED, mine)
            out = compensate(deltas[p], residuals[p], codec, ctx, plan_chunks(codec, n, CHUNK))
            residuals[p] = out.residual
            total += quantize(out.decoded.astype(np.float64), weight)
        # Only members that coded with the cycle's (shared) spec report statistics.
        previous = [block_stats(deltas[p], shared.block) for p in PARTICIPANTS
                    if EXPECTED[p] == UPLINK]  # fmt: skip
        exact = dequantize_mean(total, weight_total(weights)).astype(np.float32)
        ctx = CodecContext(1, step, "hub", "down", SEED, None)
        out = compensate(exact, hub, down, ctx, plan_chunks(down, n, CHUNK))
        hub = out.residual
        at = 0
        for name in names:
            size = theta[name].size
            theta[name] = theta[name] + out.decoded[at : at + size].reshape(theta[name].shape)
            at += size
    path = federation.workdir / "independent.safetensors"
    write_delta(path, {k: torch.from_numpy(v) for k, v in theta.items()})
    return file_digest(path)

"""The whole federation over the real broker with the tiny OpenFold3 on the real sample:
3 companies, 2 global steps, every service a real process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from foldfed.deltafile import load_delta
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.demo.main import _watch
from foldfed.demo.observer import RunRecord
from foldfed.of3.backend import Of3Settings, write_initial_model
from foldfed.of3.testing import COMPANIES, prepared_sample
from foldfed.settings import env_for
from foldfed.spool import Spool

from conftest import PARTICIPANTS, BrokerHandle, reset_topology

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STEPS = 2
SEED = 7
# Every term OpenFold3's default loss weights switch on (bond is 0 outside fine-tuning 1).
ACTIVE = (
    "mse_loss",
    "smooth_lddt_loss",
    "distogram_loss",
    "plddt_loss",
    "pde_loss",
    "pae_loss",
    "experimentally_resolved_loss",
)
ENV = env_for(
    seed=SEED, model="openfold3-tiny", local_steps=3, grad_accum=2, of3_lr=1e-3, of3_warmup=0
)


@pytest.fixture(scope="module")
def of3_run(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory):
    sample = prepared_sample()
    workdir = tmp_path_factory.mktemp("of3-federation")
    asyncio.run(reset_topology(broker.admin_url))
    # Retention off: the check below reads every step's sent delta (docs/retention.md).
    env = {**ENV, **env_for(of3_sample=sample, retain_steps=0)}
    spec = FederationSpec(
        participants=PARTICIPANTS,
        steps=STEPS,
        workdir=workdir,
        common_env=env,
        # The sample names its sites company-a..c; the test broker's users are org-a..c.
        participant_env={
            p: env_for(of3_company=c) for p, c in zip(PARTICIPANTS, COMPANIES, strict=True)
        },
    )
    federation = LocalFederation(spec, broker=broker.broker, passwords=broker.passwords)
    federation.start_broker()
    write_initial_model(federation.initial_model, Of3Settings.from_env(env), SEED)
    record = RunRecord(spec.participants, spec.steps)
    try:
        asyncio.run(_watch(federation, record, timeout_s=900))
    finally:
        federation.stop()
    return federation, record


def _deltas(federation: LocalFederation, participant: str):
    return sorted(Spool(federation.spool_of(participant)).sent_deltas(), key=lambda r: r.step)


def test_every_company_ends_on_the_same_model(of3_run) -> None:
    _, record = of3_run
    final = {p: r.model_digest for (s, p), r in record.reports.items() if s == STEPS + 1}
    assert set(final) == set(PARTICIPANTS)
    assert len(set(final.values())) == 1, final
    assert set(final.values()) == {record.expected_models[STEPS + 1]}
    assert not record.mismatches


def test_training_loss_is_alive_in_every_term(of3_run) -> None:
    federation, _ = of3_run
    for participant in PARTICIPANTS:
        deltas = _deltas(federation, participant)
        assert [d.step for d in deltas] == list(range(1, STEPS + 1))
        for delta in deltas:
            assert delta.metrics["train_loss"] > 0
            for term in ACTIVE:
                assert delta.metrics[f"train_{term}"] > 0, (participant, delta.step, term)
            # Δ covers exactly the federated (trainable) tensors of θ_0.
            assert set(load_delta(delta.path)) == set(load_delta(federation.initial_model))


def test_held_out_loss_falls_and_only_aggregates_leave(of3_run) -> None:
    _, record = of3_run

    def mean_at(step: int, key: str) -> float:
        return float(np.mean([r.metrics[key] for (s, _), r in record.reports.items() if s == step]))

    first, last = mean_at(1, "eval_loss"), mean_at(STEPS + 1, "eval_loss")
    print(
        f"held-out loss, mean over companies: theta_1 {first:.4f} -> theta_{STEPS + 1} {last:.4f}"
    )
    assert last < first
    for (_, _), report in record.reports.items():
        assert report.metrics["eval_loss"] > 0
        for term in ACTIVE:
            assert report.metrics[f"eval_{term}"] > 0
        assert 0.0 <= report.metrics["eval_lddt_mean"] <= 1.0
        assert report.metrics["eval_ligand_rmsd_mean"] > 0
        # Means, counts and rates only: no key names a structure.
        assert all(
            k.startswith(("eval_", "theta0_eval_"))
            and k.endswith(("_loss", "_mean", "_count", "_success", "_rate"))
            for k in report.metrics
        ), sorted(report.metrics)
    # The federated evaluation (FOLDFED_EVAL_EVERY=10): release 1, which is θ₀, and the
    # final release are scored beside θ₀, with the PoseBusters-valid rate of their poses.
    for (step, _), report in record.reports.items():
        m = report.metrics
        assert ("theta0_eval_loss" in m) == (step in (1, STEPS + 1)), (step, sorted(m))
        if step == 1:
            assert m["eval_loss"] == m["theta0_eval_loss"]
        if step == STEPS + 1:
            assert 0.0 <= m["eval_pb_valid_rate"] <= 1.0

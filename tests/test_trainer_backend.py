"""The model-family boundary: the registry, the trainer's settings per family, and the `sim`
family the load tests run (its settings, θ_0, its timed and reproducible rounds)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from foldfed.deltafile import load_delta
from foldfed.digests import file_digest
from foldfed.errors import ConfigError
from foldfed.localround import TrainingInterrupted
from foldfed.settings import load
from foldfed.trainer.backends.sim import SIM_VAR, SimBackend, SimSettings
from foldfed.trainer.families import (
    FAMILIES,
    demo_families,
    load_family,
    trainer_settings_from_env,
)

BASE_ENV = {
    "FOLDFED_PARTICIPANT": "org-a",
    "FOLDFED_PARTICIPANTS": "org-a,org-b",
    "FOLDFED_INITIAL_MODEL": "/data/initial.safetensors",
}


def sim_env(compute: dict[int, float], elements: int = 64) -> dict[str, str]:
    sim = SimSettings(weight=250.0, elements=elements, compute_s=compute)
    return {**BASE_ENV, **sim.env()}


# --- the registry ----------------------------------------------------------------------------


def test_registry_names_every_family_and_the_demo_offers_all_but_sim() -> None:
    assert set(FAMILIES) == {"mlp", "openfold3-tiny", "openfold3-full", "sim"}
    assert demo_families() == ("mlp", "openfold3-tiny", "openfold3-full")


def test_an_unknown_family_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FOLDFED_MODEL='gpt'"):
        load_family("gpt")
    with pytest.raises(ConfigError, match="FOLDFED_MODEL"):
        trainer_settings_from_env({**BASE_ENV, "FOLDFED_MODEL": "gpt"})


def test_naming_the_families_imports_no_family() -> None:
    """`foldfed --help` lists the families without loading torch or openfold3."""
    code = (
        "import sys; import foldfed.trainer.families as b; b.demo_families(); "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert not [m for m in sys.modules if m.startswith('foldfed.trainer.backends')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_mlp_is_the_default_and_needs_no_settings_of_its_own() -> None:
    s = trainer_settings_from_env(BASE_ENV)
    assert (s.model, s.family_settings) == ("mlp", None)


# --- the sim family --------------------------------------------------------------------------


def test_sim_settings_round_trip_through_the_environment() -> None:
    s = trainer_settings_from_env(sim_env({1: 0.5, 2: 0.25}))
    assert s.model == "sim"
    assert s.family_settings == SimSettings(weight=250.0, elements=64, compute_s={1: 0.5, 2: 0.25})


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "is not set"),
        ("not json", SIM_VAR),
        ('{"weight": 1}', "elements"),
        ('{"weight": 0, "elements": 8}', "weight must be > 0"),
        ('{"weight": 1, "elements": 8, "compute_s": {"3": -1}}', r"steps \[3\] must be >= 0"),
    ],
)
def test_bad_sim_settings_name_the_variable(raw: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        trainer_settings_from_env({**BASE_ENV, "FOLDFED_MODEL": "sim", SIM_VAR: raw})


def sim_backend(tmp_path: Path, compute: dict[int, float]) -> SimBackend:
    env = sim_env(compute, elements=3000)
    initial = tmp_path / "theta0.safetensors"
    digest = load_family("sim").write_initial_model(initial, load(env), 5)
    assert digest == file_digest(initial)
    settings = trainer_settings_from_env({**env, "FOLDFED_INITIAL_MODEL": str(initial)})
    backend = load_family("sim").make_backend(settings)
    assert isinstance(backend, SimBackend)
    return backend


def test_sim_initial_model_has_the_scenario_size_and_is_seeded(tmp_path: Path) -> None:
    backend = sim_backend(tmp_path, {})
    theta = load_delta(tmp_path / "theta0.safetensors")
    assert sum(t.numel() for t in theta.values()) == 3000
    assert all(t.dtype == torch.float32 for t in theta.values())
    assert backend.evaluate(theta) == {}
    again = tmp_path / "again.safetensors"
    load_family("sim").write_initial_model(again, load(sim_env({}, elements=3000)), 5)
    assert again.read_bytes() == (tmp_path / "theta0.safetensors").read_bytes()


def test_sim_round_takes_its_compute_time_and_repeats_bit_for_bit(tmp_path: Path) -> None:
    backend = sim_backend(tmp_path, {1: 0.2, 2: 0.0})
    theta = load_delta(tmp_path / "theta0.safetensors")
    started = time.monotonic()
    first = backend.train(theta, 1, lambda: False)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.5
    assert first.weight == 250.0
    assert first.metrics["planned_compute_s"] == 0.2
    assert first.metrics["compute_s"] >= 0.2
    assert set(first.delta) == set(theta)
    assert all(first.delta[n].shape == theta[n].shape for n in theta)
    again = backend.train(theta, 1, lambda: False)
    assert all(torch.equal(first.delta[n], again.delta[n]) for n in theta)
    other = backend.train(theta, 2, lambda: False)
    assert not torch.equal(first.delta["body.weight"], other.delta["body.weight"])


def test_sim_round_stops_when_asked_and_refuses_an_unknown_step(tmp_path: Path) -> None:
    backend = sim_backend(tmp_path, {1: 30.0})
    theta = load_delta(tmp_path / "theta0.safetensors")
    started = time.monotonic()
    with pytest.raises(TrainingInterrupted):
        backend.train(theta, 1, lambda: time.monotonic() - started > 0.05)
    assert time.monotonic() - started < 1.0
    with pytest.raises(ConfigError, match="no compute time for step 7"):
        backend.train(theta, 7, lambda: False)


def test_an_openfold3_family_without_the_of3_extra_says_how_to_install_it() -> None:
    """`make demo` installs the project alone; asking for OpenFold3 then names the extra."""
    code = (
        "import sys\n"
        "class Absent:\n"  # as if the of3 extra were not installed
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'openfold3':\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from foldfed.errors import ConfigError\n"
        "from foldfed.trainer.families import load_family\n"
        "try:\n"
        "    load_family('openfold3-tiny')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True
    ).stdout
    assert "FOLDFED_MODEL=openfold3-tiny needs OpenFold3" in out and "of3" in out

"""The registry of model families: which exist, and how one is loaded.

`mlp` (the demo's small CPU task), `openfold3-tiny` and `openfold3-full` (OpenFold3, the
`of3` extra), and `sim` (the load tests' trainer: waits the scenario's compute time, then
writes a delta of the scenario's size).

Each family's module is imported inside its loader, on first use, so a process imports
torch or openfold3 only for the family it runs. The imports are still written out (not
looked up by string with importlib), so import-linter sees every edge from here to the
families and the layer and cycle contracts cover them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from foldfed.errors import ConfigError
from foldfed.settings import load
from foldfed.trainer.backend import MODEL_VAR, Backend, Family, TrainerSettings


def _mlp(name: str) -> Family:
    from foldfed.trainer.backends import mlp

    return mlp.family(name)


def _openfold3(name: str) -> Family:
    # `make demo` installs the project alone; OpenFold3 (~1.9 GB) is an extra. Its modules
    # load late (inside the backend), so ask now, before anything starts.
    try:
        installed = importlib.util.find_spec("openfold3") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise ConfigError(
            f"{MODEL_VAR}={name} needs OpenFold3, the project's `of3` extra: "
            "`make demo-of3`, or `pip install -e '.[of3]'` next to torch==2.13.0"
        )
    from foldfed.trainer.backends import openfold3

    return openfold3.family(name)


def _sim(name: str) -> Family:
    from foldfed.trainer.backends import sim

    return sim.family(name)


@dataclass(frozen=True)
class FamilyEntry:
    """A family as the registry lists it: no import needed to name or describe it."""

    name: str
    load: Callable[[str], Family]  # builds the family; imports its module on first use
    summary: str
    in_demo: bool = True  # offered by `foldfed demo --model`


FAMILIES: dict[str, FamilyEntry] = {
    e.name: e
    for e in (
        FamilyEntry("mlp", _mlp, "the small CPU task of the demo"),
        FamilyEntry("openfold3-tiny", _openfold3, "OpenFold3, ~1 M parameters"),
        FamilyEntry("openfold3-full", _openfold3, "OpenFold3, 368 M parameters"),
        FamilyEntry(
            "sim",
            _sim,
            "load tests: waits the scenario's compute time, writes a delta of its size",
            in_demo=False,
        ),
    )
}


def demo_families() -> tuple[str, ...]:
    return tuple(name for name, entry in FAMILIES.items() if entry.in_demo)


def load_family(name: str) -> Family:
    """The family called `name`; ConfigError naming FOLDFED_MODEL for an unknown one."""
    entry = FAMILIES.get(name)
    if entry is None:
        raise ConfigError(f"{MODEL_VAR}={name!r}: expected one of {', '.join(FAMILIES)}")
    return entry.load(name)


def make_backend(settings: TrainerSettings) -> Backend:
    """The backend of the family `settings.model` names."""
    return load_family(settings.model).make_backend(settings)


def trainer_settings_from_env(env: Mapping[str, str] = os.environ) -> TrainerSettings:
    """The trainer's settings, with the settings of the family FOLDFED_MODEL names
    (validated by the family; ConfigError naming the variable)."""
    s = load(env)
    common = TrainerSettings.common_from_settings(s)
    family = load_family(s.model)
    return dataclasses.replace(common, family_settings=family.settings_from(s))

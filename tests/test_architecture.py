"""The architecture of docs/architecture.md holds: the import-linter contracts in
pyproject.toml pass, they do catch a violation, and the hub's real processes never load
torch."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from foldfed.format import TensorSpec, encode_header
from foldfed.settings import env_for

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path, services: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on `project`'s pyproject.toml, analysing the foldfed in `services`."""
    env = {**os.environ, "PYTHONPATH": f"{services}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(project / "pyproject.toml")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(ROOT, SERVICES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # The contracts that docs/architecture.md promises, by name.
    for promise in ("Layers", "pure core", "barrier package", "never imports torch", "cycles"):
        assert promise in result.stdout


# Each violation the contracts exist for, planted in a copy of the package.
VIOLATIONS = {
    "the hub imports torch": ("aggregator/sink.py", "import torch\n", "never imports torch"),
    "the pure core opens a database": (
        "barrier/machine.py",
        "import sqlite3\n",
        "barrier.machine is not allowed to import sqlite3",
    ),
    "a leaf reaches up, inside a function": (
        "digests.py",
        "def _late():\n    from foldfed import bus\n",
        "foldfed.digests -> foldfed.bus",
    ),
    "two siblings import each other": (
        "topology.py",
        "def _late():\n    import foldfed.config\n",
        "No cycles are allowed in foldfed",
    ),
}


@pytest.mark.parametrize(("relpath", "code", "reported"), VIOLATIONS.values(), ids=VIOLATIONS)
def test_the_contracts_catch_a_violation(
    tmp_path: Path, relpath: str, code: str, reported: str
) -> None:
    services = tmp_path / "services"
    shutil.copytree(SERVICES / "foldfed", services / "foldfed")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = services / "foldfed" / relpath
    planted.write_text(planted.read_text() + "\n" + code)
    result = lint_imports(tmp_path, services)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert reported in " ".join(result.stdout.split()), result.stdout


# ------------------------------------------------------------------- hub processes, live

# Runs a hub command of the real CLI with an import hook that kills the process the
# moment anything imports torch (or safetensors), at module level or inside a function.
_GUARDED_RUN = textwrap.dedent(
    """
    import importlib.abc, os, sys, traceback

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "safetensors"):
                traceback.print_stack()
                print(f"HUB IMPORTED {name}", file=sys.stderr, flush=True)
                os._exit(97)
            return None

    sys.meta_path.insert(0, NoTorch())
    from foldfed.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _initial_model(path: Path) -> Path:
    # Written without torch: the canonical header and zero tensor bytes.
    specs = [TensorSpec("w", "F32", (4, 2)), TensorSpec("b", "F32", (2,))]
    path.write_bytes(encode_header(specs) + bytes(sum(s.nbytes for s in specs)))
    return path


@pytest.mark.parametrize("command", ["aggregator", "barrier", "ingest", "monitor"])
def test_a_hub_process_runs_to_the_broker_without_importing_torch(
    tmp_path: Path, command: str
) -> None:
    """The real entry point runs settings, state and stores, and stops only at the broker,
    which is unreachable on purpose (port 1): everything the service imports is loaded."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{SERVICES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **env_for(
            amqp_url="amqp://guest:guest@127.0.0.1:1/",
            participants=("org-a", "org-b"),
            state_dir=tmp_path / "hub",
            initial_model=_initial_model(tmp_path / "model.safetensors"),
            monitor_port=0,
        ),
    }
    env.pop("FOLDFED_HEALTH_PORT", None)
    result = subprocess.run(
        [sys.executable, "-c", _GUARDED_RUN, command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert "HUB IMPORTED" not in output, output
    assert result.returncode == 2, output
    assert "cannot connect to the broker" in output, output


MAX_LINES_WITHOUT_A_STATED_CONCEPT = 400


def test_a_module_over_400_lines_names_its_one_concept() -> None:
    """Issue 11: a long module must be one concept and say which in its docstring."""
    package = Path(__file__).resolve().parents[1] / "services" / "foldfed"
    unstated = []
    for path in sorted(package.rglob("*.py")):
        if "v1" in path.relative_to(package).parts:
            continue  # generated protobuf code
        source = path.read_text()
        if source.count("\n") <= MAX_LINES_WITHOUT_A_STATED_CONCEPT:
            continue
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if "one concept" not in docstring.lower():
            unstated.append(str(path.relative_to(package)))
    assert not unstated, f"over {MAX_LINES_WITHOUT_A_STATED_CONCEPT} lines, no concept: {unstated}"

"""README's variable table is the registry's: generated, and checked for drift."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from foldfed.errors import ConfigError
from foldfed.settings import readme

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_table_is_the_registrys() -> None:
    text = README.read_text()
    assert readme.with_table(text) == text, (
        "README's settings table drifts from services/foldfed/settings/registry.py: "
        "run python -m foldfed.settings --write README.md"
    )


def test_a_changed_doc_in_the_registry_is_caught() -> None:
    text = README.read_text()
    rows = list(readme.rows())
    rows[3] = dataclasses.replace(rows[3], doc=rows[3].doc + " (changed)")
    assert readme.with_table(text, rows) != text
    rows = list(readme.rows())
    rows[5] = dataclasses.replace(rows[5], default="`elsewhere`")
    assert readme.with_table(text, rows) != text


def test_every_variable_has_a_row() -> None:
    table = readme.markdown_table()
    for row in readme.rows():
        assert f"| `{row.variable}` | {', '.join(row.roles)} | {row.type} |" in table
    text = README.read_text()
    assert "`FOLDFED_MONITOR_WINDOW` | monitor | integer ≥ 1 | `5` |" in text
    assert "FOLDFED_MONITOR_STRAGGLER_WINDOW" not in text


def test_the_command_checks_and_rewrites_a_readme(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text("# x\n\n<!-- settings:begin -->\n| old |\n<!-- settings:end -->\ntail\n")
    cli = [sys.executable, "-m", "foldfed.settings"]
    check = subprocess.run([*cli, "--check", str(stale)], capture_output=True, text=True)
    assert check.returncode == 1 and "drifts" in check.stdout
    subprocess.run([*cli, "--write", str(stale)], check=True)
    fresh = stale.read_text()
    assert fresh.startswith("# x\n\n<!-- settings:begin -->\n| variable |")
    assert fresh.endswith("<!-- settings:end -->\ntail\n") and "| old |" not in fresh
    assert subprocess.run([*cli, "--check", str(stale)]).returncode == 0


def test_a_readme_needs_exactly_one_region() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        readme.with_table("no markers here")

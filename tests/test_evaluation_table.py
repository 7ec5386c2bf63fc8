"""The federated evaluation table at the hub: built from model reports alone (pure), per
company and as the consortium mean, and `foldfed eval table` over a monitor store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foldfed.cli import main
from foldfed.domain import Event, ModelReport
from foldfed.evaluation.table import Report, build_table, is_evaluation, render_text
from foldfed.messages import encode
from foldfed.monitor.store import MonitorStore


def _metrics(loss: float, lddt: float, theta0: tuple[float, float], **extra: float) -> dict:
    return {
        "eval_loss": loss,
        "eval_lddt_mean": lddt,
        "eval_lddt_count": 2.0,
        "eval_ligand_rmsd_success": 0.5,
        "eval_pb_valid_rate": 0.0,
        "theta0_eval_loss": theta0[0],
        "theta0_eval_lddt_mean": theta0[1],
        "theta0_eval_ligand_rmsd_success": 0.0,
        "theta0_eval_pb_valid_rate": 0.0,
        "compute_s": 1.0,
        **extra,
    }


REPORTS = [
    Report(1, "company-a", _metrics(10.0, 0.10, (10.0, 0.10))),
    Report(1, "company-b", _metrics(12.0, 0.20, (12.0, 0.20))),
    Report(2, "company-a", {"eval_loss": 9.9, "train_loss": 3.0}),  # not evaluated: no θ₀
    Report(3, "company-a", _metrics(8.0, 0.30, (10.0, 0.10), local_eval_loss=9.0)),
    Report(3, "company-b", _metrics(11.0, 0.40, (12.0, 0.20))),
    Report(4, "company-a", _metrics(7.0, 0.35, (10.0, 0.10))),  # company-b's is missing
]


def test_rows_are_the_reports_that_carry_a_theta0_baseline() -> None:
    table = build_table(REPORTS)
    assert list(table.companies) == ["company-a", "company-b"]
    assert [r.step for r in table.companies["company-a"]] == [1, 3, 4]
    assert [r.step for r in table.companies["company-b"]] == [1, 3]
    assert table.steps == (1, 3, 4)
    assert table.arms == ("release", "theta0", "local")
    assert not is_evaluation({"eval_loss": 1.0})
    a3 = table.companies["company-a"][1]
    assert a3.get("release", "loss") == 8.0
    assert a3.get("theta0", "loss") == 10.0
    assert a3.get("local", "loss") == 9.0
    assert a3.delta("loss") == pytest.approx(-2.0)
    assert a3.delta("lddt_mean") == pytest.approx(0.2)
    assert a3.heldout == 2.0


def test_the_consortium_mean_counts_each_company_once_and_says_when_one_is_missing() -> None:
    table = build_table(REPORTS)
    by_step = {r.step: r for r in table.mean}
    assert by_step[3].get("release", "loss") == pytest.approx(9.5)
    assert by_step[3].get("theta0", "lddt_mean") == pytest.approx(0.15)
    assert by_step[3].companies == 2
    assert by_step[4].companies == 1
    text = render_text(table)
    assert "consortium mean of 2 companies" in text
    assert "(1/2)" in text  # release 4: only company-a evaluated it


def test_a_repeated_report_keeps_the_last_and_release_one_equals_theta0() -> None:
    again = [*REPORTS, Report(3, "company-b", _metrics(10.0, 0.45, (12.0, 0.20)))]
    table = build_table(again)
    assert table.companies["company-b"][1].get("release", "loss") == 10.0
    first = table.companies["company-a"][0]
    assert first.delta("loss") == 0.0 and first.delta("lddt_mean") == 0.0


def test_the_text_shows_every_metric_and_company() -> None:
    text = render_text(build_table(REPORTS))
    for word in ("company-a", "company-b", "OF3 loss", "LDDT", "RMSD<2Å", "PB-valid", "θ₀"):
        assert word in text
    assert "held-out structures: 2" in text
    assert "-2.000" in text  # company-a's loss at release 3, against θ₀
    assert render_text(build_table([])).startswith("federated evaluation: no evaluated")


def _store(folder: Path) -> Path:
    store = MonitorStore(folder / "hub" / "monitor.sqlite3")
    messages = [
        ModelReport(r.step, r.company, b"\x01" * 32, dict(r.metrics), unix_ms=1) for r in REPORTS
    ]
    messages.append(Event("step_released", "barrier", "", 1, unix_ms=1))
    for i, msg in enumerate(messages):
        store.add_message(f"m{i}", 1, *encode(msg))
    store.close()
    return folder


def test_eval_table_reads_the_monitor_store(tmp_path: Path, capsys) -> None:
    folder = _store(tmp_path)
    png = tmp_path / "eval.png"
    assert main(["eval", "table", str(folder), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "company-b" in out and "consortium mean" in out
    assert png.stat().st_size > 1000
    assert main(["eval", "table", str(folder / "hub" / "monitor.sqlite3"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in data["consortium_mean"]] == [1, 3, 4]
    assert data["companies"]["company-a"][1]["local_loss"] == 9.0


def test_eval_table_says_when_there_is_nothing(tmp_path: Path, capsys) -> None:
    assert main(["eval", "table", str(tmp_path)]) == 2  # no store at all
    assert "holds no monitor store" in capsys.readouterr().err


def test_eval_table_joins_an_eval_command_registered_before_it() -> None:
    """`foldfed eval --model CKPT --data DIR` (scoring a file) may own `eval`: argparse
    refuses a second parser of that name, so `table` becomes its subcommand instead."""
    import argparse

    from foldfed.evaluation.commands import cmd_eval_table, register

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    scoring = sub.add_parser("eval")
    scoring.add_argument("--model")
    scoring.add_argument("--data")
    scoring.set_defaults(func="score")
    register(sub)
    assert parser.parse_args(["eval", "--model", "m", "--data", "d"]).func == "score"
    assert parser.parse_args(["eval", "table", "var/demo"]).func is cmd_eval_table


def test_both_eval_commands_parse_on_the_real_command_line() -> None:
    """`foldfed eval --model --data` (of3/eval_commands.py) owns the `eval` parser and
    `foldfed eval table` joins it: each parses without the other's arguments."""
    import pytest

    from foldfed.cli import build_parser
    from foldfed.evaluation.commands import cmd_eval_table
    from foldfed.of3.eval_commands import cmd_eval

    parser = build_parser()
    table = parser.parse_args(["eval", "table", "somewhere", "--json"])
    assert table.func is cmd_eval_table and table.source == "somewhere" and table.json is True
    score = parser.parse_args(["eval", "--model", "m.safetensors", "--data", "d"])
    assert score.func is cmd_eval and (score.model, score.data) == ("m.safetensors", "d")
    with pytest.raises(SystemExit) as refused:
        cmd_eval(parser.parse_args(["eval", "--model", "m.safetensors"]))
    assert refused.value.code == 2

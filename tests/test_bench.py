"""The benchmarks' shared contract: each one's --help works and offers --quick, and the
RESULT line they end with is one parseable `RESULT key=value ...` line (bench/benchkit.py).

The benches themselves are measurements, not tests: they are not run here (`--quick` is
the smoke run, by hand)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
BENCHES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "benchkit")


@pytest.fixture
def benchkit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """bench/benchkit.py as the scripts import it, saving results under tmp_path."""
    monkeypatch.syspath_prepend(str(BENCH))
    import benchkit

    monkeypatch.setattr(benchkit, "RESULTS_DIR", tmp_path / "results")
    return benchkit


def test_every_bench_is_listed() -> None:
    assert BENCHES == [
        "aggregate",
        "codecs",
        "federation_payoff",
        "of3_step",
        "release_latency",
        "secagg",
        "tracing_overhead",
        "transfer",
    ]


def test_every_bench_help_works_and_documents_quick() -> None:
    # All at once: each pays its own imports (torch for some), and they are independent.
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / f"{name}.py"), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in BENCHES
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help:\n{out}"
        assert "--quick" in out, f"{name} --help does not offer --quick"


def test_benchkit_imports_only_the_standard_library() -> None:
    # transfer.py's bare roles import benchkit and must start like a minimal client.
    code = (
        "import sys; before = set(sys.modules); import benchkit; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('foldfed', 'torch'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_result_line_round_trips_through_the_parser(benchkit: Any) -> None:
    line = benchkit.result_line(
        {"ratio": 0.41234567, "median_ms": 5812.37, "hub_peak_bytes": 1 << 31, "ok": True}
    )
    assert line == "RESULT ratio=0.4123 median_ms=5812 hub_peak_bytes=2147483648 ok=yes"
    assert "\n" not in line
    fields = benchkit.parse_result_line(f"a table\nRESULT old=1\n{line}\n")
    assert fields == {
        "ratio": "0.4123",
        "median_ms": "5812",
        "hub_peak_bytes": "2147483648",
        "ok": "yes",
    }
    assert float(fields["ratio"]) == pytest.approx(0.41234567, rel=1e-3)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (0.0, "0"),
        (123456.7, "123457"),
        (2.5e-6, "2.500e-06"),
        (-0.57, "-0.57"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (7, "7"),
        (False, "no"),
        ("+0.57", "+0.57"),
        ("rot2z/rot1z", "rot2z/rot1z"),
    ],
)
def test_result_values_are_single_tokens_that_float_or_str_reads(
    benchkit: Any, value: object, text: str
) -> None:
    line = benchkit.result_line({"x": value})
    assert line == f"RESULT x={text}"
    if isinstance(value, float):
        parsed = float(benchkit.parse_result_line(line)["x"])
        assert parsed == pytest.approx(value, rel=1e-3, nan_ok=True)


@pytest.mark.parametrize(
    "fields",
    [{}, {"Ratio": 1.0}, {"peak rss": 1.0}, {"a-b": 1.0}, {"codec": "a b"}, {"codec": "a=b"}],
)
def test_result_line_rejects_what_would_not_parse(benchkit: Any, fields: dict) -> None:
    with pytest.raises(ValueError):
        benchkit.result_line(fields)


@pytest.mark.parametrize("output", ["no result here\n", "RESULT ratio\n", "RESULT =1\n"])
def test_parse_result_line_rejects_missing_or_malformed_lines(benchkit: Any, output: str) -> None:
    with pytest.raises(ValueError):
        benchkit.parse_result_line(output)


def _parser(benchkit: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    benchkit.add_quick_option(parser, {"size_mib": 16, "repeats": 1}, argv)
    return parser.parse_args(argv)


def test_quick_sets_small_defaults_and_explicit_options_win(benchkit: Any) -> None:
    full = _parser(benchkit, [])
    assert (full.quick, full.size_mib, full.repeats) == (False, 1024, 3)
    quick = _parser(benchkit, ["--quick"])
    assert (quick.quick, quick.size_mib, quick.repeats) == (True, 16, 1)
    mixed = _parser(benchkit, ["--size-mib", "64", "--quick"])
    assert (mixed.size_mib, mixed.repeats) == (64, 1)


def test_run_bench_ends_with_the_result_line_and_saves_it(
    benchkit: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def bench(_args: None) -> dict[str, Any]:
        return {"seconds": 2.0, "baseline_s": 1.0}

    code = benchkit.run_bench(
        None,
        bench,
        lambda r: f"table: {r['seconds']} s",
        "fake",
        result_fields=lambda r: {"ratio": r["seconds"] / r["baseline_s"], "peak_rss_mib": 12.5},
        interrupted="interrupted",
        failed="failed: ",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n").splitlines()[-1] == "RESULT ratio=2 peak_rss_mib=12.5"
    (saved,) = (benchkit.RESULTS_DIR).glob("fake-*.json")
    assert json.loads(saved.read_text())["result"] == {"ratio": 2.0, "peak_rss_mib": 12.5}


def test_aggregate_rss_multiple_is_peak_over_all_deltas(benchkit: Any) -> None:
    import aggregate  # bench/aggregate.py: standard library and benchkit at import time

    mib = 1 << 20
    result = {
        "size_mib": 100,
        "streaming": {"peak_bytes": 250 * mib, "delta_bytes": 500 * mib, "stream_s": 2.0},
        "naive": {"peak_bytes": 700 * mib, "average_s": 1.0},
    }
    fields = aggregate.result_fields(result)
    assert next(iter(fields)) == "rss_multiple"  # the key issue 13 names comes first
    assert fields["rss_multiple"] == pytest.approx(0.5)  # 250 MiB over N·S = 500 MiB
    assert fields["naive_rss_multiple"] == pytest.approx(1.4)
    assert fields["per_delta_multiple"] == pytest.approx(2.5)
    assert fields["speed_ratio"] == pytest.approx(0.5)
    assert fields["peak_rss_mib"] == pytest.approx(250)


def _payoff(benchkit: Any) -> Any:
    import federation_payoff  # bench/federation_payoff.py: torch only inside its functions

    return federation_payoff


def test_payoff_seeds_are_a_count_or_a_list(benchkit: Any) -> None:
    payoff = _payoff(benchkit)
    assert payoff.parse_seeds("5") == [0, 1, 2, 3, 4]
    assert payoff.parse_seeds("0,3,7") == [0, 3, 7]
    assert payoff.parse_seeds("7,") == [7]
    for bad in ("0", "1,1", ","):
        with pytest.raises(ValueError):
            payoff.parse_seeds(bad)


def test_payoff_mean_ci_is_the_t_interval(benchkit: Any) -> None:
    payoff = _payoff(benchkit)
    mean, half = payoff.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4) = 2.7764; sd = sqrt(2.5); n = 5
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    one = payoff.mean_ci([2.0])
    assert one[0] == 2.0 and math.isnan(one[1])
    assert math.isnan(payoff.seed_std([2.0]))


def _run(seed: int, losses: dict[str, float], lddt: float = 0.2) -> dict[str, Any]:
    arms = {a: {"eval_loss": v, "eval_lddt_mean": lddt} for a, v in losses.items()}
    curves = {a: [[0, 10.0], [4, v]] for a, v in losses.items() if a != "initial"}
    return {"seed": seed, "arms": arms, "curves": curves, "external": {}, "peak_rss_mib": 1.0}


def test_payoff_headline_best_alone_spread_and_goal(benchkit: Any) -> None:
    payoff = _payoff(benchkit)
    runs = [
        _run(0, {"initial": 10, "alone company-a": 8.0, "alone company-b": 7.0,
                 "federation": 6.0, "pooled": 5.9}),
        _run(1, {"initial": 10, "alone company-a": 8.2, "alone company-b": 7.2,
                 "federation": 6.2, "pooled": 6.0}),
    ]  # fmt: skip
    result = {"runs": runs, "stats": payoff.arm_stats(runs), "peak_rss_mib": 3.0}
    head = payoff.headline(result)
    assert head["best_alone"] == "alone company-b"
    assert head["best_alone_loss"] == pytest.approx(7.1)
    assert head["seed_spread"] == pytest.approx(statistics_stdev([7.0, 7.2]))
    assert head["fed_loss"] == pytest.approx(6.1) and head["pooled_loss"] == pytest.approx(5.95)
    assert head["goal"] == {
        "below_best_alone_by_2_spread": True,
        "within_5pct_of_pooled": True,
        "lddt_agrees": False,  # equal LDDT does not agree
    }
    fields = payoff.result_fields(result)
    assert list(fields) == [
        "fed_loss", "best_alone_loss", "pooled_loss", "seed_spread", "fed_lddt",
        "best_alone_lddt", "peak_rss_mib",
    ]  # fmt: skip
    curves = payoff.curve_stats(runs)
    assert curves["federation"][1][:2] == [4, pytest.approx(6.1)]
    assert payoff.paired(runs, "federation", "pooled", "eval_loss")[0] == pytest.approx(0.15)


def statistics_stdev(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values)


def test_payoff_report_and_pictures_from_saved_seeds(benchkit: Any, tmp_path: Path) -> None:
    """The end of a long study, without its training: render, the PNGs and the RESULT
    fields from seed results as run_seed saves them (JSON round trip, NaN included)."""
    payoff = _payoff(benchkit)
    runs = []
    for seed, shift in enumerate((0.0, 0.1, -0.05)):
        losses = {"initial": 10.0, "alone company-a": 8.0 + shift, "alone company-b": 7.5,
                  "federation": 7.0 - shift, "pooled": 6.8}  # fmt: skip
        run = _run(seed, losses)
        run["arms"]["federation"]["eval_ligand_rmsd_mean"] = 6.0
        run.update(heldout={"1abc": "company-a"}, cpu_seconds=10.0 + seed)
        run["external"] = {
            a: {"loss": v, "lddt_mean": math.nan, "scored": 1} for a, v in losses.items()
        }
        runs.append(json.loads(json.dumps(run)))
    result = {
        "runs": runs,
        "stats": payoff.arm_stats(runs),
        "curves": payoff.curve_stats(runs),
        "seeds": [0, 1, 2],
        "options": {
            "rounds": 2,
            "local_steps": 2,
            "grad_accum": 1,
            "pooled_g": 2,
            "lr": 1e-3,
            "server_opt": "fedavg",
        },
        "external_skipped": [],
        "seconds": 30.0,
        "peak_rss_mib": 5.0,
    }
    result["plots"] = [str(p) for p in payoff.plot(result, tmp_path)]
    assert all(Path(p).stat().st_size > 1000 for p in result["plots"])
    text = payoff.render(result)
    assert "best alone: alone company-b" in text and "federation - pooled" in text
    fields = payoff.result_fields(result)
    assert fields["ext_fed_loss"] == pytest.approx(7.0 - 0.05 / 3)
    assert fields["ext_best_alone_loss"] == pytest.approx(7.5)
    assert benchkit.parse_result_line(benchkit.result_line(fields))["fed_loss"]

"""Shared plumbing of the benchmarks: process status, signal handling, the RESULT line,
the `--quick` option, the OpenFold3 sample, result files.

The scripts run as `python bench/<name>.py`, which puts bench/ on sys.path, so they import
this module as `benchkit`. Standard library only at import time: the bare roles of
transfer.py import it too (load_of3_sample imports foldfed when it is called).

Every benchmark ends its output with one machine-readable line, after the human table:

    RESULT key=value key=value ...

keys are lower-case identifiers, values contain no space and no "=" (numbers as Python
prints them, nan when a figure could not be measured), so anyone can compare runs with
`parse_result_line` (or `grep ^RESULT` and a split) without parsing prose.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

A = TypeVar("A")
ResultValue = float | int | str | bool
_RESULT_KEY = re.compile(r"[a-z][a-z0-9_]*\Z")
_RESULT_DIGITS = 4  # significant digits of a float: run-to-run noise is larger


class BenchError(Exception):
    """A run failed; the message says where, with the log of the process at fault."""


def read_status_kib(pid: int | str, key: str) -> int:
    """A `kB` field of /proc/<pid>/status, pid "self" for this process (0 once the process
    is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_mib(pid: int | str = "self") -> float:
    """The kernel's peak RSS (VmHWM) of a process in MiB, pid "self" for this one."""
    return read_status_kib(pid, "VmHWM") / 1024


def clean_env(**defaults: str) -> dict[str, str]:
    """Our environment without FOLDFED_* settings, so a developer's shell cannot change what
    is measured (a window, a rate limit); `defaults` fill in variables the shell lacks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Let clean-up (bounded by its own timeouts) finish despite a second Ctrl-C."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so that clean-up runs."""
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # respect nohup and the like
            signal.signal(sig, _interrupt)


def code_version() -> str:
    """The commit measured, "+dirty" when services/ has uncommitted changes."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        dirty = "+dirty" if git("status", "--porcelain", "--", "services") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save(result: dict[str, Any], name: str) -> Path:
    """Write `result` to bench/results/<name>-<UTC timestamp>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _result_value(value: ResultValue) -> str:
    if isinstance(value, bool):  # before int: bool is one
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value == 0 or 1e-3 <= abs(value) < 10**_RESULT_DIGITS:
            return f"{value:.{_RESULT_DIGITS}g}"
        # Large figures (bytes, ms) whole; tiny ones in exponent form, float() reads both.
        return f"{value:.0f}" if abs(value) >= 1 else f"{value:.{_RESULT_DIGITS - 1}e}"
    if not value or any(c.isspace() or c == "=" for c in value):
        raise ValueError(f"RESULT value {value!r}: must be non-empty, no space, no '='")
    return value


def result_line(fields: Mapping[str, ResultValue]) -> str:
    """`RESULT key=value ...` in the order given; floats to 4 significant digits."""
    if not fields:
        raise ValueError("a RESULT line needs at least one field")
    for key in fields:
        if not _RESULT_KEY.match(key):
            raise ValueError(f"RESULT key {key!r}: lower-case letters, digits and _")
    return "RESULT " + " ".join(f"{k}={_result_value(v)}" for k, v in fields.items())


def parse_result_line(output: str) -> dict[str, str]:
    """The fields of the last RESULT line in a benchmark's output, as strings."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise ValueError("no RESULT line in the output")
    fields: dict[str, str] = {}
    for item in lines[-1].split()[1:]:
        key, sep, value = item.partition("=")
        if not sep or not _RESULT_KEY.match(key) or not value:
            raise ValueError(f"bad RESULT field {item!r}")
        fields[key] = value
    return fields


def add_quick_option(
    parser: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None
) -> None:
    """Add `--quick`, the smallest run that still prints every line (a smoke test, not a
    measurement): it sets `quick`'s option values as defaults, so options given explicitly
    still win. Call before parser.parse_args(argv)."""
    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run, not a measurement: {given or 'the defaults'} (explicit options win)",
    )
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--quick", action="store_true")
    if probe.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)


@dataclass(frozen=True)
class Of3Sample:
    """The real OpenFold3 sample as the OpenFold3 benches use it."""

    folder: Path
    companies: list[str]
    train: dict[str, list[Path]]  # company -> its training entries' feature files
    heldout: list[Any]  # every company's held-out SampleEntry (entry_id, company, features)


def load_of3_sample(folder: str = "", companies: str = "", split_by: str = "") -> Of3Sample:
    """The prepared sample at `folder` (default: the test sample, prepared if missing),
    restricted to the comma-separated `companies` (default all). Held-out entries are every
    company's, also those left out: the held-out set must not depend on the subset.
    `split_by` ("entries" or "clusters") reassigns the entries by that partition rule;
    "" keeps the sample's own."""
    from foldfed.errors import ConfigError
    from foldfed.of3.data.sample import open_sample
    from foldfed.of3.data.sample_split import repartition
    from foldfed.of3.testing import prepared_sample

    sample_dir = Path(folder) if folder else prepared_sample()
    sample = open_sample(sample_dir)
    if split_by:
        try:
            sample = repartition(sample, split_by)
        except ConfigError as exc:
            raise BenchError(f"--split-by {split_by!r}: {exc}") from None
    names = list(sample.companies)
    if companies:
        wanted = [c.strip() for c in companies.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown or not wanted:
            raise BenchError(
                f"--companies {companies!r}: unknown {unknown}; this sample has {', '.join(names)}"
            )
        names = wanted
    train = {c: [e.features for e in sample.of(c, "train")] for c in names}
    return Of3Sample(sample_dir, names, train, sample.heldout())


def run_bench(
    args: A,
    bench: Callable[[A], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    name: str,
    *,
    result_fields: Callable[[dict[str, Any]], Mapping[str, ResultValue]],
    interrupted: str,
    failed: str,
) -> int:
    """main()'s common part: run `bench` with signals turned into KeyboardInterrupt, print
    its table, save its result as `name` and end with its RESULT line (`result_fields`, also
    saved under "result"); the exit status (130 interrupted, 1 failed)."""
    interrupt_on_signals()
    try:
        result = bench(args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"{failed}{exc}", file=sys.stderr)
        return 1
    fields = result_fields(result)
    result["result"] = dict(fields)
    print()
    print(render(result))
    print(f"\nresults: {save(result, name)}")
    print(result_line(fields))
    return 0

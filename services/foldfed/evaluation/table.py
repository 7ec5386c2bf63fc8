"""The federated evaluation table: per company, each evaluated release beside its baselines
(θ₀ and, where the company has one, its local-only model), step by step, and the
consortium mean. Pure: model reports' metrics in, a table and its text out.

Where the numbers come from (docs/federated_evaluation.md): a company's trainer scores every
k-th release and the final one on its own held-out set and puts the aggregates in that
release's model report, `eval_<m>` for the release, `theta0_eval_<m>` and `local_eval_<m>`
for the baselines. A report is a row of the table when it carries a θ₀ baseline; the hub
stores every report (monitor store), so the table can be built at any time.

The consortium mean of a step is the plain mean over the companies that evaluated that
release: each company's benchmark counts once, whatever its size (a mean weighted by
held-out structures would let the largest company speak for the consortium). A step that
not every company evaluated says so (`companies` < the table's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A column group: the metric's key after the arm's prefix, and how to show it."""

    key: str
    label: str
    higher_is_better: bool
    percent: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("loss", "OF3 loss", higher_is_better=False),
    Metric("lddt_mean", "LDDT", higher_is_better=True),
    Metric("ligand_rmsd_success", "RMSD<2Å", higher_is_better=True, percent=True),
    Metric("pb_valid_rate", "PB-valid", higher_is_better=True, percent=True),
)
# Arm -> the prefix of its metrics in a model report, and its column label.
ARMS: dict[str, tuple[str, str]] = {
    "release": ("eval", "release"),
    "theta0": ("theta0_eval", "θ₀"),
    "local": ("local_eval", "local"),
}
BASELINE = "theta0"
HELDOUT_COUNT = "eval_lddt_count"  # structures the release was scored on


@dataclass(frozen=True)
class Report:
    """One model report as the hub stored it."""

    step: int
    company: str
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Row:
    """One release at one company (or the consortium): (arm, metric key) -> value."""

    step: int
    values: Mapping[tuple[str, str], float]
    companies: int = 1
    heldout: float | None = None

    def get(self, arm: str, metric: str) -> float | None:
        return self.values.get((arm, metric))

    def delta(self, metric: str) -> float | None:
        """release - θ₀ (None when either is missing)."""
        release, base = self.get("release", metric), self.get(BASELINE, metric)
        return None if release is None or base is None else release - base


@dataclass(frozen=True)
class EvalTable:
    companies: Mapping[str, tuple[Row, ...]]
    mean: tuple[Row, ...]
    arms: tuple[str, ...]  # the arms some company reported, in ARMS order

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(row.step for row in self.mean)


def is_evaluation(metrics: Mapping[str, float]) -> bool:
    """A report of an evaluated release: it carries the θ₀ baseline."""
    prefix = ARMS[BASELINE][0] + "_"
    return any(key.startswith(prefix) for key in metrics)


def row_of(step: int, metrics: Mapping[str, float]) -> Row:
    values = {}
    for arm, (prefix, _) in ARMS.items():
        for metric in METRICS:
            value = metrics.get(f"{prefix}_{metric.key}")
            if value is not None and math.isfinite(value):
                values[(arm, metric.key)] = float(value)
    return Row(step, values, heldout=metrics.get(HELDOUT_COUNT))


def build_table(reports: Iterable[Report]) -> EvalTable:
    """The table of every evaluated release; a repeated (step, company) keeps the last."""
    latest: dict[tuple[str, int], Report] = {}
    for report in reports:
        if is_evaluation(report.metrics):
            latest[(report.company, report.step)] = report
    companies: dict[str, list[Row]] = {}
    for (company, step), report in sorted(latest.items()):
        companies.setdefault(company, []).append(row_of(step, report.metrics))
    steps = sorted({step for _, step in latest})
    mean = tuple(
        _mean(step, [row for rows in companies.values() for row in rows if row.step == step])
        for step in steps
    )
    present = {arm for rows in companies.values() for r in rows for arm, _ in r.values}
    return EvalTable(
        companies={c: tuple(rows) for c, rows in sorted(companies.items())},
        mean=mean,
        arms=tuple(arm for arm in ARMS if arm in present),
    )


def _mean(step: int, rows: list[Row]) -> Row:
    keys = {key for row in rows for key in row.values}
    values = {}
    for key in sorted(keys):
        found = [row.values[key] for row in rows if key in row.values]
        values[key] = math.fsum(found) / len(found)
    return Row(step, values, companies=len(rows))


# ---------------------------------------------------------------------- text


def _cell(value: float | None, metric: Metric, signed: bool = False) -> str:
    if value is None:
        return "-"
    if metric.percent:
        return f"{100 * value:+.0f}pt" if signed else f"{100 * value:.0f}%"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _columns(arms: tuple[str, ...]) -> list[str]:
    return [ARMS[arm][1] for arm in arms] + ["Δ"]


def _lines(title: str, rows: tuple[Row, ...], arms: tuple[str, ...], total: int) -> list[str]:
    width = 7
    group = len(arms) + 1
    head = f"{'release':>8} |" + " |".join(f"{m.label:^{group * (width + 1) - 1}}" for m in METRICS)
    sub = f"{'':>8} |" + " |".join(
        " ".join(f"{c:>{width}}" for c in _columns(arms)) for _ in METRICS
    )
    lines = [title, head.rstrip(), sub]
    for row in rows:
        cells = []
        for m in METRICS:
            values = [_cell(row.get(arm, m.key), m) for arm in arms]
            values.append(_cell(row.delta(m.key), m, signed=True))
            cells.append(" ".join(f"{v:>{width}}" for v in values))
        partial = f" ({row.companies}/{total})" if row.companies < total else ""
        lines.append(f"{row.step:>8} |" + " |".join(cells) + partial)
    return lines


def render_text(table: EvalTable) -> str:
    """Per company, then the consortium mean; Δ = release - θ₀ (pt: percentage points)."""
    if not table.companies:
        return "federated evaluation: no evaluated release in these reports"
    n = len(table.companies)
    lines = [
        "federated evaluation: each company's held-out set, the release against θ₀"
        + (" and its local-only model" if "local" in table.arms else "")
        + " (Δ = release - θ₀; loss lower is better, the others higher)",
        "",
    ]
    for company, rows in table.companies.items():
        counts = sorted({int(r.heldout) for r in rows if r.heldout is not None})
        held = f"  (held-out structures: {', '.join(map(str, counts))})" if counts else ""
        lines += _lines(f"{company}{held}", rows, table.arms, total=1)
        lines.append("")
    lines += _lines(f"consortium mean of {n} companies", table.mean, table.arms, total=n)
    return "\n".join(lines)


def as_dict(table: EvalTable) -> dict[str, object]:
    """The table as JSON-ready data (`foldfed eval table --json`)."""

    def row(r: Row) -> dict[str, object]:
        out: dict[str, object] = {"step": r.step, "companies": r.companies}
        if r.heldout is not None:
            out["heldout"] = r.heldout
        for (arm, metric), value in sorted(r.values.items()):
            out[f"{arm}_{metric}"] = value
        return out

    return {
        "arms": list(table.arms),
        "companies": {c: [row(r) for r in rows] for c, rows in table.companies.items()},
        "consortium_mean": [row(r) for r in table.mean],
    }

"""The federated evaluation table as a picture: one panel per metric, release by release,
each company's release (solid) against its θ₀ (dashed) and local-only model (dotted), and
the consortium mean (black)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foldfed.evaluation.table import METRICS, EvalTable, Row

_STYLES = {"release": "-", "theta0": "--", "local": ":"}


def save_table_png(table: EvalTable, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, (company, rows) in enumerate(table.companies.items()):
            _lines(ax, rows, metric.key, table.arms, colours[i % len(colours)], company)
        _lines(ax, table.mean, metric.key, ("release", "theta0"), "black", "consortium mean")
        better = "higher" if metric.higher_is_better else "lower"
        ax.set(title=f"{metric.label} ({better} is better)", xlabel="release")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric.percent:
            ax.set_ylim(-0.05, 1.05)  # a rate: its whole range, so 0 % reads as 0 %
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle("federated evaluation: release (solid) vs θ₀ (dashed), local-only (dotted)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _lines(
    ax: Any, rows: tuple[Row, ...], metric: str, arms: tuple[str, ...], colour: str, name: str
) -> None:
    for arm in arms:
        points = [(r.step, r.get(arm, metric)) for r in rows]
        shown = [(s, v) for s, v in points if v is not None]
        if not shown:
            continue
        steps, values = zip(*shown, strict=True)
        label = name if arm == "release" else None
        ax.plot(steps, values, _STYLES[arm], color=colour, marker="o", ms=3, label=label)

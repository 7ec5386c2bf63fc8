"""The report's sections on what a run cost the machine: where a step's time went, what the
hub held in memory, the bytes on disk per step (with their picture), the independent sums
check, and the report's closing machine-readable line:

    RESULT mean_step_s=<s> hub_peak_bytes=<bytes> [wrong_sums=<n>]
           [disk_growth_after_warmup_bytes=<b> kept_records_bytes_per_step=<b>]  (one line)

mean_step_s: the mean, over the run's released steps, of the barrier's StepReleased(t) →
StepReleased(t+1) (the cycle's final release for the last step), hub clock, x S (S = 1 in
the scenarios these figures are for). hub_peak_bytes: the largest sum of the hub
processes' RSS at one sample (footprint.py).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from foldfed.loadtest.scenario import MIB
from foldfed.loadtest.timeline import StepPhases, step_phases
from foldfed.loadtest.verdicts import RunResult, disk_bound_bytes, wrong_sums


def mean_step_s(r: RunResult) -> float:
    return statistics.fmean(m.wall_s for m in r.steps) * r.scenario.time_scale if r.steps else 0.0


def result_line(r: RunResult) -> str:
    fields = {
        "mean_step_s": f"{mean_step_s(r):.3f}",
        "hub_peak_bytes": str(r.rss.total if r.rss else 0),
    }
    if r.scenario.expect.exact_sums:
        fields["wrong_sums"] = str(wrong_sums(r))
    if r.growth is not None:
        fields["disk_growth_after_warmup_bytes"] = str(r.growth.bulk)
        fields["kept_records_bytes_per_step"] = f"{r.growth.records_per_step:.0f}"
    return "RESULT " + " ".join(f"{k}={v}" for k, v in fields.items())


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def phases_section(r: RunResult) -> list[str]:
    if not r.steps:
        return []
    S = r.scenario.time_scale
    rows = [
        step_phases(m, r.opened_ms.get(m.step), r.spool_times.get((m.step, m.last)))
        for m in r.steps
    ]
    out = [
        "## Where a step's time goes (critical path: the last site to deliver)",
        "",
        "Each row adds up to the step's wall time, release to release (barrier records, hub "
        "clock). 'receive + apply + write' is the release → the site's delta handed to its "
        "uploader (the mtime of `outbox/delta-<t>.json`), minus compute: receiving the "
        "release and the previous update, applying it (θ_t built and committed), writing the "
        "delta. 'upload, pipeline' is the chunk pipeline (first chunk published → last "
        "confirmed); 'upload, rest' what else lies between the hand-off and the delivery "
        "recorded at the hub: the uploader's pick-up, the manifest and have round trip, and "
        "above all the hub's ingest draining the chunks the broker already confirmed (verify,"
        " store durably, add to the sum). 'hub' is the last delivery recorded → the next "
        "release (finalize's tail, commit, StepFinalized, release). With progressive finalize"
        " the update's chunks are broadcast while the deltas arrive; each site's receipt "
        "queues behind them on its one queue, so the last column (not in the sum) is the "
        "delivery at the hub → the receipt at the site (the `.sent` rename): what is left of "
        "the update's "
        f"download. Seconds x S (S = {S:g}).",
        "",
        "| step | last site | receive + apply + write | compute | upload, pipeline | "
        "upload, rest (pick-up, manifest, the hub's ingest behind the pipeline) | "
        "hub (finalize tail + release) | "
        "wall | receipt at the site after the hub's record |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, site: str, p: list[StepPhases]) -> str:
        def mean(key: str) -> str:
            values = [getattr(x, key) for x in p if getattr(x, key) is not None]
            return f"{statistics.fmean(values) * S:.2f} s" if values else "-"

        return (
            f"| {label} | {site} | {mean('before_upload_s')} | {mean('compute_s')} | "
            f"{mean('upload_send_s')} | {mean('upload_rest_s')} | {mean('hub_s')} | "
            f"{mean('wall_s')} | {mean('receipt_after_s')} |"
        )

    shown = rows if len(rows) <= 12 else rows[:5] + rows[-5:]
    out += [row(str(p.step), p.site, [p]) for p in shown]
    out.append(row("mean", "", rows))
    return [*out, ""]


def memory_section(r: RunResult) -> list[str]:
    if r.rss is None or not r.rss.samples:
        return []
    peak = r.rss
    s = r.scenario
    nxs = len(s.names) * s.delta_bytes_run
    parts = ", ".join(f"{n} {_gib(v)}" for n, v in sorted(peak.at_peak.items()))
    own = ", ".join(f"{n} {_gib(v)}" for n, v in sorted(peak.own_peaks.items()))
    return [
        "## What the hub held in memory",
        "",
        f"- peak of the hub's processes together (RabbitMQ's beam and helpers, aggregator, "
        f"barrier, monitor, each with its children; VmRSS summed at one sample, "
        f"{peak.samples} samples): **{_gib(peak.total)}** ({peak.total:,} bytes), "
        f"{peak.total / nxs:.2f} x N·S (N·S = {len(s.names)} x "
        f"{s.delta_bytes_run / MIB:,.1f} MiB run-size deltas)",
        f"- at that instant: {parts}",
        f"- each process's own peak: {own}",
        "",
    ]


def disk_section(r: RunResult, picture: Path | None) -> list[str]:
    if not r.disk:
        return []
    s = r.scenario
    peak = max(r.disk, key=lambda d: d.total)
    last = r.disk[-1]
    out = [
        "## Bytes on disk per step",
        "",
        f"Sampled every 0.2 s: the hub's state folder, every participant's spool together, "
        f"the broker's data folder apart (allocated blocks). Per step, the largest value "
        f"seen between its release and the next. Retention: FOLDFED_RETAIN_STEPS="
        f"{_or_default(s.retain_steps)}, FOLDFED_RETAIN_CHECKPOINT_EVERY="
        f"{_or_default(s.retain_checkpoint_every)} (docs/retention.md).",
        "",
        f"- largest step: {peak.step}: hub {_gib(peak.hub)}, participants "
        f"{_gib(peak.participants)} ({peak.participants / max(1, len(s.names)):,.0f} bytes "
        f"per participant), broker {_gib(peak.broker)}",
        f"- last step: {last.step}: hub {last.hub:,} bytes ({last.hub / s.delta_bytes_run:.1f} "
        f"S), participants {last.participants:,} bytes "
        f"({last.participants / len(s.names) / s.delta_bytes_run:.1f} S each), broker "
        f"{last.broker:,} bytes; S = one delta, {s.delta_bytes_run:,} bytes",
    ]
    if r.growth is not None:
        g = r.growth
        out.append(
            f"- growth after {g.warmup} warm-up steps (median of the last {g.window} steps' "
            f"peaks minus the median of the {g.window} right after warm-up), without the "
            f"records kept for ever: {g.bulk:+,} bytes; trend {g.slope_per_step:+,.0f} bytes "
            f"per step; bound {disk_bound_bytes(s, g):,} (one delta, and one model per "
            "checkpoint the policy keeps between the two windows)"
        )
        out.append(
            f"- the records kept for ever (manifests, signed step records, the SQLite logs, "
            f"each participant's sent and release records; allocated blocks, so a small file "
            f"counts 4 KiB): {g.records_per_step:,.0f} bytes per step, hub and "
            f"{len(s.names)} participants together; everything together grew {g.total:+,} "
            f"bytes (hub {g.hub:+,}, participants {g.participants:+,})"
        )
    if picture is not None:
        out += ["", f"![{picture.stem}]({picture.name})"]
    return [*out, ""]


def _or_default(value: int | None) -> str:
    return "(default)" if value is None else str(value)


def sums_section(r: RunResult) -> list[str]:
    if r.sums is None:
        return []
    out = [
        "## The hub's sums, checked independently",
        "",
        "Each step's update (`hub/updates/update-<t>.safetensors`) against the weighted mean "
        "of the deltas the participants wrote (`outbox/delta-<t>.safetensors`), computed with "
        "numpy in float64 from the files' bytes (loadtest/sums.py). Tolerance per element: "
        "P x 2^-24 / (2 W) (the fixed-point grid) + half a float32 ulp of the mean.",
        "",
        "| step | elements | beyond tolerance | worst abs(update - mean) / tolerance | verdict |",
        "|---|---|---|---|---|",
    ]
    for x in r.sums:
        out.append(
            f"| {x.step} | {x.elements:,} | {x.wrong_elements:,} | {x.worst_ratio:.3f} | "
            f"{x.missing or ('wrong' if x.wrong else 'ok')} |"
        )
    return [*out, "", f"wrong_sums = {wrong_sums(r)}", ""]


def save_disk(r: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [d.step for d in r.disk]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(steps, [d.hub / MIB for d in r.disk], label="hub (state folder)")
    ax.plot(steps, [d.participants / MIB for d in r.disk], label="participants (spools, all)")
    ax.plot(steps, [d.total / MIB for d in r.disk], label="hub + participants", color="black")
    ax.plot(
        steps,
        [d.bulk / MIB for d in r.disk],
        label="hub + participants, without the records kept for ever",
        color="black",
        linestyle="--",
    )
    ax.plot(steps, [d.broker / MIB for d in r.disk], label="broker (data folder)", linestyle=":")
    if r.growth is not None:
        ax.axvline(r.growth.warmup + 0.5, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("global step")
    ax.set_ylabel("MiB on disk (peak during the step)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{r.scenario.name}: bytes on disk per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def footprint_markdown(r: RunResult, folder: Path) -> str:
    """The sections above and the RESULT line, to append to the report (the disk picture is
    written into `folder`)."""
    picture = save_disk(r, folder / "disk.png") if r.disk else None
    lines = [
        "",
        *phases_section(r),
        *memory_section(r),
        *disk_section(r, picture),
        *sums_section(r),
        result_line(r),
    ]
    return "\n".join(lines) + "\n"

"""A run's report: markdown with measured vs predicted times (converted back to real time)
and two pictures: a per-step timeline per participant and the cumulative idle cost.

One concept, the report, in more than 400 lines: its sections (checks, codecs side by
side, wall time, participants, steps) and pictures render the same `RunResult`."""

from __future__ import annotations

import statistics
from pathlib import Path

from foldfed.loadtest.comm import PROJECTED_STEPS, codec_figures
from foldfed.loadtest.footprint_report import footprint_markdown
from foldfed.loadtest.predict import totals
from foldfed.loadtest.scenario import MIB, Compute, Scenario
from foldfed.loadtest.timeline import idle_totals, path_skew
from foldfed.loadtest.verdicts import (
    Check,
    RunResult,
    lead_over,
    monitor_idle,
    straggler_ci,
    straggler_idle,
)

TIMELINE_STEPS = 30


def _hms(seconds: float) -> str:
    seconds = float(seconds)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h >= 1:
        return f"{sign}{int(h)} h {int(m):02d} min"
    if m >= 1:
        return f"{sign}{int(m)} min {int(s):02d} s"
    return f"{sign}{seconds:.1f} s"


def _compute_text(c: Compute) -> str:
    base = {
        "fixed": f"{c.seconds:g} s",
        "normal": f"normal {c.seconds:g} ± {c.sd:g} s",
        "lognormal": f"lognormal, median {c.seconds:g} s, sigma {c.sigma:g}",
        "pareto": f"pareto, min {c.seconds:g} s, alpha {c.alpha:g}",
    }[c.dist]
    if c.pause_probability:
        base += f"; pause {c.pause_seconds:g} s with p={c.pause_probability:g}"
    return base


def _participants_table(s: Scenario) -> list[str]:
    lines = [
        "| participant | compute per step (real) | link | latency (RTT) |",
        "|---|---|---|---|",
    ]
    for p in s.participants:
        link = f"{p.bandwidth_mbps:g} Mb/s" if p.bandwidth_mbps else "unlimited"
        late = " (joins late)" if p.name in s.late_joiners else ""
        lines.append(
            f"| {p.name}{late} | {_compute_text(p.compute)} | {link} | {p.latency_ms:g} ms |"
        )
    return lines


def _verdict(check: Check, smoke: bool) -> str:
    v = check.verdict(smoke)
    return "PASS" if v == "ok" else v


def render_markdown(r: RunResult, pictures: list[Path]) -> str:
    s = r.scenario
    S = s.time_scale
    plans = totals(r.plans)
    measured_idle = idle_totals(r.steps)
    measured_wall = sum(m.wall_s for m in r.steps) * S
    predicted_wall = plans.wall_s + r.overhead_s * S * plans.steps
    out: list[str] = [
        f"# Load test: {s.name}",
        "",
        s.description.strip(),
        "",
        f"- time scale S = {s.time_scale:g}: every time below is REAL time (run seconds x "
        f"{s.time_scale:g}); the run itself took {r.wall_s:.1f} s.",
        f"- delta: {s.delta_mib:g} MiB real; the run sent {s.delta_bytes_run / MIB:.3f} MiB per "
        f"delta (÷ S) at each link's real bandwidth, so uploads take 1/S of real time on real "
        f"bytes (uploader token bucket, {s.chunk_mib} MiB chunks); the global update comes "
        f"back through the same link emulation (its chunks are kept at the link's rate).",
        "- latency is not emulated on the wire (loopback); the prediction adds two round trips "
        "per upload.",
        f"- steps: {s.steps}" + (f" + {s.next_cycle_steps} (cycle 2)" if s.late_joiners else ""),
        f"- seed {s.seed}; final model `{r.final_digest[:16]}`"
        + (f"; undisturbed run `{r.reference_digest[:16]}`" if r.reference_digest else ""),
        "",
        *_participants_table(s),
        "",
        "## Checks",
        "",
    ]
    for c in r.checks:
        out.append(f"- **{_verdict(c, s.smoke_run)}** {c.name}: {c.detail}")
    out += _codec_section(r)
    out += [
        "",
        "## Wall time, measured and predicted (real time)",
        "",
        "| | measured | predicted |",
        "|---|---|---|",
        f"| total wall time of {len(r.steps)} steps | {_hms(measured_wall)} | "
        f"{_hms(predicted_wall)} |",
        f"| mean wall time per step | {measured_wall / max(1, len(r.steps)):.1f} s | "
        f"{predicted_wall / max(1, plans.steps):.1f} s |",
    ]
    for name in sorted(set(measured_idle) | set(plans.idle_s)):
        out.append(
            f"| barrier idle charged to {name} | {_hms(measured_idle.get(name, 0) * S)} | "
            f"{_hms(plans.idle_s.get(name, 0.0))} |"
        )
    if s.expect.straggler:
        name = s.expect.straggler
        plan0 = r.plans[0] if r.plans else None
        others = [n for n in (plan0.done_s if plan0 else {}) if n != name]
        if plan0 and others:
            nxt = max(others, key=lambda n: plan0.done_s[n])
            mean, se = lead_over(r, name, nxt)
            out.append(
                f"| {name}'s lead over {nxt} (signed, mean per step +/- s.e.) | "
                f"{mean * S:.2f} +/- {se * S:.2f} s | "
                f"{statistics.fmean(p.done_s[name] - p.done_s[nxt] for p in r.plans):.2f} s |"
            )
            skew = path_skew(r.steps, name, nxt)
            out.append(
                f"| {name}'s delivery path (upload start → receipt, not compressed) minus "
                f"{nxt}'s, mean per step, run time | {skew.mean_s * 1000:+.1f} ms "
                f"({skew.mean_s * S:+.2f} s of the lead once x S); {name}'s upload began "
                f"before {nxt}'s delivery was recorded in {skew.queued} of {skew.steps} steps "
                f"| 0 |"
            )
            converted = sum(straggler_idle(r, name))
            out.append(
                f"| barrier idle charged to {name}, its delivery path's excess over the "
                f"next-to-last one's converted at 1x, not x S (the check's measure) | "
                f"{_hms(converted)} | {_hms(plans.idle_s.get(name, 0.0))} |"
            )
        out.append(
            f"| 95% confidence interval of {name}'s summed idle | "
            f"+/-{straggler_ci(r, name):.1%} | |"
        )
    if r.monitor is not None:
        for name, value in sorted(monitor_idle(r).items()):
            out.append(f"| idle charged to {name} by the monitor service | {_hms(value * S)} | |")
    hub = statistics.median([m.hub_s for m in r.steps]) if r.steps else 0.0
    out += [
        "",
        f"Prediction: per step max_i(c_i + u_i) from the scenario's seeded draws, plus the "
        f"services' overhead measured in this run: median {r.overhead_s * 1000:.0f} ms per step "
        f"in run time ({r.overhead_s * S:.1f} s real; of which the hub's finalize + release, "
        f"last delivery → next release, {hub * 1000:.0f} ms). Idle charged to a participant = "
        f"how long the barrier waited on it alone (its delivery minus the next-to-last one's), "
        f"i.e. the wall time the step would have saved had it been as fast as the "
        f"next-slowest. At this time scale the overhead is "
        f"{r.overhead_s * S / max(1e-9, predicted_wall / max(1, plans.steps)):.0%} of a step. "
        f"The services' overhead is not compressed: the wall times above multiply it by S "
        f"like everything else, while at real scale it stays about "
        f"{r.overhead_s:.2f} s per step, so a real run of these steps would take about "
        f"{_hms(measured_wall - r.overhead_s * (S - 1) * len(r.steps))}. Idle charged to a "
        f"site is a difference of two deliveries, so this overhead cancels out of it as long "
        f"as both deliveries take the same path time: if the straggler's upload starts while "
        f"the next-slowest's is still being processed, it queues or shares the CPUs, and the "
        f"compression multiplies that wait by S (the delivery-path row above says how much "
        f"of the lead that was).",
        "",
        "## Per participant (real time, mean per step)",
        "",
        "| participant | compute | upload | wait at barrier | bytes sent per step (run) |"
        " idle charged |",
        "|---|---|---|---|---|---|",
    ]
    for name in s.names:
        obs = [m.participants[name] for m in r.steps if name in m.participants]
        if not obs:
            out.append(f"| {name} | - | - | - | - | - |")
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append(
            f"| {name} | {mean([o.compute_s for o in obs]) * S:.1f} s | "
            f"{mean([o.upload_s for o in obs]) * S:.1f} s | "
            f"{mean([o.wait_s for o in obs]) * S:.1f} s | "
            f"{mean([o.bytes_sent for o in obs]) / MIB:.2f} MiB | "
            f"{_hms(measured_idle.get(name, 0.0) * S)} |"
        )
    if r.goodput is not None:
        g = r.goodput
        out += [
            "",
            f"Goodput of {s.expect.goodput_participant}: {g.bytes_sent / MIB:.1f} MiB in "
            f"{g.seconds:.2f} s of uploads = {g.bytes_per_s * 8 / 1e6:.2f} Mb/s on a "
            f"{g.rate_bps * 8 / 1e6:.2f} Mb/s link: {g.bytes_per_s / g.rate_bps:.1%} of the "
            f"rate, {g.link_share:.1%} of what the token bucket allowed (rate x time + one "
            f"chunk of burst per upload).",
        ]
    if r.notes:
        out += ["", "## Faults", ""] + [f"- {n}" for n in r.notes]
    if r.cycles:
        out += ["", "## Cycles", ""]
        for cycle, members in sorted(r.cycles.items()):
            steps = [m.step for m in r.steps if m.cycle == cycle]
            span = f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
            out.append(f"- cycle {cycle}: {span}, participants {', '.join(members)}")
    out += [
        "",
        "## Steps (real seconds after the step's release)",
        "",
        "| step | cycle | wall | last to deliver | its lead | " + " | ".join(s.names) + " |",
        "|---|---|---|---|---|" + "---|" * len(s.names),
    ]
    shown = r.steps if len(r.steps) <= 40 else r.steps[:20] + r.steps[-5:]
    for i, m in enumerate(shown):
        if len(r.steps) > 40 and i == 20:
            out.append(f"| … | | | | | {'| ' * len(s.names)}")
        arrive = " | ".join(f"{m.arrive_s[n] * S:.1f}" if n in m.arrive_s else "-" for n in s.names)
        out.append(
            f"| {m.step} | {m.cycle} | {m.wall_s * S:.1f} | {m.last} | "
            f"{m.idle_s[m.last] * S:.1f} | {arrive} |"
        )
    out += ["", "## Pictures", ""] + [f"![{p.stem}]({p.name})" for p in pictures]
    return "\n".join(out) + "\n"


def _codec_section(r: RunResult) -> list[str]:
    """The compared codecs side by side (real time and bytes), then which run the rest of
    the report shows."""
    if not r.codec_runs:
        return []
    S = r.scenario.time_scale
    figures = [codec_figures(run) for run in r.codec_runs]
    ref = figures[0].uplink_bytes
    out = [
        "",
        "## Codecs side by side (real time and bytes, per step)",
        "",
        "| codec (up / down) | uplink per site | vs first | downlink | wall, links on | "
        "wall, links off | links add (on - off, 95 %) | comm: links busy, slowest up + slowest "
        "down (judged) | compute (slowest site) | services' "
        "own (off - compute), run s / x S | comm predicted, sequential | comm predicted, "
        f"overlapped | {PROJECTED_STEPS} steps projected (measured) | final model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, f in zip(r.codec_runs, figures, strict=True):
        slow = max(f.compute_s, key=lambda n: f.compute_s[n])
        out.append(
            f"| {f.label} | {f.uplink_bytes / 1e6:,.1f} MB, {f.uplink_s[slow]:,.1f} s | "
            f"{ref / f.uplink_bytes:.1f}x | {f.downlink_bytes / 1e6:,.1f} MB, "
            f"{f.downlink_s[slow]:,.1f} s | {_hms(f.measured_wall_s)} | "
            f"{_hms(f.links_off_wall_s)} | {_hms(f.links_s)} +/- {_hms(f.links_ci_s)} | "
            f"{_hms(f.measured_comm_s)} | "
            f"{f.compute_s[slow]:,.0f} s ({slow}) | {f.services_run_s:,.2f} s / "
            f"{_hms(f.services_s)} | {_hms(f.sequential_comm_s)} | "
            f"{_hms(f.overlapped_comm_s)} | "
            f"{_hms(f.projected_wall_s * PROJECTED_STEPS)} | `{run.final_digest[:12]}` |"
        )
    out += [
        "",
        "| codec | "
        + " | ".join(
            f"{n}: release → delivery - compute; links busy up + down" for n in r.scenario.names
        )
        + " |",
        "|---|" + "---|" * len(r.scenario.names),
    ]
    for f in figures:
        out.append(
            f"| {f.label} | "
            + " | ".join(
                f"{f.site_comm_s.get(n, float('nan')):,.1f} s; "
                f"{f.link_up_s.get(n, 0.0):,.0f} + {f.link_down_s.get(n, 0.0):,.0f} s"
                for n in r.scenario.names
            )
            + " |"
        )
    n = figures[0].measured_steps if figures else 0
    out += [
        "",
        f"Each codec ran {r.scenario.steps} steps with the same seeds (same compute draws "
        f"and delta bytes) at S = {S:g}. Both directions of every site's link are emulated "
        "at its rate: the uploader's token bucket sends the deltas "
        "(FOLDFED_RATE_LIMIT_BPS), and the update's chunks are kept only once their last "
        "byte would have arrived (FOLDFED_DOWNLOAD_RATE_LIMIT_BPS, no burst). 'wall, links "
        f"on' is the mean step, release to release, over the {n} step(s) that began "
        "with a download (a cycle's first step has none), x S, plus the uploader's first "
        "chunk of burst (an emulation artifact: a real link carries those bytes too). "
        "'wall, links off' is the same codec and seeds on unlimited links (a second run), "
        "and 'links add' the difference, step by step, with its 95 % interval: the time "
        "the links add to a step, directly, but as noisy as two runs on a shared machine. "
        "'comm: links busy' is what the check judges: per step, the slowest site's upload "
        "plus the slowest site's download as the emulated links' token buckets held them "
        "(plus the burst), an upper bound of what the links can add (downloads that overlap "
        "uploads add less), immune to the machine's CPU load. The services' own time "
        "(ingest, finalize, release, hand-offs, the codecs' CPU: five sites' encode and "
        "decode sharing this machine's cores, where real sites each have their own) is in "
        "both runs and cancels; it is shown apart, in run seconds as spent here and x S, "
        "which over-states it at real scale for the per-step fixed costs (the codecs' CPU "
        "does grow with the delta). The per-site table gives release → that site's "
        "delivery at the hub, minus its compute (its download, upload and hand-offs; "
        "links on), and how long its links were busy per step, measured from the "
        "uploader's token buckets (up, plus the burst; down): a cross-check of 'links "
        "add', not the same figure (a link busy while another site computes costs the "
        "step nothing, and up and down may overlap). "
        "'comm predicted' comes from the step model "
        "(predict.transfer_step: measured uplink bytes and the update's wire size over "
        "the links, 1 MiB chunks), with downloads after the last delivery (sequential, "
        "today's hub) or as each chunk index is complete (overlapped, a progressive "
        "finalize); 'uplink' and 'downlink' show each direction's bytes over the slowest "
        "site's link. The projection multiplies the MEASURED wall time.",
        "",
        f"The sections below show the last codec's run ({r.codec_runs[-1].scenario.codec.label}); "
        "each codec's full report is in its own folder (`codec<i>/report.md`).",
    ]
    return out


def save_timeline(r: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r.scenario
    S = s.time_scale
    steps = r.steps[:TIMELINE_STEPS]
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(s.names) + 2))
    start = 0.0
    for m in steps:
        for row, name in enumerate(s.names):
            if name not in m.arrive_s:
                continue
            o = m.participants.get(name)
            arrive = m.arrive_s[name] * S
            compute = (o.compute_s if o else 0.0) * S
            upload = (o.upload_s if o else 0.0) * S
            y = len(s.names) - 1 - row
            ax.broken_barh([(start, compute)], (y - 0.35, 0.7), color="tab:blue")
            ax.broken_barh([(start + arrive - upload, upload)], (y - 0.35, 0.7), color="tab:orange")
            ax.broken_barh(
                [(start + arrive, m.wall_s * S - arrive)], (y - 0.35, 0.7), color="lightgrey"
            )
        start += m.wall_s * S
        ax.axvline(start, color="black", linewidth=0.3)
    ax.set_yticks(range(len(s.names)), list(reversed(s.names)))
    ax.set_xlabel(f"real seconds (run time x {S:g})")
    ax.set_title(
        f"{s.name}: first {len(steps)} steps — compute (blue), upload (orange), "
        "waiting for the barrier (grey)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_idle_cost(r: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r.scenario
    S = s.time_scale
    fig, ax = plt.subplots(figsize=(9, 5))
    plans = {p.step: p for p in r.plans}
    for i, name in enumerate(s.names):
        steps = [m.step for m in r.steps]
        measured, predicted = [], []
        acc_m = acc_p = 0.0
        for m in r.steps:
            acc_m += m.idle_s.get(name, 0.0) * S
            plan = plans.get(m.step)
            acc_p += plan.idle_s.get(name, 0.0) if plan else 0.0
            measured.append(acc_m / 3600)
            predicted.append(acc_p / 3600)
        if acc_m == 0 and acc_p == 0:
            continue
        color = f"C{i}"
        ax.plot(steps, measured, color=color, label=f"{name} measured")
        ax.plot(steps, predicted, color=color, linestyle="--", label=f"{name} predicted")
    ax.set_xlabel("global step")
    ax.set_ylabel("cumulative barrier idle charged (real hours)")
    ax.set_title(f"{s.name}: who the federation waits for")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(r: RunResult) -> Path:
    folder = r.workdir
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    if r.steps:
        pictures = [
            save_timeline(r, folder / "timeline.png"),
            save_idle_cost(r, folder / "idle-cost.png"),
        ]
    path = folder / "report.md"
    # The footprint sections end the report: its last line is the RESULT line.
    path.write_text(render_markdown(r, pictures) + footprint_markdown(r, folder))
    for run in r.codec_runs:
        write_report(run)
    return path


def write_index(results: list[RunResult], root: Path, total_s: float, failed: list[str]) -> Path:
    lines = [
        "# foldfed load tests",
        "",
        f"{len(results)} scenario(s) in {total_s:.0f} s of run time.",
        "",
        "| scenario | steps | time scale | run time | real wall time | checks | report |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        wall = sum(m.wall_s for m in r.steps) * r.scenario.time_scale
        passed = sum(c.ok for c in r.checks)
        rel = r.workdir.relative_to(root) if r.workdir.is_relative_to(root) else r.workdir
        lines.append(
            f"| {r.scenario.name} | {len(r.steps)} | {r.scenario.time_scale:g} | "
            f"{r.wall_s:.0f} s | {_hms(wall)} | {passed}/{len(r.checks)} | "
            f"[report]({rel}/report.md) |"
        )
    for name in failed:
        lines.append(f"| {name} | - | - | - | - | did not run to the end | - |")
    lines.append("")
    for r in results:
        for c in r.checks:
            lines.append(
                f"- {r.scenario.name}: **{_verdict(c, r.scenario.smoke_run)}** {c.name}: {c.detail}"
            )
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path

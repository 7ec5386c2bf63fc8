"""The monitor's snapshot as a person reads it: the HTML dashboard and `foldfed status`.

Pure: a snapshot (MonitorModel.snapshot, or /api/state's JSON) in, text out. The page is
self-contained (inline CSS and SVG, no script, no external resource) and reloads itself.
"""

from __future__ import annotations

from html import escape
from typing import Any

TIMELINE_STEPS = 8
PHASES = (("compute_s", "compute", "#4c78a8"), ("upload_s", "upload", "#f58518"))
WAIT_COLOUR = "#9d9d9d"


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def headline(snap: dict[str, Any]) -> str:
    cycle = snap["cycle"]
    if cycle["done"]:
        return f"cycle done: {cycle['steps']} steps (through step {cycle['last_step']})"
    step = snap["current_step"]
    if step is None:
        return "waiting for the first release"
    return f"step {step} of {cycle['first_step']}..{cycle['last_step']}"


def _to_come(snap: dict[str, Any]) -> str:
    open_ = snap["open"]
    if not open_ or open_["closed"]:
        return "0 B"
    text = _bytes(open_["bytes_to_come"])
    return text if open_["bytes_to_come_known"] else f"≥ {text}"


# ------------------------------------------------------------------------------ terminal


def status_text(snap: dict[str, Any]) -> str:
    """`foldfed status`: the dashboard's picture in plain text."""
    cycle = snap["cycle"]
    lines = [f"foldfed monitor: {headline(snap)}"]
    open_ = snap["open"]
    if open_ and not cycle["done"]:
        delivered = ", ".join(open_["delivered"]) or "nobody yet"
        waiting = ", ".join(open_["waiting"]) or "nobody (closing)"
        lines += [
            f"  delivered: {delivered}",
            f"  waiting for: {waiting}",
            f"  bytes still to come: {_to_come(snap)}",
            f"  step open for: {_s(open_['elapsed_s'])}",
        ]
    lines.append(
        f"  steps closed {cycle['closed']}/{cycle['steps']}, remaining {cycle['remaining']}; "
        f"median step {_s(snap['step_wall_s'])}; ETA to end of cycle: {_duration(snap['eta_s'])}"
    )
    lines += ["", "stragglers (idle = seconds the barrier waited for this participant alone):"]
    header = (
        f"  {'participant':<16} {'status':<10} {'slow in':>8} {'lag':>8} {'others':>8} "
        f"{'excess':>8} {'idle':>9} {'projected':>10} {'heartbeat':>10}"
    )
    lines.append(header)
    for row in snap["table"]:
        status = "STRAGGLER" if row["straggler"] else "ok"
        if row["silent"]:
            status = "SILENT" if status == "ok" else f"{status}+SILENT"
        age = row["heartbeat_age_s"]
        lines.append(
            f"  {row['participant']:<16} {status:<10} "
            f"{row['slow_in']:>3}/{row['considered']:<4} {_s(row['lag_s']):>8} "
            f"{_s(row['others_lag_s']):>8} {_s(row['excess_s']):>8} {_s(row['idle_s']):>9} "
            f"{_s(row['projected_idle_s']):>10} {('never' if age is None else _s(age)):>10}"
        )
    recent = [s for s in snap["steps"] if s["closed"]][-5:]
    if recent:
        lines += ["", "recent steps (compute / upload / wait per participant):"]
        for step in recent:
            cells = []
            for p in snap["participants"]:
                ph = step["participants"][p]
                cells.append(
                    f"{p} {_num(ph['compute_s'])}/{_num(ph['upload_s'])}/{_num(ph['wait_s'])}"
                )
            held = f", held by {step['holder']} {_s(step['held_s'])}" if step["holder"] else ""
            lines.append(f"  step {step['step']} ({_s(step['wall_s'])}{held}): " + "  ".join(cells))
    if snap["alerts"]:
        lines += ["", "alerts:"]
        lines += [f"  [{a['kind']}] step {a['step']}: {a['detail']}" for a in snap["alerts"]]
    for detail in snap["mismatches"]:
        lines.append(f"MODEL MISMATCH: {detail}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px}
.sub{color:#666;font-size:13px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin-top:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.bad{background:#fde2e1;color:#a40000;font-weight:bold}
.ok{color:#2a7d2a} .wait{color:#a05a00}
.alert{background:#fff4e5;border-left:4px solid #f58518;padding:4px 8px;margin:4px 0;font-size:13px}
"""


def html_page(snap: dict[str, Any], refresh_s: int = 5) -> str:
    """The dashboard: current step, who delivered, bytes to come, stragglers, timeline."""
    cycle = snap["cycle"]
    open_ = snap["open"] or {}
    delivered = open_.get("delivered", [])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        "<title>foldfed monitor</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1 id="headline">foldfed monitor: {escape(headline(snap))}</h1>',
        f"<div class=sub>{len(snap['participants'])} participants · steps closed "
        f"{cycle['closed']}/{cycle['steps']} · refreshes every {int(refresh_s)} s</div>",
        "<div class=cards>",
        _card("current step", "current-step", str(snap["current_step"] or "-")),
        _card("delivered", "delivered", f"{len(delivered)}/{len(snap['participants'])}"),
        _card("bytes still to come", "bytes-to-come", _to_come(snap)),
        _card("median step", "step-wall", _s(snap["step_wall_s"])),
        _card("ETA to end of cycle", "eta", _duration(snap["eta_s"])),
        "</div>",
        "<h2>This step</h2>",
        _delivery_table(snap),
        "<h2>Stragglers</h2>",
        _straggler_table(snap),
        "<h2>Timeline of recent steps</h2>",
        _timeline_svg(snap),
    ]
    if snap["alerts"]:
        parts.append("<h2>Alerts</h2>")
        parts += [
            f'<div class=alert data-kind="{escape(a["kind"])}">[{escape(a["kind"])}] step '
            f"{a['step']}: {escape(a['detail'])}</div>"
            for a in reversed(snap["alerts"])
        ]
    for detail in snap["mismatches"]:
        parts.append(f"<div class='alert bad'>MODEL MISMATCH: {escape(detail)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _card(label: str, ident: str, value: str) -> str:
    return f'<div class=card>{escape(label)}<b id="{ident}">{escape(value)}</b></div>'


def _delivery_table(snap: dict[str, Any]) -> str:
    open_ = snap["open"]
    if not open_:
        return "<p>No step released yet.</p>"
    rows = ['<table id="deliveries"><tr><th>participant</th><th>state</th><th>heartbeat</th></tr>']
    ages = {r["participant"]: r["heartbeat_age_s"] for r in snap["table"]}
    for p in snap["participants"]:
        if p in open_["delivered"]:
            state, cls = "delivered", "ok"
        elif p in open_["uploading"]:
            state, cls = "uploading", "wait"
        else:
            state, cls = "computing", "wait"
        age = ages.get(p)
        rows.append(
            f"<tr><td>{escape(p)}</td><td class={cls}>{state}</td>"
            f"<td>{'never' if age is None else _s(age)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _straggler_table(snap: dict[str, Any]) -> str:
    rule = snap["rule"]
    rows = [
        '<table id="stragglers"><tr><th>participant</th><th>status</th><th>slow in</th>'
        "<th>time to deliver</th><th>others</th><th>excess</th><th>barrier idle (held)</th>"
        "<th>others idle</th><th>projected idle, rest of cycle</th></tr>"
    ]
    for row in snap["table"]:
        status, cls = ("STRAGGLER", "bad") if row["straggler"] else ("ok", "ok")
        if row["silent"]:
            status, cls = (f"{status} · SILENT" if row["straggler"] else "SILENT"), "bad"
        rows.append(
            f'<tr data-participant="{escape(row["participant"])}">'
            f"<td>{escape(row['participant'])}</td><td class={cls}>{status}</td>"
            f"<td>{row['slow_in']}/{row['considered']}</td><td>{_s(row['lag_s'])}</td>"
            f"<td>{_s(row['others_lag_s'])}</td><td>{_s(row['excess_s'])}</td>"
            f"<td>{_s(row['idle_s'])}</td><td>{_s(row['idle_participant_s'])}</td>"
            f"<td>{_s(row['projected_idle_s'])}</td></tr>"
        )
    rows.append("</table>")
    rows.append(
        f"<div class=sub>straggler: slow in ≥ {rule['needed']} of the last {rule['window']} "
        f"steps (slower than the others' median by > {rule['margin']:.0%} and > "
        f"{rule['min_excess_s']:g} s); held = last delivery minus the one before it; silent: "
        f"no heartbeat for {rule['silent_after_s']:g} s</div>"
    )
    return "".join(rows)


def _timeline_svg(snap: dict[str, Any]) -> str:
    steps = snap["steps"][-TIMELINE_STEPS:]
    names = snap["participants"]
    if not steps:
        return "<p>No step yet.</p>"
    rows: list[tuple[str, dict[str, Any], bool]] = []
    for step in steps:
        for p in names:
            rows.append(
                (f"step {step['step']} · {p}", step["participants"][p], p == step["holder"])
            )
    totals = [
        sum(ph.get(k) or 0.0 for k in ("compute_s", "upload_s", "wait_s")) for _, ph, _ in rows
    ]
    scale_max = max([*totals, 1e-9])
    label_w, bar_w, row_h = 190, 760, 18
    height = row_h * len(rows) + 40
    out = [
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" '
        f'height="{height}" font-size="11" font-family="sans-serif">'
    ]
    for i, (label, ph, held) in enumerate(rows):
        y = 10 + i * row_h
        weight = "bold" if held else "normal"
        out.append(
            f'<text x="0" y="{y + 12}" font-weight="{weight}">{escape(label)}'
            f"{' (held)' if held else ''}</text>"
        )
        x = float(label_w)
        for key, name, colour in (*PHASES, ("wait_s", "wait", WAIT_COLOUR)):
            value = ph.get(key) or 0.0
            width = bar_w * value / scale_max
            if width > 0:
                out.append(
                    f'<rect x="{x:.1f}" y="{y + 2}" width="{width:.1f}" height="{row_h - 5}" '
                    f'fill="{colour}"><title>{name} {value:.2f} s</title></rect>'
                )
            x += width
        out.append(f'<text x="{x + 4:.1f}" y="{y + 12}">{_num(totals[i])} s</text>')
    legend_y = height - 12
    for j, (_, name, colour) in enumerate((*PHASES, ("wait_s", "wait", WAIT_COLOUR))):
        lx = label_w + j * 90
        out.append(f'<rect x="{lx}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{legend_y}">{name}</text>')
    out.append("</svg>")
    return "".join(out)

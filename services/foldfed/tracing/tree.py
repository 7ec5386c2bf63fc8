"""`foldfed trace STEP`: one global step's trace as an indented tree, from the JSON-lines
files the services write (tracing/files.py).

Pure: parsing lines, picking a step's trace, building and rendering the tree take and
return plain values; only `read_folder` touches the disk. No OpenTelemetry here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldfed.errors import FoldfedError

STEP_SPAN = "step"  # the barrier's root span of a step's trace
STEP_ATTR = "foldfed.step"
# Shown after the duration when a span has them.
SHOWN_ATTRIBUTES = ("bytes", "chunks", "chunks_sent", "skipped", "retries", "k", "final")


class NoTrace(FoldfedError):
    """The files hold no trace for the step asked for; the message says what they hold."""


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    service: str
    participant: str
    attributes: Mapping[str, Any]
    status: str = "UNSET"

    @property
    def step(self) -> int | None:
        value = self.attributes.get(STEP_ATTR)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def who(self) -> str:
        participant = self.attributes.get("foldfed.participant") or self.participant
        service = self.attributes.get("foldfed.service") or self.service
        return f"{service} {participant}" if participant else str(service)


def _hex(raw: Any, length: int, key: str) -> str:
    if not (isinstance(raw, str) and len(raw) == length and _is_hex(raw)):
        raise ValueError(f"{key} must be {length} hex digits, got {raw!r}")
    return raw


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _int(raw: Any, key: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise ValueError(f"{key} must be an integer, got {raw!r}")
    return raw


def parse_line(line: str) -> SpanRecord:
    """One line of a trace file; ValueError with the reason if it is not a span."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    parent = raw.get("parent_id")
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be an object")
    name = raw.get("name")
    if not isinstance(name, str):
        raise ValueError("name must be a string")
    return SpanRecord(
        trace_id=_hex(raw.get("trace_id"), 32, "trace_id"),
        span_id=_hex(raw.get("span_id"), 16, "span_id"),
        parent_id=None if parent is None else _hex(parent, 16, "parent_id"),
        name=name,
        start_ns=_int(raw.get("start_ns"), "start_ns"),
        end_ns=_int(raw.get("end_ns"), "end_ns"),
        service=str(raw.get("service") or ""),
        participant=str(raw.get("participant") or ""),
        attributes=attributes,
        status=str(raw.get("status") or "UNSET"),
    )


def parse_lines(lines: Iterable[str], source: str = "") -> tuple[list[SpanRecord], list[str]]:
    """Spans and a problem per bad line (a line cut short by a crash, say): skipped, told."""
    spans: list[SpanRecord] = []
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            spans.append(parse_line(line))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    return spans, problems


def read_folder(folder: Path) -> tuple[list[SpanRecord], list[str]]:
    """Every span of every *.jsonl file in `folder`."""
    if not folder.is_dir():
        raise NoTrace(f"no trace folder {folder} (FOLDFED_TRACE_DIR of the run, or --dir)")
    spans: list[SpanRecord] = []
    problems: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            got, bad = parse_lines(f, path.name)
        spans += got
        problems += bad
    return spans, problems


# ------------------------------------------------------------------------------- one step


def spans_of_step(spans: Iterable[SpanRecord], step: int) -> list[SpanRecord]:
    """The spans of `step`'s trace: the one under the barrier's root span for the step
    (the latest, if the folder holds several runs), else, if no root was written (the
    barrier was killed), the trace most spans of that step belong to. Each span once."""
    spans = list(spans)
    roots = [s for s in spans if s.name == STEP_SPAN and s.parent_id is None and s.step == step]
    if roots:
        trace_id = max(roots, key=lambda s: s.start_ns).trace_id
    else:
        votes = Counter(s.trace_id for s in spans if s.step == step)
        if not votes:
            steps = sorted({s.step for s in spans if s.step is not None})
            held = ", ".join(map(str, steps)) if steps else "none"
            raise NoTrace(f"no trace for step {step} (steps with spans: {held})")
        trace_id = votes.most_common(1)[0][0]
    unique: dict[str, SpanRecord] = {}
    for s in spans:
        if s.trace_id == trace_id:
            unique.setdefault(s.span_id, s)  # a span emitted again after a restart
    return sorted(unique.values(), key=lambda s: (s.start_ns, s.span_id))


@dataclass
class Node:
    span: SpanRecord
    children: list[Node] = field(default_factory=list)
    # True when the span names a parent the files do not hold.
    orphan: bool = False


def build_tree(spans: Iterable[SpanRecord]) -> list[Node]:
    """Roots (spans without a parent, then orphans), children sorted by start time."""
    nodes = {s.span_id: Node(s) for s in spans}
    roots: list[Node] = []
    for node in nodes.values():
        parent_id = node.span.parent_id
        if parent_id is None or parent_id == node.span.span_id:
            roots.append(node)
        elif parent_id in nodes:
            nodes[parent_id].children.append(node)
        else:
            node.orphan = True
            roots.append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.span.start_ns, n.span.span_id))
    roots.sort(key=lambda n: (n.orphan, n.span.start_ns, n.span.span_id))
    return roots


def _describe(span: SpanRecord, origin_ns: int) -> str:
    extra = [f"{key}={span.attributes[key]}" for key in SHOWN_ATTRIBUTES if key in span.attributes]
    if span.status == "ERROR":
        extra.append("FAILED")
    offset = (span.start_ns - origin_ns) / 1e9
    text = f"{span.name}  [{span.who}]  {_duration(span.seconds)}  at +{offset:.3f} s"
    return text + (f"  {' '.join(extra)}" if extra else "")


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def render(spans: list[SpanRecord], step: int, max_same: int = 6) -> str:
    """The tree as text. Runs of more than `max_same` siblings of one name (a delta's many
    chunks) are cut to the first `max_same` and a line summing up the rest."""
    if not spans:
        raise NoTrace(f"no spans for step {step}")
    origin = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    processes = {(s.service, s.participant) for s in spans}
    lines = [
        f"step {step}: trace {spans[0].trace_id}, {len(spans)} spans from "
        f"{len(processes)} processes, {_duration((end - origin) / 1e9)} first to last"
    ]

    def walk(node: Node, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        note = "  (parent not in the files)" if node.orphan else ""
        lines.append(prefix + branch + _describe(node.span, origin) + note)
        inner = prefix if top else prefix + ("   " if last else "│  ")
        shown = _cut(node.children, max_same)
        for i, item in enumerate(shown):
            is_last = i == len(shown) - 1
            if isinstance(item, Node):
                walk(item, inner, is_last, False)
            else:
                lines.append(inner + ("└─ " if is_last else "├─ ") + item)

    for root in build_tree(spans):
        walk(root, "", True, True)
    return "\n".join(lines)


def _cut(children: list[Node], max_same: int) -> list[Node | str]:
    seen: Counter[str] = Counter()
    hidden: dict[str, list[Node]] = {}
    out: list[Node | str] = []
    for child in children:
        seen[child.span.name] += 1
        if seen[child.span.name] > max_same:
            hidden.setdefault(child.span.name, []).append(child)
        else:
            out.append(child)
    for name, rest in hidden.items():
        total = sum(n.span.seconds for n in rest)
        out.append(f"… {len(rest)} more {name} spans ({_duration(total)} in all)")
    return out

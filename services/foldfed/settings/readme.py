"""README's variable table, rendered from the registry, and the command that writes it.

`python -m foldfed.settings --write README.md` replaces the text between
`<!-- settings:begin -->` and `<!-- settings:end -->`; `--check README.md` exits 1 when
that text drifts from the registry (tests/test_settings_readme.py does the same check).
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from foldfed.errors import ConfigError
from foldfed.settings.registry import Label, Settings, as_env_text

BEGIN_MARK = "<!-- settings:begin -->"
END_MARK = "<!-- settings:end -->"
_REGION = re.compile(re.escape(BEGIN_MARK) + r".*?" + re.escape(END_MARK), re.DOTALL)
_BASE_TYPES = {int: "integer", float: "number", Path: "path", str: "text"}
_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤"}


@dataclass(frozen=True)
class Row:
    """One variable as README shows it."""

    variable: str
    roles: tuple[str, ...]
    type: str
    default: str
    doc: str


def rows() -> tuple[Row, ...]:
    """Every variable, in the registry's order."""
    return tuple(_row(field) for field in Settings.model_fields.values())


def _row(field: FieldInfo) -> Row:
    extra = field.json_schema_extra
    assert isinstance(extra, dict)
    shown = extra["shown"] or ("—" if field.default is None else f"`{_text(field.default)}`")
    roles = extra["roles"]
    assert isinstance(roles, list)
    name = str(field.validation_alias)
    return Row(name, tuple(map(str, roles)), _type_text(field), str(shown), field.description or "")


def _type_text(field: FieldInfo) -> str:
    annotation, metadata = _unwrap(field.annotation), list(field.metadata)
    if get_origin(annotation) is Annotated:
        metadata += annotation.__metadata__
        annotation = get_args(annotation)[0]
    labels = [m.text for m in metadata if isinstance(m, Label)]
    if labels:
        text = labels[0]
    elif get_origin(annotation) is Literal:
        text = " or ".join(f"`{v}`" for v in get_args(annotation))
    else:
        text = _BASE_TYPES[annotation]
    bounds = {b: getattr(m, b) for m in metadata for b in _BOUNDS if hasattr(m, b)}
    bounds = {b: v for b, v in bounds.items() if v is not None}
    if "ge" in bounds and "le" in bounds:
        return f"{text}, {_text(bounds['ge'])} to {_text(bounds['le'])}"
    return text + "".join(f" {_BOUNDS[b]} {_text(v)}" for b, v in bounds.items())


def _text(value: Any) -> str:
    """A value as a person reads it: 30 rather than 30.0."""
    return f"{value:g}" if isinstance(value, float) else as_env_text(value)


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def markdown_table(table: Sequence[Row] | None = None) -> str:
    lines = ["| variable | used by | type | default | meaning |", "|---|---|---|---|---|"]
    for row in rows() if table is None else table:
        cells = (f"`{row.variable}`", ", ".join(row.roles), row.type, row.default, row.doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(readme: str, table: Sequence[Row] | None = None) -> str:
    """`readme` with the text between the settings markers replaced by the table."""
    if len(_REGION.findall(readme)) != 1:
        raise ConfigError(f"README must hold exactly one {BEGIN_MARK} … {END_MARK} region")
    region = f"{BEGIN_MARK}\n{markdown_table(table)}{END_MARK}"
    return _REGION.sub(lambda _match: region, readme)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m foldfed.settings", description="README's settings table"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the variable table")
    group.add_argument("--write", metavar="README", help="rewrite the table in this file")
    group.add_argument("--check", metavar="README", help="exit 1 if this file's table drifts")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    path = Path(args.write or args.check)
    text = path.read_text()
    fresh = with_table(text)
    if args.check and fresh != text:
        print(f"{path}: settings table drifts; run: python -m foldfed.settings --write {path}")
        return 1
    if args.write and fresh != text:
        path.write_text(fresh)
    return 0

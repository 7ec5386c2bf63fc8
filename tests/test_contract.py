"""Contracts no single module can keep on its own: generated code matches the protos and
the wire schema documents itself. (The pure core's imports are checked by import-linter:
pyproject.toml [tool.importlinter], run by tests/test_architecture.py.)"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import google.protobuf
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "foldfed" / "v1"
SERVICES = ROOT / "services"
GENERATED_DIR = SERVICES / "foldfed" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------------ (a) proto drift


def test_there_are_protos_and_generated_code() -> None:
    assert [p.name for p in PROTOS] == [
        "delta.proto",
        "events.proto",
        "step.proto",
        "transfer.proto",
    ]
    assert (GENERATED_DIR / "__init__.py").is_file()


def test_generated_code_is_what_the_pinned_protoc_makes_of_the_protos(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT.relative_to(ROOT)}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(str(p.relative_to(ROOT)) for p in PROTOS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    fresh_dir = tmp_path / "foldfed" / "v1"
    fresh = {p.name: p.read_bytes() for p in sorted(fresh_dir.iterdir())}
    committed = {
        p.name: p.read_bytes()
        for p in sorted(GENERATED_DIR.iterdir())
        if p.name.endswith(("_pb2.py", "_pb2.pyi"))
    }
    assert len(fresh) == 2 * len(PROTOS)
    assert sorted(fresh) == sorted(committed), "generated files were added or removed"
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert drifted == [], f"regenerate services/foldfed/v1: {drifted} differ"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_generator_installed_is_the_pinned_one() -> None:
    pins = [
        d for d in _pyproject()["project"]["optional-dependencies"]["dev"] if "grpcio-tools" in d
    ]
    assert len(pins) == 1
    pinned = pins[0].split("==")[1]
    assert importlib.metadata.version("grpcio-tools") == pinned


def test_the_protobuf_runtime_is_at_least_the_generators() -> None:
    generated_by = {
        _version(m.group(1))
        for p in GENERATED_DIR.glob("*_pb2.py")
        if (m := re.search(r"^# Protobuf Python Version: (\S+)$", p.read_text(), re.M))
    }
    assert len(generated_by) == 1, generated_by
    (generator,) = generated_by
    assert _version(google.protobuf.__version__) >= generator
    (requirement,) = [d for d in _pyproject()["project"]["dependencies"] if "protobuf" in d]
    minimum = re.search(r">=\s*([\d.]+)", requirement)
    assert minimum is not None, requirement
    assert _version(minimum.group(1)) >= generator


# ------------------------------------------------------------------------ (b) comments

_FIELD = re.compile(
    r"^(?:(?:optional|repeated)\s+)?(?:map\s*<\s*\w+\s*,\s*[\w.]+\s*>|[\w.]+)\s+\w+\s*=\s*\d+"
)
_ENUM_VALUE = re.compile(r"^\w+\s*=\s*-?\d+")
_BLOCK = re.compile(r"^(message|enum|oneof)\s+(\w+)\s*\{")


@dataclass(frozen=True)
class Declaration:
    kind: str  # "message", "field", "enum", "enum value", "oneof"
    name: str
    line: int
    commented: bool


def declarations(text: str) -> list[Declaration]:
    """Messages, fields, enums and enum values of a proto file, each with whether the line
    just above it is a `//` comment. Assumes the house layout: one declaration a line."""
    out: list[Declaration] = []
    stack: list[str] = []
    previous = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        commented = previous.startswith("//")
        if line and not line.startswith("//"):
            if block := _BLOCK.match(line):
                out.append(Declaration(block.group(1), block.group(2), number, commented))
                stack.append(block.group(1))
            elif stack and stack[-1] in ("message", "oneof") and _FIELD.match(line):
                if not line.startswith(("reserved", "option")):
                    out.append(Declaration("field", line.split("=")[0].strip(), number, commented))
            elif stack and stack[-1] == "enum" and _ENUM_VALUE.match(line):
                out.append(Declaration("enum value", line.split("=")[0].strip(), number, commented))
            stack = stack[: len(stack) - line.count("}")] if "}" in line else stack
        previous = line
    return out


def test_the_comment_parser_finds_uncommented_declarations() -> None:
    text = (
        'syntax = "proto3";\n// A.\nmessage A {\n  // x.\n  uint64 x = 1;\n  string y = 2;\n'
        '  map<string, double> m = 3;\n  reserved 4;\n  reserved "old";\n}\n'
        "message B {\n  // r.\n  repeated bytes r = 1;\n}\n"
        "enum E {\n  E_ZERO = 0;\n}\n"
    )
    found = {(d.kind, d.name): d.commented for d in declarations(text)}
    assert found == {
        ("message", "A"): True,
        ("field", "uint64 x"): True,
        ("field", "string y"): False,
        ("field", "map<string, double> m"): False,
        ("message", "B"): False,
        ("field", "repeated bytes r"): True,
        ("enum", "E"): False,
        ("enum value", "E_ZERO"): False,
    }


def _all_declarations() -> list[tuple[str, Declaration]]:
    return [(p.name, d) for p in PROTOS for d in declarations(p.read_text())]


def test_every_message_and_field_is_commented() -> None:
    found = [(f, d) for f, d in _all_declarations() if d.kind in ("message", "field")]
    # Counted, so a parser that finds nothing cannot pass: 12 messages, 87 fields
    # (DeltaManifest's field 12, created_unix_ms, is retired, a `reserved` line now).
    assert sum(d.kind == "message" for _, d in found) == 12
    assert sum(d.kind == "field" for _, d in found) == 87
    uncommented = [f"{f}:{d.line} {d.kind} {d.name}" for f, d in found if not d.commented]
    assert uncommented == []


def test_every_enum_and_enum_value_is_commented() -> None:
    found = [(f, d) for f, d in _all_declarations() if d.kind in ("enum", "enum value")]
    assert len(found) == 2 + 4 + 13  # Codec gained CODEC_MASKED_RING (secure aggregation)
    uncommented = [f"{f}:{d.line} {d.kind} {d.name}" for f, d in found if not d.commented]
    assert uncommented == []


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_proto_is_in_package_foldfed_v1_and_opens_with_a_comment(proto: Path) -> None:
    text = proto.read_text()
    assert re.search(r"^package foldfed\.v1;$", text, re.M)
    assert re.search(r'^syntax = "proto3";$', text, re.M)
    assert text.startswith("//")

"""deploy/Dockerfile, checked without Docker: every RUN script parses as POSIX sh, the image
runs as a fixed non-root user with `foldfed` as its entry point, its build context is an
allow-list, and what it installs is what pyproject/constraints say."""

from __future__ import annotations

import json
import re
import subprocess

from test_deploy_localrun import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        continued = line.endswith("\\")
        current += line.removesuffix("\\").rstrip() + " " if continued else line
        if not continued:
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_run_scripts_are_valid_sh() -> None:
    runs = [args for word, args in instructions() if word == "RUN"]
    assert len(runs) >= 4
    for script in runs:
        done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)


def test_python_check_accepts_311_and_up() -> None:
    """The base-image probe: exit 0 for Python >= 3.11 (this interpreter is 3.11)."""
    script = next(a for w, a in instructions() if w == "RUN" and "version_info" in a)
    check = re.search(r"ok='([^']+)'", script)
    assert check is not None
    done = subprocess.run(["python3", "-c", check.group(1)], capture_output=True)
    assert done.returncode == 0


def test_image_identity_and_entrypoint() -> None:
    ins = instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users == ["10001:10001"]  # numeric, so runAsNonRoot can verify it
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["foldfed"]]
    # torch is installed pinned from the chosen index before the project (constraints).
    runs = [a for w, a in ins if w == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    project_run = next(i for i, r in enumerate(runs) if "-c /src/constraints.txt" in r)
    assert torch_run < project_run
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    constraints = (REPO / "constraints.txt").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in constraints
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["BASE_IMAGE"].startswith("python:3.11")


def test_build_context_is_an_allow_list() -> None:
    lines = [
        line
        for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "**"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "services/**"}
    copied = [a for w, a in instructions() if w == "COPY"]
    assert all(c.split()[0] in {"pyproject.toml", "services"} for c in copied)

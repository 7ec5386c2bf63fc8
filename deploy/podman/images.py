"""The container images, built with podman on a machine that reaches no image registry.

Three variants from one debootstrap base (Debian bookworm, minbase, python3 + venv):

    slim         foldfed:<version>         deploy/Dockerfile, EXTRAS=""   (hub services,
                                                                          demo trainers)
    participant  foldfed:<version>-of3     deploy/Dockerfile, EXTRAS=of3  (OpenFold3 trainers)
    broker       foldfed-broker:<version>  deploy/Dockerfile.broker       (Debian's RabbitMQ)

Each image is also tagged `in-<hash>`, the content hash of everything its build reads
(the Dockerfile and its allow-listed context, the build arguments, the base image's id and
the torch wheel's name), and carries it as the label `org.foldfed.inputs`. An image whose
hash tag exists is reused, not rebuilt: unchanged inputs cost nothing, and any changed
input gives a new tag.

The base image (`foldfed-base:bookworm`) is the one cache kept between runs: it is made
once with debootstrap from the Debian mirror (~1 min, 275 MB) and imported with
`podman import`; `podman rmi foldfed-base:bookworm` forces a new one. torch's CPU wheel is
mounted into the build from local disk (`pip download`, which finds it in the machine's
pip configuration), never downloaded by the build; without a local CPU wheel the build
falls back to the Dockerfile's TORCH_INDEX_URL. Other packages come from PyPI over the
host's network (`--network host`), with the host's CA bundle mounted read-only for the
build's RUN steps only, so nothing of it lands in a layer.

Usage (from the repository root; `make image` runs `build all`):

    python3 deploy/podman/images.py build [slim|participant|broker|all]...
    python3 deploy/podman/images.py name slim     # the hash-tagged name, built or not
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/foldfed-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_VERSION = "2.13.0"
WHEEL_CACHE = REPO / "var" / "cache" / "wheels"
INPUTS_LABEL = "org.foldfed.inputs"
VARIANT_LABEL = "org.foldfed.variant"


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True)
class Variant:
    """One image: its repository name, tag suffix, Dockerfile and build arguments."""

    name: str
    repository: str
    suffix: str
    dockerfile: str
    extras: str | None  # None: not a foldfed (Python) image


VARIANTS = {
    v.name: v
    for v in (
        Variant("slim", "localhost/foldfed", "", "deploy/Dockerfile", ""),
        Variant("participant", "localhost/foldfed", "-of3", "deploy/Dockerfile", "of3"),
        Variant("broker", "localhost/foldfed-broker", "", "deploy/Dockerfile.broker", None),
    )
}


def podman_env() -> dict[str, str]:
    """podman's environment: this repository's containers.conf unless one is given."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, capture: bool = True) -> str:
    done = subprocess.run(
        ["podman", *args], env=podman_env(), text=True, capture_output=capture, check=False
    )
    if check and done.returncode != 0:
        raise BuildError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return (done.stdout or "").strip()


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=podman_env()).returncode == 0


def version() -> str:
    found = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert found is not None, "pyproject.toml has no version"
    return found.group(1)


# ---------------------------------------------------------------- inputs


def ensure_base() -> str:
    """The debootstrap base image (made once, then reused); returns its image id."""
    if not image_exists(BASE_IMAGE):
        if shutil.which("debootstrap") is None:
            raise BuildError("debootstrap is missing: apt-get install debootstrap (make image)")
        with tempfile.TemporaryDirectory(prefix="foldfed-base-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            print(f"making {BASE_IMAGE} with debootstrap (about a minute)", flush=True)
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    "bookworm",
                    str(root),
                    "http://deb.debian.org/debian",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            # The base must not carry apt's downloads: the images' hygiene starts here.
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (root / cache).glob("*"):
                    if item.is_file():
                        item.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(
                ["podman", "import", "-", BASE_IMAGE],
                stdin=tar.stdout,
                env=podman_env(),
                check=True,
                stdout=subprocess.DEVNULL,
            )
            assert tar.wait() == 0, "tar of the debootstrap root failed"
    return podman("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)


def torch_wheel() -> Path | None:
    """torch's CPU wheel on local disk (pip's configured find-links or index), or None."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(WHEEL_CACHE),
            f"torch=={TORCH_VERSION}",
        ],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    wheels = sorted(WHEEL_CACHE.glob(f"torch-{TORCH_VERSION}+cpu-*.whl"))
    return wheels[-1] if wheels else None


def context_files(variant: Variant) -> list[Path]:
    """What the build context holds (the Dockerfile's .dockerignore allow-list)."""
    if variant.extras is None:
        return []
    files = [REPO / n for n in ("pyproject.toml", "constraints.txt", "README.md")]
    for path in sorted((REPO / "services").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return files


def inputs_hash(variant: Variant, base_id: str, wheel: Path | None) -> str:
    digest = hashlib.sha256()
    dockerfile = REPO / variant.dockerfile
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    for path in [dockerfile, ignore, *context_files(variant)]:
        if path.exists():
            digest.update(str(path.relative_to(REPO)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"base={base_id} extras={variant.extras} torch={wheel and wheel.name}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- build


def hashed_name(variant: Variant, inputs: str) -> str:
    return f"{variant.repository}:in-{inputs[:16]}"


def version_name(variant: Variant) -> str:
    return f"{variant.repository}:{version()}{variant.suffix}"


def build(variant: Variant) -> str:
    """Build `variant` unless an image of the same inputs exists; returns its hashed name."""
    base_id = ensure_base()
    wheel = torch_wheel() if variant.extras is not None else None
    inputs = inputs_hash(variant, base_id, wheel)
    name = hashed_name(variant, inputs)
    if image_exists(name):
        print(f"{name}: inputs unchanged, reused", flush=True)
    else:
        args = ["build", "--network", "host", "--pull=never", "--layers"]
        args += ["-f", variant.dockerfile, "--ignorefile", f"{variant.dockerfile}.dockerignore"]
        args += ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--label", f"{INPUTS_LABEL}={inputs}"]
        args += ["--label", f"{VARIANT_LABEL}={variant.name}"]
        if HOST_CA.exists():  # for the build's RUN steps only: mounts land in no layer
            args += ["-v", f"{HOST_CA}:/etc/ssl/certs/ca-certificates.crt:ro"]
        if variant.extras is not None:
            args += ["--build-arg", f"EXTRAS={variant.extras}"]
        if wheel is not None:
            args += ["-v", f"{wheel.parent}:/wheels:ro", "--build-arg", "TORCH_WHEELS=/wheels"]
        print(f"building {name} ({variant.name})", flush=True)
        subprocess.run(["podman", *args, "-t", name, "."], cwd=REPO, env=podman_env(), check=True)
    podman("tag", name, version_name(variant))
    remove_stale(variant, name)
    return name


def remove_stale(variant: Variant, current: str) -> None:
    """Earlier builds of `variant` (other inputs): one image per variant stays on disk."""
    listed = podman(
        "images", "--filter", f"label={VARIANT_LABEL}={variant.name}",
        "--format", "{{.Repository}}:{{.Tag}}",
    ).split()  # fmt: skip
    current_id = podman("image", "inspect", "--format", "{{.Id}}", current)
    for name in listed:
        if ":in-" in name and name != current:
            if podman("image", "inspect", "--format", "{{.Id}}", name) != current_id:
                podman("rmi", name, check=False)


def size_mb(name: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build (or reuse) images; print names and sizes")
    build_cmd.add_argument("variants", nargs="*", default=["all"])
    name_cmd = sub.add_parser("name", help="the hash-tagged name of a variant's image")
    name_cmd.add_argument("variant", choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    if args.command == "name":
        variant = VARIANTS[args.variant]
        wheel = torch_wheel() if variant.extras is not None else None
        print(hashed_name(variant, inputs_hash(variant, ensure_base(), wheel)))
        return 0
    chosen = list(VARIANTS) if "all" in args.variants else args.variants
    built = [(VARIANTS[v], build(VARIANTS[v])) for v in chosen]
    print(f"{'variant':<12} {'image':<40} {'MB':>8}  inputs tag")
    for variant, name in built:
        print(f"{variant.name:<12} {version_name(variant):<40} {size_mb(name):>8.0f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

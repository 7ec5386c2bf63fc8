"""Finding RabbitMQ's real scripts and epmd on this machine, and installing Debian's
`rabbitmq-server` with apt when it is missing.

"Real" scripts: Debian's /usr/sbin/rabbitmq-server is a wrapper that would `su rabbitmq` and
write to /var/lib; the scripts it wraps sit next to `rabbitmq-env` and do not care who runs
them, so a private broker runs those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from foldfed.errors import BrokerError

__all__ = ["ensure_rabbitmq_installed", "find_epmd", "find_rabbitmq_bin_dir"]

# Where distributions put the *real* scripts (the ones next to `rabbitmq-env`).
_RABBITMQ_BIN_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/lib/rabbitmq/sbin"))
_RABBITMQ_SEARCH = (Path("/usr/sbin"), Path("/usr/lib/rabbitmq/bin"))

_APT_TIMEOUT = 900.0


def find_rabbitmq_bin_dir() -> Path | None:
    """The directory of the real `rabbitmq-server` script, or None if not installed.

    The real script sits next to `rabbitmq-env` (after resolving symlinks), which is how we tell
    it from Debian's /usr/sbin wrapper that would `su rabbitmq` and write to /var/lib.
    """
    candidates: list[Path] = [d / "rabbitmq-server" for d in _RABBITMQ_BIN_DIRS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found))
    candidates += [d / "rabbitmq-server" for d in _RABBITMQ_SEARCH]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        # Keep the unresolved directory when it has the tools (the scripts resolve their own
        # symlinks to find rabbitmq-env); otherwise try the resolved one.
        for directory in (candidate.parent, candidate.resolve().parent):
            if (directory / "rabbitmq-env").is_file() and (directory / "rabbitmqctl").is_file():
                return directory
    return None


def _rabbitmq_present() -> bool:
    """True if a `rabbitmq-server` exists where the brief says to look (PATH, /usr/sbin,
    /usr/lib/rabbitmq/bin) *and* we can find the real scripts behind it."""
    return find_rabbitmq_bin_dir() is not None


def find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    for pattern in ("/usr/lib/erlang/bin/epmd", "/usr/lib/erlang/erts-*/bin/epmd"):
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            if os.access(path, os.X_OK):
                return str(path)
    return None


def ensure_rabbitmq_installed() -> None:
    """Install Debian's rabbitmq-server when it is missing and we are root; else explain.

    apt does not start the service in a container without systemd, so installing leaves no
    system broker behind (docs/rabbitmq.md: ~12 s, 35 MB).
    """
    if _rabbitmq_present():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrokerError(
            "RabbitMQ is not installed: no `rabbitmq-server` in PATH, /usr/sbin or "
            "/usr/lib/rabbitmq/bin. Install it, e.g. as root on Debian/Ubuntu: "
            "`apt-get update && apt-get install -y rabbitmq-server` (RabbitMQ >= 3.10 with "
            "its Erlang; the service need not run: foldfed starts its own private broker)."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "rabbitmq-server"],
    ):
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"`{' '.join(cmd)}` took longer than {_APT_TIMEOUT:.0f} s") from exc
        if proc.returncode != 0:
            raise BrokerError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
    if not _rabbitmq_present():
        raise BrokerError("apt-get installed rabbitmq-server but its scripts were not found")

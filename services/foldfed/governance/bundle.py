"""The files of checkpoint governance: proposals, approvals and the published bundle.

- a proposal is `proposal.json` (a `foldfed.checkpoint-proposal/1` object);
- an approval is a DSSE envelope in a JSON file (`approval-<company>.dsse.json`);
- a published bundle is a folder holding the weights file, under the name the proposal
  gives it, and `release.dsse.json`, the release envelope (`release`).

The weights are hashed in one streaming pass (blake3 and sha256 together), so a GB-sized
file costs O(1) memory and one read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import blake3

from foldfed.dsse import Envelope, envelope_from_json
from foldfed.durable import atomic_write, fsync_dir
from foldfed.errors import ConfigError
from foldfed.governance.release import WeightsDigest

RELEASE_FILE = "release.dsse.json"
BLOCK = 8 << 20
# A safetensors header is JSON; 100 MB is the limit the safetensors library itself sets.
MAX_HEADER = 100_000_000


def weights_digest(path: Path) -> WeightsDigest:
    """Name, size, blake3 and sha256 of the weights file at `path`."""
    b3, sha = blake3.blake3(max_threads=1), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            b3.update(block)
            sha.update(block)
            size += len(block)
    return WeightsDigest(path.name, size, b3.hexdigest(), sha.hexdigest())


def safetensors_tensor_count(path: Path) -> int:
    """How many tensors the safetensors file at `path` holds; `ConfigError` if it is not
    one (8-byte little-endian header length, then a JSON object of tensors)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ConfigError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ConfigError(f"{path} is not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file (header is not an object)")
    return sum(1 for name in header if name != "__metadata__")


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise ConfigError(f"{what} {path}: unreadable ({exc})") from exc


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(document, indent=1) + "\n").encode())


def read_envelope(path: Path, what: str) -> Envelope:
    return envelope_from_json(read_json(path, what))


def write_bundle(folder: Path, weights: Path, name: str, release: Envelope) -> Path:
    """Write the bundle: the weights as `name` and the release envelope, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not (target.exists() and os.path.samefile(target, weights)):
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(weights, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    write_json(folder / RELEASE_FILE, release.to_json())
    return target


def read_bundle(folder: Path) -> Envelope:
    """The release envelope of the bundle in `folder`."""
    if not (folder / RELEASE_FILE).is_file():
        raise ConfigError(f"{folder} holds no {RELEASE_FILE}: not a published bundle")
    return read_envelope(folder / RELEASE_FILE, "release")


def bundle_weights(folder: Path, release: Envelope) -> Path:
    """The weights file that the release in `folder` names (its subject)."""
    subject = release.payload_json().get("subject")
    if not isinstance(subject, list) or len(subject) != 1 or not isinstance(subject[0], dict):
        raise ConfigError(f"{folder / RELEASE_FILE}: the release names no single weights file")
    name = subject[0].get("name")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ConfigError(f"{folder / RELEASE_FILE}: the weights name {name!r} is not a file")
    return folder / name

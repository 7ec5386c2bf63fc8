"""Key files: where a party's Ed25519 keys and the consortium's keyring are kept.

Three JSON formats, each with a `format` field that readers check first (hex is lower
case; `keyid` is blake3 of the public key, see `foldfed.signing`):

- private key, `NAME.key`, mode 0600, never leaves its party::

    {"format": "foldfed.ed25519-private/1", "name": "company-a",
     "keyid": "<64 hex>", "public": "<64 hex>", "private": "<64 hex: the 32-byte seed>"}

- public key, `NAME.pub`, handed to the consortium::

    {"format": "foldfed.ed25519-public/1", "name": "company-a",
     "keyid": "<64 hex>", "public": "<64 hex>"}

- keyring, the consortium's N public keys and its threshold M::

    {"format": "foldfed.keyring/1", "threshold": 2,
     "keys": [{"name": "company-a", "keyid": "...", "public": "..."}, ...]}

A reader recomputes every key id (and the public key from a private seed) and refuses a
file where they disagree, and refuses a private key file that others may read, as ssh
does. No pickle, no PEM passphrase: a private key file is protected by its file mode and
the machine it lives on (docs/operating-model.md, "Keys").
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from foldfed.durable import atomic_write
from foldfed.signing import BadKey, Keyring, SigningKey, VerifyKey

PRIVATE_FORMAT = "foldfed.ed25519-private/1"
PUBLIC_FORMAT = "foldfed.ed25519-public/1"
KEYRING_FORMAT = "foldfed.keyring/1"


def public_entry(key: VerifyKey) -> dict[str, str]:
    return {"name": key.name, "keyid": key.keyid, "public": key.public.hex()}


def write_private_key(path: Path, key: SigningKey) -> None:
    """Write `key` to `path`, readable by its owner only."""
    document = {"format": PRIVATE_FORMAT, **public_entry(key.verify_key())}
    document["private"] = key.seed.hex()
    # atomic_write's temporary file is created 0600 (mkstemp), so the seed is never
    # readable by others, not even for a moment.
    atomic_write(path, _dump(document))
    os.chmod(path, 0o600)


def write_public_key(path: Path, key: VerifyKey) -> None:
    atomic_write(path, _dump({"format": PUBLIC_FORMAT, **public_entry(key)}))
    os.chmod(path, 0o644)


def write_keyring(path: Path, keyring: Keyring) -> None:
    document = {
        "format": KEYRING_FORMAT,
        "threshold": keyring.threshold,
        "keys": [public_entry(k) for k in keyring.keys],
    }
    atomic_write(path, _dump(document))
    os.chmod(path, 0o644)


def read_private_key(path: Path) -> SigningKey:
    """The signing key in `path`; refused if others may read the file."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0
    if mode & 0o077:
        raise BadKey(f"private key {path} is readable by others (mode {mode:o}): chmod 600 it")
    document = _load(path, PRIVATE_FORMAT)
    key = SigningKey(_text(document, "name", path), _hex(document, "private", path))
    if key.public.hex() != document.get("public") or key.keyid != document.get("keyid"):
        raise BadKey(f"{path}: the public key or key id does not belong to the private key")
    return key


def read_public_key(path: Path) -> VerifyKey:
    """The public key in `path` (a `.pub` file, or the public half of a `.key` file)."""
    document = _load(path, PUBLIC_FORMAT, PRIVATE_FORMAT)
    return _verify_key(document, str(path))


def read_keyring(path: Path) -> Keyring:
    document = _load(path, KEYRING_FORMAT)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise BadKey(f"{path}: keys is not a list")
    threshold = document.get("threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise BadKey(f"{path}: threshold is not an integer")
    keys = [_verify_key(e, f"{path} key {i}") for i, e in enumerate(entries)]
    try:
        return Keyring(tuple(keys), threshold)
    except BadKey as exc:
        raise BadKey(f"{path}: {exc}") from exc


def _verify_key(document: Any, where: str) -> VerifyKey:
    if not isinstance(document, dict):
        raise BadKey(f"{where}: not a JSON object")
    key = VerifyKey(_text(document, "name", where), _hex(document, "public", where))
    if document.get("keyid") != key.keyid:
        raise BadKey(f"{where}: keyid is not the blake3 of the public key")
    return key


def _load(path: Path, *formats: str) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise BadKey(f"{path}: unreadable key file ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") not in formats:
        raise BadKey(f"{path}: not a {' or '.join(formats)} file")
    return document


def _text(document: dict[str, Any], field: str, where: object) -> str:
    value = document.get(field)
    if not isinstance(value, str) or not value:
        raise BadKey(f"{where}: {field} is missing")
    return value


def _hex(document: dict[str, Any], field: str, where: object) -> bytes:
    try:
        return bytes.fromhex(_text(document, field, where))
    except ValueError as exc:
        raise BadKey(f"{where}: {field} is not hex") from exc


def _dump(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=1) + "\n").encode()

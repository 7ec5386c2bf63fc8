"""Signing keys in a container deployment: each party makes its own Ed25519 key where it
runs, only public keys travel, and every party builds the same keyring from them.

Two set-up steps, the ones compose and Kubernetes run before the services
(deploy/README.md, "Signing keys"):

- `provision`: a party's one-shot (compose). Its private key `NAME.key` is kept in its own
  keys folder (made there once, never overwritten: a restart signs with the same key);
  its public key `NAME.pub` goes to the public folder the parties share (one volume on a
  single host; across hosts the operators copy the `.pub` files, which are not secret).
  Once every member's `.pub` is there it writes the keyring `consortium.keyring` beside
  its private key. Every party computes the same keyring (keys in member order), so the
  hub checks exactly the keys the members sign with.
- `install`: a Kubernetes init container. A Secret's files are readable by the pod's
  fsGroup (the kubelet adds group read to `defaultMode` when the pod sets an fsGroup,
  kubernetes/kubernetes#57923), which the key loader refuses, as ssh does; so the key is
  copied to a memory-backed emptyDir, owned by the service's user, mode 0600.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from foldfed.durable import atomic_write
from foldfed.errors import ConfigError
from foldfed.keyfiles import (
    read_private_key,
    read_public_key,
    write_keyring,
    write_private_key,
    write_public_key,
)
from foldfed.signing import Keyring, SigningKey

KEYRING_NAME = "consortium.keyring"
POLL_S = 0.5


def private_key_path(keys_dir: Path, name: str) -> Path:
    return keys_dir / f"{name}.key"


def public_key_path(public_dir: Path, name: str) -> Path:
    return public_dir / f"{name}.pub"


def own_key(name: str, keys_dir: Path) -> SigningKey:
    """The party's key: the one in `keys_dir` if there (checked), else a new one."""
    path = private_key_path(keys_dir, name)
    if path.exists():
        key = read_private_key(path)
        if key.name != name:
            raise ConfigError(f"{path} is the key of {key.name!r}, not of {name!r}")
        return key
    key = SigningKey.generate(name)
    keys_dir.mkdir(parents=True, exist_ok=True)
    write_private_key(path, key)
    return key


def missing_members(members: Sequence[str], public_dir: Path) -> list[str]:
    """The members whose public key is not (yet) in `public_dir`."""
    return [m for m in members if not public_key_path(public_dir, m).is_file()]


def keyring_of(members: Sequence[str], public_dir: Path, threshold: int) -> Keyring:
    """The keyring of the members' public keys, in member order; a file whose key is
    named otherwise than its member is refused (it would sign for someone else)."""
    keys = []
    for member in members:
        key = read_public_key(public_key_path(public_dir, member))
        if key.name != member:
            raise ConfigError(f"{public_key_path(public_dir, member)} names {key.name!r}")
        keys.append(key)
    return Keyring(tuple(keys), threshold)


def provision(
    name: str,
    members: Sequence[str],
    keys_dir: Path,
    public_dir: Path,
    *,
    threshold: int = 1,
    wait_s: float = 600.0,
    say: Callable[[str], None] = print,
) -> Keyring:
    """Keep or make `name`'s key, publish its public key, wait (up to `wait_s`) for every
    member's, then write the keyring beside the private key; returns it."""
    if name not in members:
        raise ConfigError(f"{name!r} is not one of the members {list(members)}")
    key = own_key(name, keys_dir)
    public_dir.mkdir(parents=True, exist_ok=True)
    write_public_key(public_key_path(public_dir, name), key.verify_key())
    say(f"{name}: keyid {key.keyid}, public key in {public_dir}")
    deadline = time.monotonic() + wait_s
    missing = missing_members(members, public_dir)
    if missing:
        say(f"waiting for the public keys of {', '.join(missing)} in {public_dir}")
    while missing:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no public key of {', '.join(missing)} in {public_dir} after {wait_s:g} s:"
                " copy each member's NAME.pub there (deploy/README.md, 'Signing keys')"
            )
        time.sleep(POLL_S)
        missing = missing_members(members, public_dir)
    keyring = keyring_of(members, public_dir, threshold)
    write_keyring(keys_dir / KEYRING_NAME, keyring)
    say(f"keyring {keys_dir / KEYRING_NAME}: {', '.join(members)}")
    return keyring


def install(source: Path, out: Path) -> SigningKey:
    """Copy the private key file `source` (e.g. a Secret's, group-readable) to `out`,
    mode 0600, and check it there with the key loader's rules."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic_write's temporary file is created 0600: the seed is never readable by others.
    atomic_write(out, data)
    out.chmod(0o600)
    return read_private_key(out)

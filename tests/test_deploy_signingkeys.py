"""foldfed.deploy.signingkeys and its commands: each party keeps its own key, publishes its
public key, and every party writes the same keyring; a Secret's group-readable key file is
installed as a 0600 copy the key loader accepts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from foldfed.deploy.signingkeys import (
    KEYRING_NAME,
    install,
    missing_members,
    own_key,
    provision,
)
from foldfed.errors import ConfigError
from foldfed.keyfiles import read_keyring, read_private_key, write_private_key
from foldfed.signing import BadKey, SigningKey

MEMBERS = ["company-a", "company-b", "hub"]


def quiet(_: str) -> None:
    pass


def test_every_party_writes_the_same_keyring(tmp_path: Path) -> None:
    public = tmp_path / "public"
    threads = [
        threading.Thread(
            target=provision,
            args=(m, MEMBERS, tmp_path / m, public),
            kwargs={"wait_s": 30, "say": quiet},
        )
        for m in MEMBERS
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rings = {m: (tmp_path / m / KEYRING_NAME).read_bytes() for m in MEMBERS}
    assert len(set(rings.values())) == 1
    keyring = read_keyring(tmp_path / "hub" / KEYRING_NAME)
    assert [k.name for k in keyring.keys] == MEMBERS and keyring.threshold == 1
    for m in MEMBERS:
        key = read_private_key(tmp_path / m / f"{m}.key")
        assert keyring.find(key.keyid) == key.verify_key()
        # Each keys folder holds its own private key only.
        held = sorted(p.name for p in (tmp_path / m).iterdir())
        assert held == sorted([KEYRING_NAME, f"{m}.key"])


def test_a_restart_keeps_the_key(tmp_path: Path) -> None:
    first = own_key("company-a", tmp_path)
    assert stat.S_IMODE((tmp_path / "company-a.key").stat().st_mode) == 0o600
    assert own_key("company-a", tmp_path).keyid == first.keyid
    provision("company-a", ["company-a"], tmp_path, tmp_path / "pub", say=quiet)
    assert read_keyring(tmp_path / KEYRING_NAME).keys[0].keyid == first.keyid


def test_a_key_of_another_party_is_refused(tmp_path: Path) -> None:
    write_private_key(tmp_path / "company-a.key", SigningKey.generate("company-b"))
    with pytest.raises(ConfigError, match="company-b"):
        own_key("company-a", tmp_path)


def test_a_public_key_filed_under_another_member_is_refused(tmp_path: Path) -> None:
    public = tmp_path / "public"
    provision("company-b", ["company-b"], tmp_path / "b", public, say=quiet)
    (public / "company-b.pub").rename(public / "company-a.pub")
    provision("company-b", ["company-b"], tmp_path / "b", public, say=quiet)
    with pytest.raises(ConfigError, match="names 'company-b'"):
        provision("hub", ["company-a", "hub"], tmp_path / "hub", public, say=quiet)


def test_a_missing_member_is_named_after_the_wait(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="company-b"):
        provision("hub", ["company-b", "hub"], tmp_path / "h", tmp_path / "p", wait_s=0.2)
    assert missing_members(["company-b", "hub"], tmp_path / "p") == ["company-b"]
    assert not (tmp_path / "h" / KEYRING_NAME).exists()
    with pytest.raises(ConfigError, match="not one of the members"):
        provision("x", ["hub"], tmp_path / "x", tmp_path / "p", say=quiet)


def test_install_makes_a_group_readable_secret_file_loadable(tmp_path: Path) -> None:
    """A Secret mounted with fsGroup is 0440: refused as is, accepted once installed."""
    secret = tmp_path / "secret" / "signing.key"
    secret.parent.mkdir()
    write_private_key(secret, SigningKey.generate("company-a"))
    secret.chmod(0o440)
    with pytest.raises(BadKey, match="readable by others"):
        read_private_key(secret)
    key = install(secret, tmp_path / "keys" / "signing.key")
    assert key.name == "company-a"
    assert stat.S_IMODE((tmp_path / "keys" / "signing.key").stat().st_mode) == 0o600
    (tmp_path / "bad.key").write_text("{}")
    with pytest.raises(BadKey):
        install(tmp_path / "bad.key", tmp_path / "keys" / "bad.key")
    with pytest.raises(ConfigError, match="cannot read"):
        install(tmp_path / "absent.key", tmp_path / "keys" / "x.key")


def test_the_commands(tmp_path: Path) -> None:
    foldfed = [sys.executable, "-m", "foldfed.cli"]
    env_members = {"FOLDFED_PARTICIPANTS": "company-a"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDFED_")}
    procs = [
        subprocess.Popen(
            [
                *foldfed,
                "signing-key",
                m,
                "--keys-dir",
                str(tmp_path / m),
                "--public-dir",
                str(tmp_path / "public"),
                "--wait",
                "60",
            ],
            env={**env, **env_members},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for m in ("company-a", "hub")
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    keyring = read_keyring(tmp_path / "hub" / KEYRING_NAME)
    assert [k.name for k in keyring.keys] == ["company-a", "hub"]
    (tmp_path / "hub" / "hub.key").chmod(0o640)
    done = subprocess.run(
        [
            *foldfed,
            "install-key",
            str(tmp_path / "hub" / "hub.key"),
            "--out",
            str(tmp_path / "installed" / "signing.key"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "installed" in done.stdout and keyring.keys[1].keyid in done.stdout

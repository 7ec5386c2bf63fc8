"""Generated broker passwords can travel anywhere: never option-like, never in need of URL
escaping (issue 18: the demo's `token_urlsafe` passwords began with '-' one time in 64)."""

from __future__ import annotations

import random
import string
from pathlib import Path

from foldfed.credentials import (
    PASSWORD_BYTES,
    is_option_like,
    is_portable_secret,
    needs_url_escaping,
    new_password,
)
from foldfed.demo.cluster import FederationSpec, LocalFederation
from foldfed.deploy.definitions import parse_env_file, user_of_url

REPO = Path(__file__).resolve().parents[1]
HEX = set(string.hexdigits.lower())


def test_the_checks_say_what_they_mean() -> None:
    assert is_option_like("-x") and is_option_like("--") and is_option_like("-")
    assert not is_option_like("x-") and not is_option_like("")
    for bad in ("a@b", "a:b", "a/b", "a%b", "a#b", "a?b", "a b", "pässwort", "a+b"):
        assert needs_url_escaping(bad), bad
    for good in ("abc", "A-Z_0.9~", "0123456789abcdef"):
        assert not needs_url_escaping(good), good
    assert not is_portable_secret("")
    assert not is_portable_secret("-abc")  # what token_urlsafe gave the demo 1 time in 64
    assert not is_portable_secret("a b")
    assert is_portable_secret("deadbeef")


def test_seeded_passwords_are_portable_hex() -> None:
    """Many draws from fixed seeds: reproducible, and each one checked."""
    for seed in range(20):
        rng = random.Random(seed)
        for _ in range(1_000):
            password = new_password(rng.randbytes)
            assert len(password) == 2 * PASSWORD_BYTES
            assert set(password) <= HEX
            assert is_portable_secret(password), password


def test_os_random_passwords_are_portable_and_distinct() -> None:
    passwords = [new_password() for _ in range(20_000)]
    assert all(is_portable_secret(p) for p in passwords)
    assert len(set(passwords)) == len(passwords)
    # The property holds for every possible first byte, not only for those drawn.
    assert all(is_portable_secret(new_password(lambda n, b=b: bytes([b]) * n)) for b in range(256))


class _RecordingBroker:
    """Stands in for LocalBroker: records the participant users the demo creates."""

    def __init__(self) -> None:
        self.users: dict[str, str] = {}

    def start(self) -> str:
        return "amqp://foldfed-admin:x@127.0.0.1:5672/"

    def add_participant(self, name: str, password: str) -> None:
        self.users[name] = password


def test_demo_gives_every_participant_a_portable_password(tmp_path: Path) -> None:
    """The demo's own path (`LocalFederation.start_broker`), with enough participants that
    today's one-in-64 option-like password would be all but certain to show."""
    names = tuple(f"org-{i}" for i in range(2_000))
    broker = _RecordingBroker()
    spec = FederationSpec(participants=names, steps=1, workdir=tmp_path)
    federation = LocalFederation(spec, broker=broker)  # type: ignore[arg-type]
    federation.start_broker()
    assert set(broker.users) == set(names)
    bad = {n: p for n, p in broker.users.items() if not is_portable_secret(p)}
    assert not bad
    # Used unescaped, the URL still carries exactly the password.
    assert federation.url_for("org-7") == (f"amqp://org-7:{broker.users['org-7']}@127.0.0.1:5672/")


def test_deployment_placeholders_are_portable() -> None:
    """The compose env files' development passwords follow the same rule, so replacing one
    by `new_password()` changes nothing else."""
    for path in sorted((REPO / "deploy/compose/env").glob("*.env")):
        env = parse_env_file(path.read_text(), str(path))
        if "FOLDFED_AMQP_URL" in env:
            user = user_of_url(env["FOLDFED_AMQP_URL"])
            assert is_portable_secret(user.password), path

"""How LocalBroker hands users to rabbitmqctl, without a broker: passwords on stdin (never
argv), `--` before every positional argument, and a clear refusal of what stdin cannot
carry. The real-broker counterpart is in test_localbroker.py."""

from __future__ import annotations

import pytest

from foldfed.errors import BrokerError
from foldfed.localbroker.users import add_participant, add_user, stdin_password_problem


class _Ctl:
    def __init__(self, exists: bool = False) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.exists = exists

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        self.calls.append((args, stdin))
        if args[0] == "add_user" and self.exists:
            raise BrokerError("rabbitmqctl add_user failed (70): User already exists")
        return ""


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("", "empty"),
        ("a\nb", "line breaks"),
        ("ab\r", "line breaks"),
        ("a\0b", "NUL"),
        (" ab", "whitespace"),
        ("ab\t", "whitespace"),
    ],
)
def test_what_stdin_cannot_carry_is_refused_before_rabbitmqctl(password: str, why: str) -> None:
    assert why in (stdin_password_problem(password) or "")
    ctl = _Ctl()
    with pytest.raises(BrokerError, match=why):
        add_user(ctl, "someone", password, configure="^$", write="^$", read="^$")
    assert ctl.calls == []


@pytest.mark.parametrize("password", ["-starts-with-a-dash", "--help", "-", "a b", "pässwörd€"])
def test_passwords_go_to_stdin_never_to_argv(password: str) -> None:
    assert stdin_password_problem(password) is None
    for exists in (False, True):
        ctl = _Ctl(exists=exists)
        add_user(ctl, "-n", password, configure="-c", write="^w$", read="^r$", tags="a b")
        for args, _ in ctl.calls:
            assert password not in args
            assert args[args.index("--") + 1] == "-n", args  # every positional after `--`
        with_stdin = [(args[0], stdin) for args, stdin in ctl.calls if stdin is not None]
        expected = [("add_user", password + "\n")]
        if exists:
            expected.append(("change_password", password + "\n"))
        assert with_stdin == expected
        assert ctl.calls[-1][0] == ("set_permissions", "-p", "/", "--", "-n", "-c", "^w$", "^r$")


def test_participant_ids_that_look_like_options_are_refused() -> None:
    ctl = _Ctl()
    with pytest.raises(BrokerError, match="must not start with '-'"):
        add_participant(ctl, "-org", "pw")
    assert ctl.calls == []
    add_participant(ctl, "org-a", "-pw")
    assert [args[0] for args, _ in ctl.calls] == [
        "add_user",
        "set_user_tags",
        "set_permissions",
        "set_topic_permissions",
    ]

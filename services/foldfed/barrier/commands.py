"""`foldfed cycle status`: who is gated, pending or failed for the coming cycle.

Read from the barrier's store (FOLDFED_STATE_DIR/barrier.sqlite3) on the hub, read-only in
effect: the gating round the barrier opened last, every readiness record it kept, and the
decision once made. Nothing heavy is imported at module level (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from foldfed.barrier.gating import Decision, MemberStatus, Round


def register(sub: argparse._SubParsersAction) -> None:
    cycle = sub.add_parser("cycle", help="hub: the gated cycles (readiness, members)")
    actions = cycle.add_subparsers(dest="cycle_command", required=True)
    show = actions.add_parser(
        "status",
        help="who is gated, pending or failed for the coming cycle",
        description=(
            "Reads the barrier's store (FOLDFED_STATE_DIR, or --state-dir): the coming "
            "cycle's deadline and each roster member's standing, with the failing check. "
            "Once the cycle started: its members, and why the others are not in it."
        ),
    )
    show.add_argument("--state-dir", default=None, help="default: FOLDFED_STATE_DIR")
    show.add_argument(
        "--cycle", type=int, default=None, help="that cycle's round (default: the latest)"
    )
    show.add_argument("--json", action="store_true", help="one JSON document instead")
    show.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from foldfed.barrier.gating import status
    from foldfed.barrier.store import BarrierStore
    from foldfed.errors import ConfigError
    from foldfed.messages import now_ms
    from foldfed.settings import load

    state_dir = Path(args.state_dir) if args.state_dir else load().state_dir
    path = state_dir / "barrier.sqlite3"
    if not path.exists():
        raise ConfigError(f"no barrier store at {path}: is this the hub's FOLDFED_STATE_DIR?")
    with BarrierStore(path) as store:
        latest = store.latest_round() if args.cycle is None else store.round_of(args.cycle)
        if latest is None:
            print("no gating round: cycles are not gated (FOLDFED_GATED_CYCLES) or not yet")
            return 1
        rnd, decision = latest
        now = now_ms()
        standing = status(rnd, store.readiness(rnd.cycle), decision, now)
    if args.json:
        print(json.dumps(_document(rnd, decision, standing, now), indent=1))
    else:
        print(_text(rnd, decision, standing, now))
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _headline(rnd: Round, decision: Decision | None, now: int) -> list[str]:
    if decision is not None:
        return [
            f"cycle {rnd.cycle}: started at its deadline {_when(decision.deadline_ms)} with "
            f"{len(decision.members)} members: {', '.join(sorted(decision.members))}",
            f"gating for cycle {rnd.cycle + 1} opens when cycle {rnd.cycle} ends",
        ]
    deadline = rnd.next_deadline(now)
    return [
        f"cycle {rnd.cycle}: gating open; θ0 {rnd.theta0.hex()[:16]}..., first step "
        f"{rnd.first_step}",
        f"deadline {_when(deadline)} (in {max(0, deadline - now) / 1000:.0f} s); it starts "
        f"with {rnd.min_members} of {len(rnd.roster)} roster members at least",
    ]


def _text(
    rnd: Round, decision: Decision | None, standing: tuple[MemberStatus, ...], now: int
) -> str:
    width = max(len("member"), *(len(m.participant) for m in standing))
    rows = [f"{'member':<{width}}  {'standing':<8}  detail"]
    rows += [f"{m.participant:<{width}}  {m.standing.value:<8}  {m.detail}" for m in standing]
    return "\n".join([*_headline(rnd, decision, now), "", *rows])


def _document(
    rnd: Round, decision: Decision | None, standing: tuple[MemberStatus, ...], now: int
) -> dict[str, object]:
    return {
        "cycle": rnd.cycle,
        "theta0": rnd.theta0.hex(),
        "first_step": rnd.first_step,
        "min_members": rnd.min_members,
        "opened_ms": rnd.opened_ms,
        "deadline_ms": decision.deadline_ms if decision else rnd.next_deadline(now),
        "started": decision is not None,
        "members": sorted(decision.members) if decision else [],
        "roster": [
            {"participant": m.participant, "standing": m.standing.value, "detail": m.detail}
            for m in standing
        ],
    }

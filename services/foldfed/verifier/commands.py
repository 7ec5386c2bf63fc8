"""`foldfed verify STATE_DIR --keyring K`: check a hub's cycle offline (verifier/state.py).

Prints one line per step (what was recomputed, what is held by signed digests only) and
exits 0, or prints the first break and exits 1. Nothing heavy is imported at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="check a hub's state folder offline: signatures, sums")
    verify.add_argument("state_dir", help="the hub's FOLDFED_STATE_DIR")
    verify.add_argument(
        "--keyring", required=True, help="keyring with every member's key and the key 'hub'"
    )
    verify.add_argument("--initial-model", default=None, help="θ of the first step (optional)")
    verify.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from foldfed.keyfiles import read_keyring
    from foldfed.verifier.state import verify_state

    keyring = read_keyring(Path(args.keyring))
    initial = None if args.initial_model is None else Path(args.initial_model)
    outcome = verify_state(Path(args.state_dir), keyring, initial)
    for line in outcome.steps:
        print(line)
    if not outcome.ok:
        print(f"BROKEN: {outcome.broken}", file=sys.stderr)
        return 1
    print(f"OK: {len(outcome.steps)} steps verified")
    return 0

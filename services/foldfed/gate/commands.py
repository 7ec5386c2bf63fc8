"""`foldfed gate check|verify`: a participant's readiness self-test, and the check of a
readiness record. Who runs what: docs/operating-model.md, "Readiness gating". Nothing
heavy is imported at module level (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from foldfed.gate.checks import SplitTerms
    from foldfed.gate.run import GateOptions


def register(sub: argparse._SubParsersAction) -> None:
    gate = sub.add_parser("gate", help="participant: readiness self-test for the coming cycle")
    actions = gate.add_subparsers(dest="gate_command", required=True)

    check = actions.add_parser(
        "check",
        help="run every readiness check, sign the record, write it and publish it",
        description=(
            "Checks the broker (outbound, own identity, TLS), the clock, the disk for the "
            "retention policy, a timed micro-step of FOLDFED_MODEL, the data card and θ0's "
            "digest; prints a table; writes a signed readiness record and publishes it to "
            "the hub. Exit 1 when any check fails. Reads FOLDFED_AMQP_URL, "
            "FOLDFED_PARTICIPANT, FOLDFED_SPOOL_DIR, FOLDFED_INITIAL_MODEL, "
            "FOLDFED_RETAIN_STEPS and the trainer's settings."
        ),
    )
    check.add_argument("--key", required=True, help="this participant's private key (NAME.key)")
    check.add_argument("--theta0-digest", default=None, help="the cycle's θ0 blake3 (hex)")
    check.add_argument(
        "--after-release",
        default=None,
        metavar="BUNDLE",
        help="gate for the cycle after this published release, from its weights (a late "
        "joiner; instead of --cycle, --theta0-digest and --initial-model)",
    )
    check.add_argument(
        "--keyring",
        default=None,
        help="the consortium keyring (default FOLDFED_CONSORTIUM_KEYRING)",
    )
    check.add_argument(
        "--consortium", default=None, help="the consortium config (TOML): its [split] is checked"
    )
    check.add_argument(
        "--split", default=None, help="this site's split configuration (its sample.json)"
    )
    check.add_argument("--cycle", type=int, default=None, help="default: FOLDFED_CYCLE")
    check.add_argument("--initial-model", default=None, help="default: FOLDFED_INITIAL_MODEL")
    check.add_argument("--datacard", default=None, help="datacard.json of `foldfed data validate`")
    check.add_argument("--data", default=None, help="the data folder the card must describe")
    check.add_argument("--schema-version", default=None, help="default: this foldfed's schema")
    check.add_argument(
        "--hub-clock", default=None, help="a hub URL whose Date header is the reference clock"
    )
    check.add_argument("--max-clock-skew-s", type=float, default=5.0)
    check.add_argument("--max-step-s", type=float, default=None, help="slowest micro-step accepted")
    check.add_argument("--require-tls", action="store_true", help="fail on a plain amqp:// URL")
    check.add_argument("--out", default=None, help="record file (default <spool>/gate/)")
    check.add_argument("--no-publish", action="store_true", help="write the record only")
    check.set_defaults(func=cmd_check)

    publish = actions.add_parser(
        "publish",
        help="send written readiness records to the hub (again)",
        description=(
            "Publishes records that `foldfed gate check` wrote (with --no-publish, or when "
            "the broker could not be reached) as this participant (FOLDFED_AMQP_URL, "
            "FOLDFED_PARTICIPANT). The hub verifies each one; a record's receipt time is "
            "when the barrier gets it."
        ),
    )
    publish.add_argument("record", nargs="+", help="readiness-*.dsse.json")
    publish.set_defaults(func=cmd_publish)

    verify = actions.add_parser("verify", help="check a readiness record's signature")
    verify.add_argument("record", help="a readiness-*.dsse.json")
    verify.add_argument("--keyring", required=True, help="the consortium keyring")
    verify.set_defaults(func=cmd_verify)


def cmd_check(args: argparse.Namespace) -> int:
    from foldfed.gate.checks import summary_table
    from foldfed.gate.run import run_gate

    opts = _options(args)
    if opts.after_release is not None:
        after = opts.after_release
        print(
            f"gating for cycle {after.cycle}: θ0 = the release of step {after.step} "
            f"({after.digest[:16]}..., approved by {', '.join(after.approvers)})"
        )
    run = run_gate(opts, report=lambda what: print(f"checking {what}...", file=sys.stderr))
    print(summary_table(run.results))
    print(f"signed readiness record: {run.path}")
    if args.no_publish:
        print("not published (--no-publish)")
    elif run.publish_error:
        print(f"NOT PUBLISHED: {run.publish_error}")
        return 1
    else:
        print("published to the hub (foldfed.events, uploader.readiness)")
    return 0 if run.ready else 1


def _options(args: argparse.Namespace) -> GateOptions:
    from foldfed.config import BusSettings, spool_dir_of
    from foldfed.errors import ConfigError
    from foldfed.gate.checks import Terms
    from foldfed.gate.run import GateOptions
    from foldfed.keyfiles import read_private_key
    from foldfed.of3.data.schema import SCHEMA_VERSION
    from foldfed.settings import load, required
    from foldfed.trainer.families import trainer_settings_from_env

    settings = load()
    participant = required(settings.participant, "participant")
    after = None
    if args.after_release:
        from foldfed.gate.next_cycle import from_release
        from foldfed.keyfiles import read_keyring

        keyring = required(
            Path(args.keyring) if args.keyring else settings.consortium_keyring,
            "consortium_keyring",
        )
        after = from_release(Path(args.after_release), read_keyring(keyring))
    elif args.theta0_digest is None:
        raise ConfigError("give the cycle's θ0 with --theta0-digest, or --after-release BUNDLE")
    key = read_private_key(Path(args.key))
    if key.name != participant:
        raise ConfigError(
            f"the key is {key.name!r}'s, this participant is {participant!r}: sign with its own key"
        )
    initial = Path(args.initial_model) if args.initial_model else settings.initial_model
    if after is not None:
        initial = after.weights
    try:
        trainer = trainer_settings_from_env()
        if initial is not None:
            trainer = dataclasses.replace(trainer, initial_model=initial)
    except ConfigError as exc:
        trainer = str(exc)
    return GateOptions(
        participant=participant,
        bus=BusSettings.from_settings(settings),
        key=key,
        terms=Terms(
            cycle=after.cycle
            if after
            else args.cycle
            if args.cycle is not None
            else settings.cycle,
            theta0_digest=after.digest if after else args.theta0_digest.lower(),
            schema_version=args.schema_version or SCHEMA_VERSION,
            max_clock_skew_s=args.max_clock_skew_s,
            retain_steps=settings.retain_steps,
            max_step_s=args.max_step_s,
            require_tls=args.require_tls,
            split=_split_terms(Path(args.consortium)) if args.consortium else None,
        ),
        spool_dir=spool_dir_of(settings, participant),
        initial_model=initial,
        trainer=trainer,
        datacard=Path(args.datacard) if args.datacard else None,
        data_dir=Path(args.data) if args.data else None,
        hub_clock=args.hub_clock,
        out=Path(args.out) if args.out else None,
        publish=not args.no_publish,
        split=Path(args.split) if args.split else None,
        after_release=after,
    )


def _cycle(args: argparse.Namespace, default: int) -> int:
    return args.cycle if args.cycle is not None else default


def _split_terms(consortium: Path) -> SplitTerms | None:
    """The consortium config's [split] (its public configuration and expected hash)."""
    import tomllib

    from foldfed.errors import ConfigError
    from foldfed.gate.checks import SplitTerms
    from foldfed.of3.data.split_standard import expected_from_consortium

    try:
        config = tomllib.loads(consortium.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"consortium config {consortium}: unreadable ({exc})") from exc
    expected = expected_from_consortium(config)
    if expected is None:
        return None
    return SplitTerms(expected[0].to_json(), expected[1])


def cmd_publish(args: argparse.Namespace) -> int:
    import asyncio

    from foldfed.config import BusSettings
    from foldfed.dsse import MalformedEnvelope, envelope_from_json
    from foldfed.errors import ConfigError
    from foldfed.gate.run import publish_record
    from foldfed.settings import load, required

    settings = load()
    participant = required(settings.participant, "participant")
    bus = BusSettings.from_settings(settings)
    for name in args.record:
        try:
            envelope = envelope_from_json(json.loads(Path(name).read_text()))
            predicate = envelope.payload_json()["predicate"]
            cycle, owner = int(predicate["cycle"]), predicate["participant"]
            failed = sum(c.get("result") == "fail" for c in predicate["checks"])
        except (OSError, ValueError, KeyError, TypeError, MalformedEnvelope) as exc:
            raise ConfigError(f"{name}: not a readiness record ({exc})") from exc
        if owner != participant:
            raise ConfigError(f"{name} is {owner!r}'s record; this participant is {participant!r}")
        error = asyncio.run(publish_record(bus, participant, envelope, cycle, failed))
        if error:
            print(f"NOT PUBLISHED {name}: {error}")
            return 1
        print(f"published {name} (cycle {cycle}) to the hub (foldfed.events, uploader.readiness)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from foldfed.gate.record import RecordRefused, verify_record
    from foldfed.keyfiles import read_keyring

    try:
        document = json.loads(Path(args.record).read_text())
    except (OSError, ValueError) as exc:
        print(f"foldfed gate verify: REFUSED: unreadable record ({exc})", file=sys.stderr)
        return 1
    try:
        record = verify_record(document, read_keyring(Path(args.keyring)).keys)
    except RecordRefused as exc:
        print(f"foldfed gate verify: REFUSED: {exc}", file=sys.stderr)
        return 1
    state = "READY" if record.ready else f"NOT READY (failed: {', '.join(record.failed_checks())})"
    print(f"verified: {record.participant} is {state} for cycle {record.cycle}")
    return 0

"""`foldfed health`, `foldfed broker-definitions`, `foldfed initial-model`, `foldfed
signing-key` and `foldfed install-key`: the commands a container deployment runs besides
the services (probes and one-shot init steps)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_health(args: argparse.Namespace) -> int:
    from foldfed.health import probe, probe_url

    url = probe_url(args.url, args.port, not args.live, os.environ)
    status, body = probe(url, timeout=args.timeout)
    print(body.rstrip("\n") if status else body, flush=True)
    if status != 200:
        print(f"foldfed health: {url} answered {status or 'nothing'}", file=sys.stderr)
        return 1
    return 0


def cmd_broker_definitions(args: argparse.Namespace) -> int:
    from foldfed.deploy import definitions as d
    from foldfed.durable import atomic_write
    from foldfed.errors import ConfigError

    urls: list[str] = list(args.url)
    for path in args.env_file:
        text = _read(Path(path))
        urls.append(d.url_of_env(d.parse_env_file(text, path), path))
    for path in args.url_file:
        urls.append(_read(Path(path)).strip())
    for folder in args.url_dir:
        # A mounted Kubernetes Secret: one file per key; its `..data` entries are skipped.
        files = sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
        if not files:
            raise ConfigError(f"--url-dir {folder}: no URL file in it")
        urls.extend(_read(p).strip() for p in files if p.is_file())
    if not urls:
        raise ConfigError("broker-definitions needs --env-file, --url-file, --url-dir or --url")
    users = [d.user_of_url(url, args.hub_user) for url in urls]
    document = d.definitions(users)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    # The broker runs as another user: it must be able to read the file.
    out.chmod(0o644)
    names = ", ".join(u["name"] for u in document["users"])  # type: ignore[index,union-attr]
    print(f"wrote {out}: users {names}", flush=True)
    return 0


def _read(path: Path) -> str:
    from foldfed.errors import ConfigError

    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def cmd_initial_model(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.if_missing and out.is_file():
        print(f"{out} exists: kept", flush=True)
        return 0
    from foldfed.settings import load
    from foldfed.trainer.families import load_family

    settings = load()  # a bad variable fails before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else settings.seed
    # mlp: the seeded demo task; OpenFold3 (the of3 extra): the seeded preset, or
    # FOLDFED_OF3_CHECKPOINT; any family: what its `write_initial_model` writes.
    family = load_family(settings.model)
    digest = family.write_initial_model(out, settings, seed)
    print(f"wrote {out}: model digest {digest.hex()}", flush=True)
    return 0


def cmd_signing_key(args: argparse.Namespace) -> int:
    from foldfed.deploy.signingkeys import provision
    from foldfed.errors import ConfigError
    from foldfed.settings import load
    from foldfed.topology import HUB_ID

    if args.members:
        members = [m.strip() for m in args.members.split(",") if m.strip()]
    else:  # the cycle's participants, then the hub: the keyring `foldfed demo` makes
        participants = load().participants
        if not participants:
            raise ConfigError("signing-key needs --members or FOLDFED_PARTICIPANTS")
        members = [*participants, HUB_ID]
    provision(
        args.name,
        members,
        Path(args.keys_dir),
        Path(args.public_dir),
        threshold=args.threshold,
        wait_s=args.wait,
        say=lambda line: print(line, flush=True),
    )
    return 0


def cmd_install_key(args: argparse.Namespace) -> int:
    from foldfed.deploy.signingkeys import install

    key = install(Path(args.source), Path(args.out))
    print(f"installed {args.out}: {key.name}, keyid {key.keyid}", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = sub.add_parser(
        "health", help="probe a service's /readyz (or /healthz): exit 0 when it answers 200"
    )
    health.add_argument("--url", default=None, help="full URL (default: localhost)")
    health.add_argument("--port", type=int, default=None, help="default: FOLDFED_HEALTH_PORT")
    health.add_argument("--live", action="store_true", help="/healthz instead of /readyz")
    health.add_argument("--timeout", type=float, default=10.0, help="seconds")
    health.set_defaults(func=cmd_health)

    defs = sub.add_parser(
        "broker-definitions",
        help="RabbitMQ definitions (users, least-privilege permissions) from AMQP URLs",
    )
    defs.add_argument("--out", required=True, help="definitions JSON to write")
    defs.add_argument(
        "--env-file", action="append", default=[], help="env file with FOLDFED_AMQP_URL"
    )
    defs.add_argument("--url-file", action="append", default=[], help="file holding one AMQP URL")
    defs.add_argument(
        "--url-dir", action="append", default=[], help="folder of URL files (a Secret)"
    )
    defs.add_argument("--url", action="append", default=[], help="an AMQP URL")
    defs.add_argument("--hub-user", default="foldfed-hub", help="the hub services' user")
    defs.set_defaults(func=cmd_broker_definitions)

    model = sub.add_parser(
        "initial-model",
        help="write θ_0 of FOLDFED_MODEL (seeded: every party computes the same bytes)",
    )
    model.add_argument("--out", required=True)
    model.add_argument("--seed", type=int, default=None, help="default: FOLDFED_SEED or 0")
    model.add_argument("--if-missing", action="store_true", help="keep an existing file")
    model.set_defaults(func=cmd_initial_model)

    signing = sub.add_parser(
        "signing-key",
        help="keep or make this party's Ed25519 key, share its public key, write the keyring",
    )
    signing.add_argument("name", help="this party: its participant id, or hub")
    signing.add_argument("--keys-dir", required=True, help="folder of NAME.key and the keyring")
    signing.add_argument("--public-dir", required=True, help="folder the parties' .pub share")
    signing.add_argument(
        "--members", default="", help="comma-separated (default: FOLDFED_PARTICIPANTS, hub)"
    )
    signing.add_argument("--threshold", type=int, default=1, help="M approvals (keyring)")
    signing.add_argument("--wait", type=float, default=600.0, help="seconds to wait for keys")
    signing.set_defaults(func=cmd_signing_key)

    install = sub.add_parser(
        "install-key", help="copy a private key file (e.g. a Secret's) to a 0600 file"
    )
    install.add_argument("source", help="the private key file to copy")
    install.add_argument("--out", required=True, help="where the service reads it")
    install.set_defaults(func=cmd_install_key)

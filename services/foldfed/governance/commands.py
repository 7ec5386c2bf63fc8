"""`foldfed keys ...` and `foldfed checkpoint propose|approve|publish|verify`.

The release process and who runs which command: docs/operating-model.md. Nothing heavy
is imported (`foldfed --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    _register_keys(sub)
    _register_checkpoint(sub)


def _register_keys(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="Ed25519 signing keys and the consortium keyring")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    generate = actions.add_parser("generate", help="a new key pair: NAME.key (0600), NAME.pub")
    generate.add_argument("name", help="the party's name, e.g. company-a")
    generate.add_argument("--out", default=".", help="folder for NAME.key and NAME.pub")
    generate.set_defaults(func=cmd_keys_generate)
    keyring = actions.add_parser("keyring", help="the consortium keyring from public keys")
    keyring.add_argument("public", nargs="+", help="NAME.pub files, one per party")
    keyring.add_argument("--threshold", type=int, required=True, help="M approvals needed")
    keyring.add_argument("--out", required=True, help="keyring file to write")
    keyring.set_defaults(func=cmd_keys_keyring)


def _register_checkpoint(sub: argparse._SubParsersAction) -> None:
    checkpoint = sub.add_parser("checkpoint", help="release a checkpoint with M-of-N approvals")
    actions = checkpoint.add_subparsers(dest="checkpoint_command", required=True)

    propose = actions.add_parser("propose", help="propose a safetensors checkpoint for release")
    propose.add_argument("weights", help="the checkpoint (safetensors θ file)")
    propose.add_argument("--cycle", type=int, required=True)
    propose.add_argument("--step", type=int, required=True)
    propose.add_argument("--note", default="", help="free text for the approvers")
    propose.add_argument("--out", required=True, help="proposal file to write")
    propose.set_defaults(func=cmd_propose)

    approve = actions.add_parser("approve", help="sign a proposal with your evaluation")
    approve.add_argument("proposal", help="the proposal file")
    approve.add_argument("--weights", required=True, help="your copy of the weights")
    approve.add_argument("--key", required=True, help="your private key file")
    approve.add_argument("--evaluation", required=True, help="your evaluation summary (JSON)")
    approve.add_argument("--out", required=True, help="approval file to write")
    approve.set_defaults(func=cmd_approve)

    publish = actions.add_parser("publish", help="bundle the weights with M-of-N approvals")
    publish.add_argument("proposal", help="the proposal file")
    publish.add_argument("approvals", nargs="+", help="approval files")
    publish.add_argument("--weights", required=True, help="the weights file")
    publish.add_argument("--keyring", required=True, help="the consortium keyring")
    publish.add_argument("--key", required=True, help="the publisher's private key")
    publish.add_argument("--out", required=True, help="bundle folder to write")
    publish.set_defaults(func=cmd_publish)

    verify = actions.add_parser("verify", help="check a published bundle; non-zero if invalid")
    verify.add_argument("bundle", help="the bundle folder")
    verify.add_argument("--keyring", required=True, help="the consortium keyring")
    verify.add_argument(
        "--weights", default=None, help="check this weights file (default: the bundle's)"
    )
    verify.set_defaults(func=cmd_verify)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from foldfed.keyfiles import write_private_key, write_public_key
    from foldfed.signing import SigningKey

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{args.name}.key", out / f"{args.name}.pub"
    if private.exists():
        from foldfed.errors import ConfigError

        raise ConfigError(f"{private} exists: a key is never overwritten")
    key = SigningKey.generate(args.name)
    write_private_key(private, key)
    write_public_key(public, key.verify_key())
    print(f"{args.name}: keyid {key.keyid}\nprivate {private} (keep it here)\npublic {public}")
    return 0


def cmd_keys_keyring(args: argparse.Namespace) -> int:
    from foldfed.keyfiles import read_public_key, write_keyring
    from foldfed.signing import Keyring

    keyring = Keyring(tuple(read_public_key(Path(p)) for p in args.public), args.threshold)
    write_keyring(Path(args.out), keyring)
    print(f"keyring {args.out}: {len(keyring.keys)} keys, threshold {keyring.threshold}")
    return 0


def cmd_propose(args: argparse.Namespace) -> int:
    from foldfed.governance.bundle import safetensors_tensor_count, weights_digest, write_json
    from foldfed.governance.release import Proposal

    weights = Path(args.weights)
    tensors = safetensors_tensor_count(weights)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    proposal = Proposal(weights_digest(weights), args.cycle, args.step, tensors, now, args.note)
    write_json(Path(args.out), proposal.to_json())
    print(
        f"proposed {weights.name} (cycle {args.cycle}, step {args.step}, {tensors} tensors, "
        f"blake3 {proposal.weights.blake3}): {args.out}"
    )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from foldfed.errors import ConfigError
    from foldfed.governance.bundle import read_json, weights_digest, write_json
    from foldfed.governance.release import approve, proposal_from_json
    from foldfed.keyfiles import read_private_key

    proposal = proposal_from_json(read_json(Path(args.proposal), "proposal"))
    evaluation = read_json(Path(args.evaluation), "evaluation summary")
    if not isinstance(evaluation, dict):
        raise ConfigError(f"evaluation summary {args.evaluation}: not a JSON object")
    # A company signs what it evaluated: its own copy must be the proposed weights.
    if not weights_digest(Path(args.weights)).same_content(proposal.weights):
        raise ConfigError(f"{args.weights} is not the proposed checkpoint (digest differs)")
    key = read_private_key(Path(args.key))
    write_json(Path(args.out), approve(proposal, evaluation, key).to_json())
    print(f"{key.name} approved {proposal.weights.name} (step {proposal.step}): {args.out}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from foldfed.governance.bundle import read_envelope, read_json, weights_digest, write_bundle
    from foldfed.governance.release import ReleaseRefused, assemble_release, proposal_from_json
    from foldfed.keyfiles import read_keyring, read_private_key

    proposal = proposal_from_json(read_json(Path(args.proposal), "proposal"))
    approvals = [read_envelope(Path(p), "approval") for p in args.approvals]
    keyring = read_keyring(Path(args.keyring))
    weights = Path(args.weights)
    if not weights_digest(weights).same_content(proposal.weights):
        raise ReleaseRefused(f"{weights} is not the proposed checkpoint (digest differs)")
    release = assemble_release(proposal, approvals, keyring, read_private_key(Path(args.key)))
    target = write_bundle(Path(args.out), weights, proposal.weights.name, release)
    print(f"published {target} with {len(approvals)} approvals: {Path(args.out)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from foldfed.errors import FoldfedError
    from foldfed.governance.bundle import bundle_weights, read_bundle, weights_digest
    from foldfed.governance.release import judge
    from foldfed.keyfiles import read_keyring

    keyring = read_keyring(Path(args.keyring))  # a bad keyring is a usage error (exit 2)
    folder = Path(args.bundle)
    try:
        release = read_bundle(folder)
        weights = Path(args.weights) if args.weights else bundle_weights(folder, release)
    except FoldfedError as exc:
        print(f"foldfed checkpoint verify: REFUSED: {exc}", file=sys.stderr)
        return 1
    if not weights.is_file():
        print(f"foldfed checkpoint verify: REFUSED: no weights file {weights}", file=sys.stderr)
        return 1
    local = weights_digest(weights)
    verdict = judge(release, local, keyring)
    if not verdict.valid:
        print(f"foldfed checkpoint verify: REFUSED: {verdict.reason}", file=sys.stderr)
        return 1
    print(f"verified {weights}: {verdict.reason}")
    print(json.dumps({"approvers": list(verdict.approvers), "blake3": local.blake3}))
    return 0

"""The data card: the only thing about a party's data that leaves it, aggregates only.

A card holds the schema version, how many structures were validated and how many are
valid, per check the counts passed/failed/skipped and the pass rate (passed over passed +
failed; a skipped check is not applicable and counts for neither), the digest of the
inclusion criteria applied, and the digest of the local manifest. It never holds a file
name, an entry id, a per-file digest or a failure reason: those stay in the local report.

The manifest digest is blake3 over the sorted 32-byte blake3 digests of the input files,
concatenated. Sorting makes it independent of file names and of the order files were
read; any changed byte in any input changes it, so a party can later show which data a
card describes without revealing the data.

A card is signed with its party's Ed25519 key (`sign_card`) over
`PAE("application/vnd.foldfed.datacard+json", canonical JSON of the card without its
"signature" and "signature_status" fields)`: the DSSE pre-authentication encoding
(`foldfed.dsse`), so a card signature can never pass for another kind of document. The
signature is kept in the card itself, which stays one plain JSON file; `verify_card`
checks it against the consortium's public keys. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from foldfed.digests import digest_of
from foldfed.dsse import pae
from foldfed.errors import IntegrityError
from foldfed.of3.data.schema import (
    CHECKS,
    SCHEMA_VERSION,
    CheckResult,
    InclusionCriteria,
    Outcome,
    is_valid,
)
from foldfed.signing import ALGORITHM, SigningKey, VerifyKey, canonical_json

DATACARD_FORMAT = "foldfed.datacard/1"
PAYLOAD_TYPE = "application/vnd.foldfed.datacard+json"
SIGNATURE_FIELDS = ("signature", "signature_status")
# A card written without --key says so instead of carrying a signature.
UNSIGNED = "unsigned: written without --key (see docs/data_schema.md)"
SIGNED = "signed: ed25519 over PAE(payload type, canonical card without signature fields)"


class CardSignatureError(IntegrityError):
    """A data card whose signature is missing, foreign or does not verify."""


def manifest_digest(file_digests: Iterable[bytes]) -> str:
    """blake3 (hex) over the sorted file digests: the local manifest's fingerprint."""
    return digest_of(b"".join(sorted(file_digests))).hex()


def check_counts(reports: Sequence[Sequence[CheckResult]]) -> dict[str, dict[str, Any]]:
    """Per check (schema order): passed, failed, skipped and the pass rate (None if the
    check applied to no structure)."""
    counts: dict[str, dict[str, Any]] = {}
    for spec in CHECKS:
        tally = {o.value: 0 for o in Outcome}
        for results in reports:
            for r in results:
                if r.check == spec.id:
                    tally[r.outcome.value] += 1
        judged = tally["passed"] + tally["failed"]
        tally_out: dict[str, Any] = dict(tally)
        tally_out["pass_rate"] = round(tally["passed"] / judged, 4) if judged else None
        counts[spec.id] = tally_out
    return counts


def build_card(
    reports: Sequence[Sequence[CheckResult]],
    file_digests: Sequence[bytes],
    criteria: InclusionCriteria,
    tools: Mapping[str, str],
) -> dict[str, Any]:
    """The data card of one validation run (see the module docstring)."""
    if len(reports) != len(file_digests):
        raise ValueError("one report per file digest")
    valid = sum(1 for results in reports if is_valid(results))
    return {
        "format": DATACARD_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "structures": len(reports),
        "valid": valid,
        "valid_rate": round(valid / len(reports), 4) if reports else None,
        "checks": check_counts(reports),
        "inclusion_criteria_blake3": criteria.digest(),
        "manifest_blake3": manifest_digest(file_digests),
        "tools": dict(sorted(tools.items())),
        "signature": None,
        "signature_status": UNSIGNED,
    }


def pass_rate_table(card: Mapping[str, Any]) -> str:
    """The card's per-check pass rates as a readable table."""
    lines = [
        f"{'check':<22} {'group':<12} {'pass':>5} {'fail':>5} {'skip':>5} {'rate':>7}  threshold"
    ]
    for spec in CHECKS:
        c = card["checks"][spec.id]
        rate = "-" if c["pass_rate"] is None else f"{100 * c['pass_rate']:.1f}%"
        lines.append(
            f"{spec.id:<22} {spec.group:<12} {c['passed']:>5} {c['failed']:>5} "
            f"{c['skipped']:>5} {rate:>7}  {spec.threshold}"
        )
    lines.append(
        f"{card['valid']} of {card['structures']} structures valid "
        f"(schema {card['schema_version']}, manifest blake3 {card['manifest_blake3'][:16]}...)"
    )
    return "\n".join(lines)


def signed_bytes(card: Mapping[str, Any]) -> bytes:
    """The exact bytes a card's signature covers (see the module docstring)."""
    body = {k: v for k, v in card.items() if k not in SIGNATURE_FIELDS}
    return pae(PAYLOAD_TYPE, canonical_json(body))


def sign_card(card: Mapping[str, Any], key: SigningKey) -> dict[str, Any]:
    """`card` signed by `key`: the same card with its signature fields filled in."""
    signature = base64.standard_b64encode(key.sign(signed_bytes(card))).decode("ascii")
    return {
        **card,
        "signature": {"alg": ALGORITHM, "keyid": key.keyid, "sig": signature},
        "signature_status": SIGNED,
    }


def verify_card(card: Mapping[str, Any], keys: Iterable[VerifyKey]) -> VerifyKey:
    """The key, among `keys`, that signed `card`; `CardSignatureError` says why not."""
    signature = card.get("signature")
    if not isinstance(signature, dict):
        raise CardSignatureError("the data card is unsigned")
    if signature.get("alg") != ALGORITHM:
        raise CardSignatureError(f"the data card's signature is not {ALGORITHM}")
    keyid = signature.get("keyid")
    key = next((k for k in keys if k.keyid == keyid), None)
    if key is None:
        raise CardSignatureError(f"the data card is signed by an unknown key ({keyid!s:.16})")
    try:
        sig = base64.b64decode(str(signature.get("sig")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CardSignatureError("the data card's signature is not base64") from exc
    try:
        message = signed_bytes(card)
    except ValueError as exc:  # NaN or infinity (json.loads reads them), a lone surrogate
        raise CardSignatureError(f"the data card has no canonical JSON form ({exc})") from None
    if not key.verify(message, sig):
        raise CardSignatureError(
            f"the data card's signature by {key.name} does not verify: the card was changed"
        )
    return key

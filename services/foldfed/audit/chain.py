"""How a cycle's signed records, signed manifests and stored files are checked against
each other: facts in, the first break out. Pure (no files: `foldfed.verifier.state` reads
them and hands the bytes and digests over).

What holds when every check passes (docs/threat-model.md, "Audit trail"):

1. every step record is the hub's: a DSSE envelope of RECORD_TYPE whose signature
   verifies with the keyring's key named `hub`;
2. the records form one chain: steps follow each other, and each step's θ_t is the θ_{t+1}
   of the step before (`model_before` = previous `model_after`);
3. every member's manifest named by a record is stored, is the very bytes the record
   names (blake3 = the record's id), is signed by that member's key, claims the weight the
   record counted, and was trained from the record's θ_t;
4. every stored model and update file hashes to the digest its record names (a file
   retention deleted is accounted for by the chain alone).

The arithmetic checks (θ_{t+1} = θ_t + U_t, and U_t = the aggregate of the contributions)
need the files and the aggregation code: `foldfed.verifier` does them and reports a break here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

from foldfed.audit.record import RecordError, StepRecord, record_from_json
from foldfed.audit.signatures import RECORD_TYPE, manifest_signature_problem
from foldfed.domain import Manifest
from foldfed.dsse import Envelope, MalformedEnvelope
from foldfed.errors import IntegrityError
from foldfed.signing import VerifyKey


class Break(IntegrityError):
    """The first thing that does not hold; its message names the step and what broke."""


def open_record(envelope: Envelope, hub_key: VerifyKey, step: int) -> StepRecord:
    """The record in `envelope` (the file of step `step`), checked to be the hub's."""
    if envelope.payload_type != RECORD_TYPE:
        raise Break(f"step {step}: the record's payload type is {envelope.payload_type!r}")
    signed = any(envelope.signature_verifies(s, hub_key) for s in envelope.signatures)
    if not signed:
        raise Break(f"step {step}: the record is not signed by the hub's key ({hub_key.name})")
    try:
        record = record_from_json(envelope.payload_json())
    except (RecordError, MalformedEnvelope) as exc:
        raise Break(f"step {step}: the record is malformed ({exc})") from None
    if record.step != step:
        raise Break(f"step {step}: the record's file holds step {record.step}")
    return record


def check_chain(records: Sequence[StepRecord]) -> None:
    """Steps follow each other and each starts from the model the one before made."""
    if not records:
        raise Break("no step records in the state folder")
    for before, after in pairwise(records):
        if after.step != before.step + 1:
            raise Break(f"step {before.step + 1}: its record is missing")
        if after.model_before != before.model_after:
            raise Break(
                f"step {after.step}: starts from model {after.model_before[:12]}, but step "
                f"{before.step} made {before.model_after[:12]}"
            )


def check_contribution(
    record: StepRecord,
    participant: str,
    stored_id: bytes | None,
    manifest: Manifest | None,
    unsigned: bytes,
    keys: Mapping[str, VerifyKey],
) -> None:
    """Member `participant`'s manifest for `record`'s step, as stored: `stored_id` is the
    blake3 of the stored bytes (None: none stored), `manifest` their decoding (None: they
    do not decode) and `unsigned` its canonical bytes without signature."""
    where = f"step {record.step}: manifest of {participant!r}"
    if stored_id is None:
        raise Break(f"{where} is missing from the store")
    if stored_id.hex() != record.manifest_of()[participant]:
        raise Break(f"{where} is not the one the record names (its bytes changed)")
    if manifest is None:
        raise Break(f"{where} does not decode")
    if manifest.step != record.step or manifest.participant != participant:
        raise Break(f"{where} claims step {manifest.step} of {manifest.participant!r}")
    problem = manifest_signature_problem(participant, unsigned, manifest.signature, keys)
    if problem:
        raise Break(f"step {record.step}: {problem}")
    if manifest.weight != record.weight_of()[participant]:
        raise Break(f"{where} claims weight {manifest.weight!r}, the record counted another")
    if manifest.base_model_digest and manifest.base_model_digest.hex() != record.model_before:
        raise Break(f"{where} was not trained from the record's θ_{record.step}")


def check_file(step: int, what: str, actual: bytes | None, expected: str) -> bool:
    """Whether the file was there to check (None: deleted by retention); Break if it is
    there and does not hash to `expected`."""
    if actual is None:
        return False
    if actual.hex() != expected:
        raise Break(f"step {step}: {what} does not hash to the digest the record names")
    return True

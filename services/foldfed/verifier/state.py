"""`foldfed verify STATE_DIR --keyring K`: a hub's whole state folder checked offline.

The shell around `foldfed.audit.chain`: it reads the records, manifests, chunks, models
and updates a hub keeps (layout: aggregator/service.py and chunkstore.py), never writes
there, and stops at the first break. Per step, in order:

1. the step record is the hub's (signature by the keyring's `hub` key) and the records
   chain (chain.open_record, chain.check_chain);
2. every member's manifest is the one the record names, signed by that member
   (chain.check_contribution);
3. each of θ_t, U_t and θ_{t+1} still stored hashes to the record's digest; with all
   three, θ_{t+1} = θ_t + U_t is recomputed tensor by tensor in each tensor's dtype
   (`aggregation.dtypes.add_in_dtype`, as the hub and torch add);
4. with θ_t and every member's chunks still stored, U_t is recomputed from the signed
   contributions with the aggregator's own code (its running sum, `AggregationSink`, and
   `finalize_step`), and must hash to the record's U_t. Each chunk must hash to the digest
   its signed manifest lists.

What retention deleted is said per step: the step is then held by its digests alone,
chained through the signed records (a changed file can no longer be detected because it
is gone, but no record can be changed without breaking the hub's signature, and no
manifest without breaking its member's).

Under secure aggregation (masked-ring contributions, foldfed.secagg) step 4 is the same
with the masked chunks: the aggregator's sink sums them on the ring, where the pairwise
masks cancel, so the stored masked contributions must sum to the exact Q behind U_t; the
verifier, like the hub, never sees a member's plaintext.

Not recomputed (said so per step): U_t of a server optimizer with state (FedAvgM,
FedAdam), of a lossy downlink (error feedback), or of a codec with shared ranges; their
U_t is held by its digest in the signed record.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foldfed.aggregation import finalize_step, weight_total
from foldfed.aggregation.dtypes import STORAGE, add_in_dtype
from foldfed.aggregation.finalize import FinalizeResult
from foldfed.aggregation.server_opt import ServerOptimizer
from foldfed.aggregator.sink import AggregationSink
from foldfed.audit.chain import Break, check_chain, check_contribution, check_file, open_record
from foldfed.audit.record import RECORDS_DIR, StepRecord, record_file_bytes
from foldfed.codecs import codec_from_spec
from foldfed.codedvector import shared_rule
from foldfed.digests import digest_of, file_digest
from foldfed.domain import REFERENCE_CODEC, Manifest
from foldfed.dsse import MalformedEnvelope, envelope_from_json
from foldfed.errors import FoldfedError
from foldfed.messages import decode, unsigned_bytes
from foldfed.payloadfile import read_layout, read_range
from foldfed.signing import Keyring, VerifyKey
from foldfed.topology import HUB_ID


@dataclass
class Outcome:
    """One line per step checked (what was recomputed, what only chained), and the first
    break ("" when the whole cycle holds)."""

    steps: list[str] = field(default_factory=list)
    broken: str = ""

    @property
    def ok(self) -> bool:
        return not self.broken


def verify_state(state_dir: Path, keyring: Keyring, initial_model: Path | None = None) -> Outcome:
    """Check every step record in `state_dir`; `initial_model`: θ of the first step, which
    the hub reads from outside its state folder (FOLDFED_INITIAL_MODEL)."""
    outcome = Outcome()
    keys = {key.name: key for key in keyring.keys}
    try:
        hub_key = keys.get(HUB_ID)
        if hub_key is None:
            raise Break(f"the keyring has no key named {HUB_ID!r} (the hub's)")
        records = _records(state_dir, hub_key)
        check_chain(records)
        for record in records:
            first = initial_model if record is records[0] else None
            outcome.steps.append(_check_step(state_dir, record, keys, first))
    except Break as exc:
        outcome.broken = str(exc)
    return outcome


def _records(state_dir: Path, hub_key: VerifyKey) -> list[StepRecord]:
    records = []
    for path in sorted((state_dir / RECORDS_DIR).glob("step-*.dsse.json")):
        step = _step_of(path)
        raw = path.read_bytes()
        try:
            envelope = envelope_from_json(_json(raw))
        except MalformedEnvelope as exc:
            raise Break(f"step {step}: the record is not a DSSE envelope ({exc})") from None
        record = open_record(envelope, hub_key, step)
        # Bytes the signature does not cover (spacing, base64 padding bits) must not change
        # either: a record file is exactly what the hub writes.
        if raw != record_file_bytes(envelope):
            raise Break(f"step {step}: the record file is not as the hub wrote it")
        records.append(record)
    return records


def _step_of(path: Path) -> int:
    digits = path.name.removeprefix("step-").removesuffix(".dsse.json")
    if not digits.isdigit():
        raise Break(f"{path.name}: not a step record's name")
    return int(digits)


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedEnvelope(f"not JSON: {exc}") from None


def _check_step(
    state_dir: Path, record: StepRecord, keys: dict[str, VerifyKey], initial: Path | None
) -> str:
    step = record.step
    manifests = {p: _contribution(state_dir, record, p, keys) for p in record.members}
    before = _model(state_dir, step) if initial is None else initial
    after = _model(state_dir, step + 1)
    update = state_dir / "updates" / f"update-{step:012d}.safetensors"
    has_before = check_file(step, f"θ_{step} ({before.name})", _digest(before), record.model_before)
    has_after = check_file(step, f"θ_{step + 1} ({after.name})", _digest(after), record.model_after)
    has_update = check_file(
        step, f"U_{step} ({update.name})", _digest(update), record.update_digest
    )
    notes = [f"step {step}: {len(manifests)} signed contributions"]
    if has_before and has_update and has_after:
        _check_sum(step, before, update, after)
        notes.append("θ_{t+1} = θ_t + U_t recomputed")
    else:
        notes.append("θ_{t+1} = θ_t + U_t held by the signed digests (files deleted)")
    notes.append(_check_aggregate(state_dir, record, manifests, before if has_before else None))
    return "; ".join(notes)


def _contribution(
    state_dir: Path, record: StepRecord, participant: str, keys: dict[str, VerifyKey]
) -> Manifest:
    path = state_dir / "store" / "manifests" / f"{record.step:012d}" / f"{participant}.manifest"
    raw = path.read_bytes() if path.is_file() else None
    manifest: Manifest | None = None
    unsigned = b""
    if raw is not None:
        try:
            decoded = decode("foldfed.v1.DeltaManifest", raw)
        except FoldfedError:
            decoded = None
        if isinstance(decoded, Manifest):
            manifest, unsigned = decoded, unsigned_bytes(decoded)
    stored_id = None if raw is None else digest_of(raw)
    check_contribution(record, participant, stored_id, manifest, unsigned, keys)
    assert manifest is not None  # check_contribution breaks otherwise
    return manifest


def _model(state_dir: Path, step: int) -> Path:
    return state_dir / "models" / f"model-{step:012d}.safetensors"


def _digest(path: Path) -> bytes | None:
    return file_digest(path) if path.is_file() else None


def _check_sum(step: int, before: Path, update: Path, after: Path) -> None:
    """θ_{t+1} = θ_t + U_t, tensor by tensor, bit for bit."""
    try:
        spans = {s.name: s for s in read_layout(before)}
        updates = {s.name: s for s in read_layout(update)}
        results = {s.name: s for s in read_layout(after)}
    except FoldfedError as exc:
        raise Break(f"step {step}: a model or update file does not parse ({exc})") from None
    if not spans.keys() == updates.keys() == results.keys():
        raise Break(f"step {step}: θ_t, U_t and θ_(t+1) name different tensors")
    for name, span in spans.items():
        dtype = span.dtype
        if dtype not in STORAGE or updates[name].dtype != dtype or results[name].dtype != dtype:
            raise Break(f"step {step}: tensor {name!r} has another dtype in θ_t, U_t or θ_(t+1)")
        base = _values(before, span.begin, span.end, dtype)
        delta = _values(update, updates[name].begin, updates[name].end, dtype)
        made = _values(after, results[name].begin, results[name].end, dtype)
        if base.shape != delta.shape or base.shape != made.shape:
            raise Break(f"step {step}: tensor {name!r} has another shape in θ_t, U_t or θ_(t+1)")
        if add_in_dtype(base, delta, dtype).tobytes() != made.tobytes():
            raise Break(f"step {step}: θ_(t+1) is not θ_t + U_t (tensor {name!r} differs)")


def _values(path: Path, begin: int, end: int, dtype: str) -> np.ndarray:
    return np.frombuffer(read_range(path, begin, end), dtype=STORAGE[dtype])


def _check_aggregate(
    state_dir: Path, record: StepRecord, manifests: dict[str, Manifest], before: Path | None
) -> str:
    """U_t recomputed from the stored signed contributions, when everything it needs is
    kept; else why it is held by its digest only."""
    step = record.step
    if before is None:
        return "U_t held by its signed digest (θ_t deleted)"
    if record.optimizer != "fedavg" or record.downlink_codec != REFERENCE_CODEC:
        return f"U_t held by its signed digest ({record.optimizer}, {record.downlink_codec})"
    if record.codec != REFERENCE_CODEC and shared_rule(codec_from_spec(record.codec)):
        return f"U_t held by its signed digest (codec {record.codec} has shared ranges)"
    chunks = {p: _chunks(state_dir, m) for p, m in manifests.items()}
    if any(c is None for c in chunks.values()):
        return "U_t held by its signed digest (contributions' chunks deleted)"
    weight_sum = weight_total([record.weight_of()[p] for p in record.members])
    if weight_sum != record.weight_sum:
        raise Break(f"step {step}: the record's weight sum is not the sum of its weights")
    ring_bits = _ring_of(step, manifests)
    with tempfile.TemporaryDirectory(prefix="foldfed-verify-") as tmp:
        result = _recompute(Path(tmp), record, manifests, chunks, before, weight_sum, ring_bits)
    if result.update_digest.hex() != record.update_digest:
        raise Break(f"step {step}: U_t is not the aggregate of the signed contributions")
    if result.model_digest.hex() != record.model_after:
        raise Break(f"step {step}: θ_(t+1) is not θ_t + the aggregate of the contributions")
    if ring_bits is not None:
        return "U_t recomputed from the signed contributions (masked: their sum on the ring)"
    return "U_t recomputed from the signed contributions"


def _ring_of(step: int, manifests: dict[str, Manifest]) -> int | None:
    """The ring of a masked step's contributions (None: plaintext ones); a Break if they
    mix masked and plain payloads or rings (their masks could not cancel)."""
    kinds = {m.ring_bits if m.masked else None for m in manifests.values()}
    if len(kinds) > 1:
        raise Break(f"step {step}: the contributions mix masked and plain payloads or rings")
    return kinds.pop() if kinds else None


def _chunks(state_dir: Path, m: Manifest) -> list[Path] | None:
    root = state_dir / "store" / "chunks"
    paths = [root / d.hex()[:2] / d.hex() for d in m.chunk_digests]
    return paths if all(p.is_file() for p in paths) else None


def _recompute(
    tmp: Path,
    record: StepRecord,
    manifests: dict[str, Manifest],
    chunks: dict[str, list[Path] | None],
    before: Path,
    weight_sum: float,
    ring_bits: int | None = None,
) -> FinalizeResult:
    sink = AggregationSink(tmp, ring_bits)
    try:
        sink.open_step(record.step, before)
        for participant in record.members:
            m = manifests[participant]
            try:
                sink.check_manifest(m)
            except FoldfedError as exc:
                raise Break(f"step {record.step}: manifest of {participant!r}: {exc}") from None
            for index, path in enumerate(chunks[participant] or []):
                body = path.read_bytes()
                if digest_of(body) != m.chunk_digests[index]:
                    raise Break(
                        f"step {record.step}: chunk {index} of {participant!r} does not hash "
                        "to the digest its signed manifest lists"
                    )
                try:
                    sink.apply(m, index, sink.validate(m, index, body))
                except FoldfedError as exc:
                    where = f"step {record.step}: chunk {index} of {participant!r}"
                    raise Break(f"{where}: {exc}") from None
        layout, accumulator = sink._ready()
        optimizer = ServerOptimizer("fedavg", lr=record.server_lr)
        outputs = (tmp / "update", tmp / "model", optimizer, tmp / "optimizer")
        return finalize_step(layout, accumulator, weight_sum, before, *outputs, step=record.step)
    finally:
        sink.close()

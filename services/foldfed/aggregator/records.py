"""The hub's step records: what the aggregator states, and signs, about each finalized
step (foldfed.audit.record), written beside the manifests and kept for ever.

    records/step-<t:012d>.dsse.json    a DSSE envelope (JSON) of step t's record

Written when the step's files are final and before its StepFinalized goes out, so the
next release (which needs that event) never comes before the record. The first write
wins: a repeated finalize (the barrier asking again after the next step opened) finds the
record and leaves it, because by then the ledger's open step, and so its θ_t, is the
next step's. Without a hub key (FOLDFED_SIGNING_KEY) the record is written unsigned, and
`foldfed verify` reports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from foldfed import dsse
from foldfed.aggregation.server_opt import ServerOptimizer
from foldfed.audit.record import RECORDS_DIR, make_record, record_file_bytes
from foldfed.audit.signatures import RECORD_TYPE
from foldfed.digests import file_digest
from foldfed.domain import Manifest
from foldfed.durable import atomic_write
from foldfed.ingest.ledger import IngestLedger
from foldfed.keyfiles import read_private_key
from foldfed.messages import id_of
from foldfed.signing import SigningKey


def record_path(state_dir: Path, step: int) -> Path:
    return state_dir / RECORDS_DIR / f"step-{step:012d}.dsse.json"


class StepRecorder:
    def __init__(
        self,
        state_dir: Path,
        key_file: Path | None,
        downlink_codec: str,
        optimizer: ServerOptimizer,
    ) -> None:
        self.state_dir = state_dir
        self.key: SigningKey | None = None if key_file is None else read_private_key(key_file)
        self.downlink_codec = downlink_codec
        self.optimizer = optimizer

    def write(
        self,
        ledger: IngestLedger,
        step: int,
        weights: Mapping[str, float],
        weight_sum: float,
        update_file: Path,
        update_manifest: Manifest,
        model_digest: bytes,
    ) -> None:
        """Step `step`'s record, signed, unless it is written already (blocking I/O)."""
        path = record_path(self.state_dir, step)
        if path.exists():
            return
        coding = ledger.coding
        manifests = {p: ledger.facts.accepted_id(step, p) or b"" for p in weights}
        record = make_record(
            cycle=coding.cycle,
            step=step,
            weights=weights,
            weight_sum=weight_sum,
            manifests=manifests,
            model_before=ledger.model_digest,
            model_after=model_digest,
            update_digest=file_digest(update_file),
            update_manifest=id_of(update_manifest),
            codec=coding.spec,
            downlink_codec=self.downlink_codec,
            optimizer=self.optimizer.kind,
            server_lr=self.optimizer.lr,
        )
        keys = [] if self.key is None else [self.key]
        envelope = dsse.sign(RECORD_TYPE, record.payload(), keys)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, record_file_bytes(envelope))

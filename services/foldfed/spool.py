"""The spool: how a participant's trainer and its gateway talk, through files only.

The trainer has no network access at all; the gateway is the participant's only networked
process. They share one local directory, and this module is the whole protocol between
them. It holds no broker, no torch and no protobuf: plain files and JSON.

Layout (`<step>` is the global step as 12 zero-padded decimal digits):

    inbox/update-<step>.safetensors    the global update U_t: θ_t = θ_{t-1} + U_t
    inbox/release-<step>.json          step t is released (written after its update)
    outbox/delta-<step>.safetensors    Δ_t = θ_local - θ_t of this participant
    outbox/delta-<step>.json           Δ_t's description (written after its tensors)
    outbox/model-<step>.json           the digest of θ_t as the trainer built it, + metrics
    outbox/<kind>-<step>.sent          a .json above, renamed by the gateway once sent
    model/model-<step>.safetensors     the trainer's θ_t, canonical bytes (its digest)
    model/current.json                 which snapshot is the trainer's current model

JSON files (UTF-8, one object, each with `"format": 1`, which readers check first):

    release  {"format", "step", "model_digest", "update", "final"[, "weight", "trace",
              "update_trace"]}
             update: file name or null; final: true once the cycle is over (no training);
             weight: the aggregation weight the cycle agreed for this participant
             (absent: none agreed, the delta counts its samples)
    delta    {"format", "step", "tensors", "size", "weight", "base_model_digest", "metrics"
              [, "trace"]}
    model    {"format", "step", "model_digest", "metrics"[, "trace"]}
    current  {"format", "step", "model_digest", "tensors"}

Digests are blake3-256 in lower-case hex. `model_digest` is the digest of θ_t written
canonically by `foldfed.deltafile.write_delta` with no metadata. `metrics` maps names to
numbers; a non-finite value is written as null and read back as NaN. A delta's `weight`
is how much it counts in the weighted mean: its release's agreed weight, else the number
of training samples it used.
`trace` (optional) is the W3C trace context of the span that wrote the file, as
{"traceparent": ..., "tracestate": ...}: the trainer's spans join the step's trace through
the release, the gateway's upload joins it through the delta (docs/tracing.md).
`update_trace` is the context of the update's own step (applying it belongs there).

Rules:
- Every file is written atomically: a temporary file whose name starts with ".", fsync,
  rename to the final name, fsync of the folder. A reader never sees a partial file under
  a final name, and readers ignore names starting with ".".
- A .json's presence means every file it names is complete: data first, .json last.
- The gateway writes inbox/; the trainer deletes `update-<t>` once model t is committed
  (its effect now lives in the snapshot; updates are as big as the model). The trainer
  writes outbox/ and model/; the gateway only renames outbox .json files to .sent, so a
  restarted gateway does not send them again, and may delete sent deltas' tensors
  (`discard_sent_delta`, as its retention policy says: docs/retention.md).
- Releases are applied in step order: release t's update applies to θ_{t-1}.

Everything here blocks (disk, fsync): async callers run it in a worker thread.

One concept, the spool protocol, in one module of over 400 lines: the layout, the records
above and their checks (the field validators at the end) are the protocol's two sides, and
keeping them together keeps every rule next to the code that enforces it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from foldfed.digests import DIGEST_SIZE
from foldfed.durable import atomic_write, fsync_dir
from foldfed.errors import StoreError

FORMAT = 1
OutboxKind = Literal["delta", "model"]
_KINDS: frozenset[str] = frozenset({"delta", "model"})
# W3C trace context fields a `trace` object may hold, and their longest accepted value.
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
_TRACE_VALUE_MAX = 1024


@dataclass(frozen=True)
class Release:
    """Step `step` is open: build θ_t (apply `update_path`, if any) and train from it."""

    step: int
    model_digest: bytes
    update_path: Path | None
    # The cycle is over: build θ_t and report it, train no more.
    final: bool = False
    # The weight the cycle agreed for this participant (None: none, count the samples).
    weight: float | None = None
    # Trace context of this step's release, and of the step whose update this applies.
    trace: Mapping[str, str] = field(default_factory=dict)
    update_trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeltaRecord:
    """A complete delta in the outbox, as the gateway sends it."""

    step: int
    path: Path
    size: int
    weight: float
    base_model_digest: bytes
    metrics: dict[str, float]
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelReport:
    """The digest of θ_t as this participant built it; every participant's must agree."""

    step: int
    model_digest: bytes
    metrics: dict[str, float]
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CurrentModel:
    """The trainer's committed model: θ_step, stored canonically at `path`."""

    step: int
    model_digest: bytes
    path: Path


def _name(prefix: str, step: int, suffix: str) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"{prefix}-{step:012d}{suffix}"


class Spool:
    """One participant's spool directory; creates its folders when missing.

    `trace_carrier`, if given, returns the current span's trace context; files written
    without an explicit `trace` get it (the trainer's spans, around its stages)."""

    def __init__(
        self, root: Path, trace_carrier: Callable[[], Mapping[str, str]] | None = None
    ) -> None:
        self.root = Path(root)
        self.trace_carrier = trace_carrier
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.model_dir = self.root / "model"
        for folder in (self.inbox, self.outbox, self.model_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # --- paths ------------------------------------------------------------------------

    def update_path(self, step: int) -> Path:
        """Where the gateway writes the global update of step `step`."""
        return self.inbox / _name("update", step, ".safetensors")

    def release_path(self, step: int) -> Path:
        return self.inbox / _name("release", step, ".json")

    def delta_path(self, step: int) -> Path:
        """Where the trainer writes Δ_step's tensors (with deltafile.write_delta)."""
        return self.outbox / _name("delta", step, ".safetensors")

    def snapshot_path(self, step: int) -> Path:
        """Where the trainer keeps θ_step."""
        return self.model_dir / _name("model", step, ".safetensors")

    def _outbox_json(self, kind: str, step: int, suffix: str = ".json") -> Path:
        if kind not in _KINDS:
            raise ValueError(f"outbox kind must be one of {sorted(_KINDS)}, got {kind!r}")
        return self.outbox / _name(kind, step, suffix)

    # --- gateway → trainer ------------------------------------------------------------

    def write_release(
        self,
        step: int,
        model_digest: bytes,
        update_path: Path | None,
        final: bool = False,
        trace: Mapping[str, str] | None = None,
        update_trace: Mapping[str, str] | None = None,
        weight: float | None = None,
    ) -> None:
        """Release step `step`. An update not yet at `update_path(step)` is moved there."""
        _check_digest(model_digest)
        if weight is not None:
            _check_weight(weight)
        update_name: str | None = None
        if update_path is not None:
            target = self.update_path(step)
            if Path(update_path) != target:
                os.replace(update_path, target)  # same filesystem: atomic, no copy
                fsync_dir(self.inbox)
            if not target.is_file():
                raise StoreError(f"release {step}: update {target} does not exist")
            update_name = target.name
        body = {
            "step": step,
            "model_digest": model_digest.hex(),
            "update": update_name,
            "final": final,
            **self._trace_fields(trace),
        }
        if update_trace:
            body["update_trace"] = _check_trace(update_trace)
        if weight is not None:
            body["weight"] = weight
        _write_json(self.release_path(step), body)

    def next_release(self, after_step: int) -> Release | None:
        """The release with the lowest step above `after_step`, or None."""
        steps = [s for s in _steps(self.inbox, "release", ".json") if s > after_step]
        if not steps:
            return None
        step = min(steps)
        path = self.release_path(step)
        body = _read_json(path, step)
        update = body.get("update")
        if update is not None and update != self.update_path(step).name:
            raise StoreError(f"{path.name}: update must be {self.update_path(step).name!r}")
        return Release(
            step=step,
            model_digest=_digest_field(body, "model_digest", path),
            update_path=None if update is None else self.update_path(step),
            final=body.get("final") is True,
            weight=_agreed_weight_field(body, path),
            trace=_trace_field(body, "trace", path),
            update_trace=_trace_field(body, "update_trace", path),
        )

    def drop_update(self, step: int) -> None:
        """Delete update files of steps <= `step` (trainer, once model `step` is committed)."""
        for s in list(_steps(self.inbox, "update", ".safetensors")):
            if s <= step:
                self.update_path(s).unlink(missing_ok=True)

    # --- trainer → gateway ------------------------------------------------------------

    def write_delta(
        self,
        step: int,
        tensors_path: Path,
        weight: float,
        base_model_digest: bytes,
        metrics: Mapping[str, float],
        trace: Mapping[str, str] | None = None,
    ) -> DeltaRecord:
        """Publish Δ_step, whose tensors are already written (moved to delta_path if not)."""
        _check_digest(base_model_digest)
        _check_weight(weight)
        target = self.delta_path(step)
        if Path(tensors_path) != target:
            os.replace(tensors_path, target)
            fsync_dir(self.outbox)
        body = {
            "step": step,
            "tensors": target.name,
            "size": target.stat().st_size,
            "weight": weight,
            "base_model_digest": base_model_digest.hex(),
            "metrics": _encode_metrics(metrics),
            **self._trace_fields(trace),
        }
        _write_json(self._outbox_json("delta", step), body)
        return self._delta_record(step, self._outbox_json("delta", step))

    def write_model_report(
        self,
        step: int,
        model_digest: bytes,
        metrics: Mapping[str, float],
        trace: Mapping[str, str] | None = None,
    ) -> None:
        _check_digest(model_digest)
        body = {
            "step": step,
            "model_digest": model_digest.hex(),
            "metrics": _encode_metrics(metrics),
            **self._trace_fields(trace),
        }
        _write_json(self._outbox_json("model", step), body)

    def has_delta(self, step: int) -> bool:
        """Whether Δ_step was published (sent or not): the trainer need not train again."""
        return self._published("delta", step)

    def has_model_report(self, step: int) -> bool:
        return self._published("model", step)

    def _published(self, kind: str, step: int) -> bool:
        return (
            self._outbox_json(kind, step).exists()
            or self._outbox_json(kind, step, ".sent").exists()
        )

    # --- gateway side of the outbox ---------------------------------------------------

    def pending_deltas(self) -> list[DeltaRecord]:
        """Complete deltas not yet marked sent, by step."""
        return [
            self._delta_record(step, self._outbox_json("delta", step))
            for step in sorted(_steps(self.outbox, "delta", ".json"))
        ]

    def sent_deltas(self) -> list[DeltaRecord]:
        """Deltas the gateway has sent, by step (kept for audit and tests)."""
        return [
            self._delta_record(step, self._outbox_json("delta", step, ".sent"))
            for step in sorted(_steps(self.outbox, "delta", ".sent"))
        ]

    def sent_delta_steps(self) -> list[int]:
        """Steps whose delta the gateway has sent, ascending (reads no file)."""
        return sorted(_steps(self.outbox, "delta", ".sent"))

    def discard_sent_delta(self, step: int) -> int:
        """Delete a sent delta's tensors (its .sent record stays, for audit); the bytes
        freed. A delta not yet marked sent is never touched."""
        if not self._outbox_json("delta", step, ".sent").exists():
            return 0
        path = self.delta_path(step)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def pending_model_reports(self) -> list[ModelReport]:
        """Model reports not yet marked sent, by step."""
        out = []
        for step in sorted(_steps(self.outbox, "model", ".json")):
            path = self._outbox_json("model", step)
            body = _read_json(path, step)
            digest = _digest_field(body, "model_digest", path)
            trace = _trace_field(body, "trace", path)
            out.append(ModelReport(step, digest, _metrics_field(body, path), trace))
        return out

    def mark_sent(self, kind: OutboxKind, step: int) -> None:
        """Record that the gateway sent this item; marking twice is harmless."""
        pending, sent = self._outbox_json(kind, step), self._outbox_json(kind, step, ".sent")
        try:
            os.replace(pending, sent)
        except FileNotFoundError:
            if sent.exists():
                return
            raise StoreError(f"nothing to mark sent: no {pending.name}") from None
        fsync_dir(self.outbox)

    def _delta_record(self, step: int, path: Path) -> DeltaRecord:
        body = _read_json(path, step)
        weight = body.get("weight")
        size = body.get("size")
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise StoreError(f"{path.name}: weight must be a number")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StoreError(f"{path.name}: size must be a non-negative int")
        if body.get("tensors") != self.delta_path(step).name:
            raise StoreError(f"{path.name}: tensors must be {self.delta_path(step).name!r}")
        return DeltaRecord(
            step=step,
            path=self.delta_path(step),
            size=size,
            weight=float(weight),
            base_model_digest=_digest_field(body, "base_model_digest", path),
            metrics=_metrics_field(body, path),
            trace=_trace_field(body, "trace", path),
        )

    def _trace_fields(self, trace: Mapping[str, str] | None) -> dict[str, Any]:
        if trace is None and self.trace_carrier is not None:
            trace = self.trace_carrier()
        return {"trace": _check_trace(trace)} if trace else {}

    # --- the trainer's model ----------------------------------------------------------

    def current_model(self) -> CurrentModel | None:
        """The committed model, or None before the first commit."""
        path = self.model_dir / "current.json"
        if not path.exists():
            return None
        body = _read_json(path, None)
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise StoreError(f"{path.name}: step must be a non-negative int")
        if body.get("tensors") != self.snapshot_path(step).name:
            raise StoreError(f"{path.name}: tensors must be {self.snapshot_path(step).name!r}")
        digest = _digest_field(body, "model_digest", path)
        return CurrentModel(step, digest, self.snapshot_path(step))

    def commit_model(self, step: int, model_digest: bytes) -> CurrentModel:
        """Make snapshot `step` current: one atomic rename is the commit point.

        Two files (tensors, then a pointer) rather than one overwritten `current` file: a
        crash between writing new tensors and their step would otherwise leave θ_t labelled
        as θ_{t-1}, and a restart would apply update t to it a second time.
        """
        _check_digest(model_digest)
        snapshot = self.snapshot_path(step)
        if not snapshot.is_file():
            raise StoreError(f"cannot commit model {step}: {snapshot} does not exist")
        body = {"step": step, "model_digest": model_digest.hex(), "tensors": snapshot.name}
        _write_json(self.model_dir / "current.json", body)
        for old in list(_steps(self.model_dir, "model", ".safetensors")):
            if old != step:
                self.snapshot_path(old).unlink(missing_ok=True)
        return CurrentModel(step, model_digest, snapshot)


# --- files --------------------------------------------------------------------------------


def _steps(folder: Path, prefix: str, suffix: str) -> Iterator[int]:
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{12}}){re.escape(suffix)}")
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match:
            yield int(match.group(1))


def _write_json(path: Path, body: Mapping[str, Any]) -> None:
    raw = json.dumps({"format": FORMAT, **body}, sort_keys=True, allow_nan=False)
    atomic_write(path, raw.encode("utf-8") + b"\n")


def _read_json(path: Path, step: int | None) -> dict[str, Any]:
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path.name}: unreadable: {exc}") from exc
    if not isinstance(body, dict):
        raise StoreError(f"{path.name}: not a JSON object")
    if body.get("format") != FORMAT:
        raise StoreError(f"{path.name}: format {body.get('format')!r}, expected {FORMAT}")
    if step is not None and body.get("step") != step:
        raise StoreError(f"{path.name}: says step {body.get('step')!r}")
    return body


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ValueError(f"a digest is {DIGEST_SIZE} bytes, got {digest!r}")


def _digest_field(body: Mapping[str, Any], key: str, path: Path) -> bytes:
    raw = body.get(key)
    try:
        digest = bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != DIGEST_SIZE:
        raise StoreError(f"{path.name}: {key} is not a {DIGEST_SIZE}-byte hex digest")
    return digest


def _check_trace(trace: Mapping[str, str]) -> dict[str, str]:
    out = dict(trace)
    for key, value in out.items():
        if key not in _TRACE_KEYS or not isinstance(value, str):
            raise ValueError(f"trace context holds traceparent/tracestate strings, got {key!r}")
        if len(value) > _TRACE_VALUE_MAX:
            raise ValueError(f"trace context {key} is longer than {_TRACE_VALUE_MAX}")
    return out


def _trace_field(body: Mapping[str, Any], key: str, path: Path) -> dict[str, str]:
    """An optional trace context; its values' syntax is the tracer's business (an invalid
    traceparent only starts a new trace), its shape is checked here."""
    raw = body.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StoreError(f"{path.name}: {key} must be an object")
    try:
        return _check_trace(raw)
    except ValueError as exc:
        raise StoreError(f"{path.name}: {key}: {exc}") from None


def _encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    # JSON has no NaN or infinity; null keeps the key (a diverged run is worth reporting).
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"metric names are strings, got {key!r}")
        number = float(value)
        out[key] = number if math.isfinite(number) else None
    return out


def _metrics_field(body: Mapping[str, Any], path: Path) -> dict[str, float]:
    raw = body.get("metrics")
    if not isinstance(raw, dict):
        raise StoreError(f"{path.name}: metrics must be an object")
    out: dict[str, float] = {}
    for key, value in raw.items():
        if value is None:
            out[key] = math.nan
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            raise StoreError(f"{path.name}: metric {key!r} is not a number")
    return out


def _check_weight(weight: object) -> None:
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive finite number, got {weight!r}")


def _agreed_weight_field(body: Mapping[str, Any], path: Path) -> float | None:
    weight = body.get("weight")
    if weight is None:
        return None
    try:
        _check_weight(weight)
    except ValueError as exc:
        raise StoreError(f"{path.name}: {exc}") from None
    assert isinstance(weight, int | float)
    return float(weight)

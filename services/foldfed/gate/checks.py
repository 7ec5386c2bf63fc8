"""The readiness checks as pure judgements: a measurement in, a `CheckResult` out.

One concept, the gate's verdicts: every check here is a measurement in and a verdict out,
sharing `CheckResult` and the cycle's `Terms`; the measuring is `probes`.

Each check has a fixed name, ends in one `Result` (pass, fail, or skip when it does not
apply), carries the value it measured in words, and on failure the fix in one sentence,
so that an operator reading only the failing line knows what to do. A participant is
ready when no check failed (`is_ready`); a skipped check does not block.

The thresholds are the cycle's terms (`Terms`), given to the gate by the consortium: θ0's
digest, the data schema version, the largest clock skew tolerated, the retention depth.
The disk rule follows docs/retention.md ("Participant rules"): with FOLDFED_RETAIN_STEPS
= m a participant holds at its peak θ_t, the m newest sent deltas, the next update's
chunks and its assembled file, plus a coded delta (≤ S) on a coded uplink: (m + 4) x S
for a model of S bytes. m = 0 keeps every step, so no disk suffices for a long cycle.

The clock rule: an offset measured with an uncertainty u (half the round trip, plus the
source's resolution) is acceptable when |offset| - u ≤ the tolerated skew, i.e. unless
the measurement proves the clocks further apart than that.

The split rule: the blind-split reference hash this party computed (of3/data/
split_standard.py) equals the consortium's; on a mismatch the public configurations
say which field differs, and with equal configurations only the key (or foldfed's split
code) can. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

BROKER = "broker"
CLOCK = "clock"
DISK = "disk"
COMPUTE = "compute"
DATA = "data"
SPLIT = "split"
THETA0 = "theta0"
CHECK_NAMES = (BROKER, CLOCK, DISK, COMPUTE, DATA, SPLIT, THETA0)

# Held beside θ_t at the peak, in models (docs/retention.md, "Participant rules"): the next
# update's chunks, its assembled file, and a coded delta on a coded uplink.
PEAK_EXTRA_MODELS = 3
GIB = 1024**3
VALIDATE_AGAIN = (
    "validate the data again (`foldfed data validate DIR --key NAME.key`) and pass the new "
    "datacard.json with --datacard"
)


class Result(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    name: str
    result: Result
    value: str  # what was measured, in words
    fix: str = ""  # on failure: what to do, one sentence

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "result": self.result.value,
            "value": self.value,
            "fix": self.fix,
        }


def passed(name: str, value: str) -> CheckResult:
    return CheckResult(name, Result.PASS, value)


def failed(name: str, value: str, fix: str) -> CheckResult:
    return CheckResult(name, Result.FAIL, value, fix)


def skipped(name: str, value: str) -> CheckResult:
    return CheckResult(name, Result.SKIP, value)


@dataclass(frozen=True)
class Terms:
    """What the consortium fixed for the coming cycle (the gate's arguments)."""

    cycle: int
    theta0_digest: str  # hex blake3 of θ0's canonical safetensors file
    schema_version: str
    max_clock_skew_s: float = 5.0
    retain_steps: int = 1
    max_step_s: float | None = None  # slowest micro-step accepted; None: any
    require_tls: bool = False
    split: SplitTerms | None = None  # the consortium's split standard; None: not checked


@dataclass(frozen=True)
class SplitTerms:
    """The consortium config's `[split]`: the public configuration and the expected hash."""

    config: Mapping[str, object]
    reference_hash: str


# ---------------------------------------------------------------- broker


@dataclass(frozen=True)
class BrokerProbe:
    """An outbound connection with the participant's own credentials."""

    user: str
    scheme: str  # "amqp" or "amqps"
    tls_verified: bool  # amqps with certificate and host name checked
    connected: bool
    queue_found: bool  # passive declare of its own queue succeeded
    connect_ms: float = 0.0
    server: str = ""  # the broker's product and version, as it announces them
    error: str = ""


def judge_broker(p: BrokerProbe, terms: Terms) -> CheckResult:
    if not p.connected:
        return failed(
            BROKER,
            f"cannot connect as {p.user!r}: {p.error}",
            "check FOLDFED_AMQP_URL (host, port, user, password) and that the company's "
            "firewall lets this host open an outbound connection to the broker",
        )
    if p.scheme == "amqps" and not p.tls_verified:
        return failed(
            BROKER,
            "connected over TLS without checking the broker's certificate",
            "remove no_verify_ssl from FOLDFED_AMQP_URL and give the consortium's CA "
            "(?cafile=...) so the broker's certificate is verified",
        )
    if p.scheme != "amqps" and terms.require_tls:
        return failed(
            BROKER,
            "plain AMQP: the connection is not encrypted",
            "use the broker's amqps:// URL with the consortium's CA (?cafile=...)",
        )
    if not p.queue_found:
        return failed(
            BROKER,
            f"connected as {p.user!r}, but its queue is not there: {p.error}",
            "ask the hub operator to add this participant to the cycle (its queue is "
            "declared by the hub), and check FOLDFED_PARTICIPANT matches the broker user",
        )
    tls = "TLS verified" if p.tls_verified else "no TLS"
    return passed(
        BROKER,
        f"{p.user}@{p.server or 'broker'}, own queue found, {tls}, connect {p.connect_ms:.0f} ms",
    )


# ---------------------------------------------------------------- clock


@dataclass(frozen=True)
class ClockSample:
    """This host's clock minus the reference clock, with the measurement's uncertainty."""

    source: str  # e.g. "hub https://... (HTTP Date)" or "kernel NTP discipline"
    offset_s: float
    uncertainty_s: float
    usable: bool = True
    error: str = ""  # why the source gave no usable measurement


def judge_clock(sample: ClockSample, terms: Terms) -> CheckResult:
    if not sample.usable:
        return failed(
            CLOCK,
            f"no clock measurement: {sample.error}",
            "synchronise this host's clock with NTP (chrony or systemd-timesyncd), or give "
            "--hub-clock with a hub URL that answers with a Date header",
        )
    value = (
        f"{sample.offset_s:+.3f} s ± {sample.uncertainty_s:.3f} s against {sample.source} "
        f"(limit {terms.max_clock_skew_s:g} s)"
    )
    if abs(sample.offset_s) - sample.uncertainty_s > terms.max_clock_skew_s:
        return failed(
            CLOCK,
            value,
            "synchronise this host's clock with NTP (chrony or systemd-timesyncd): step "
            "times and signed records carry this clock",
        )
    return passed(CLOCK, value)


def offset_from_round_trip(
    sent_s: float, received_s: float, reference_s: float, resolution_s: float
) -> tuple[float, float]:
    """(offset, uncertainty) of this clock against a reference read once between `sent_s`
    and `received_s` (local times), as NTP does: the reference is taken to be read at the
    midpoint; it was read somewhere in the round trip, and rounded to `resolution_s`."""
    midpoint = (sent_s + received_s) / 2
    return midpoint - reference_s, (received_s - sent_s) / 2 + resolution_s


# ---------------------------------------------------------------- disk


def disk_needed(model_bytes: int, retain_steps: int) -> int:
    """Bytes a participant's spool holds at its peak (module docstring); retain_steps ≥ 1."""
    return (retain_steps + 1 + PEAK_EXTRA_MODELS) * model_bytes


def judge_disk(free_bytes: int, model_bytes: int, terms: Terms) -> CheckResult:
    if terms.retain_steps < 1:
        return failed(
            DISK,
            "FOLDFED_RETAIN_STEPS=0 keeps every step: disk use grows without bound",
            "set FOLDFED_RETAIN_STEPS to 1 or more (docs/retention.md)",
        )
    need = disk_needed(model_bytes, terms.retain_steps)
    value = (
        f"{free_bytes / GIB:.2f} GiB free, {need / GIB:.2f} GiB needed "
        f"(({terms.retain_steps} + 4) x {model_bytes / GIB:.3f} GiB model)"
    )
    if free_bytes < need:
        return failed(
            DISK,
            value,
            f"free {(need - free_bytes) / GIB:.2f} GiB more on the spool's file system or "
            "move FOLDFED_SPOOL_DIR to a larger one",
        )
    return passed(DISK, value)


# ---------------------------------------------------------------- compute


@dataclass(frozen=True)
class ComputeProbe:
    model: str  # FOLDFED_MODEL
    device: str  # e.g. "cpu (16 cores)" or "cuda: 8 x NVIDIA H100"
    step_s: float | None  # one micro-step (1 optimizer step, 1 micro-batch), or None
    error: str = ""


def judge_compute(p: ComputeProbe, terms: Terms) -> CheckResult:
    if p.step_s is None:
        return failed(
            COMPUTE,
            f"{p.model} on {p.device}: the micro-step failed: {p.error}",
            "fix the trainer's configuration (FOLDFED_MODEL and its settings) until "
            "`foldfed gate check` runs its micro-step",
        )
    value = f"{p.model} on {p.device}: micro-step {p.step_s:.3f} s"
    if terms.max_step_s is not None and p.step_s > terms.max_step_s:
        return failed(
            COMPUTE,
            f"{value} (limit {terms.max_step_s:g} s)",
            "give the trainer faster hardware (more or faster GPUs) or agree a longer "
            "step time with the consortium",
        )
    return passed(COMPUTE, value)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class DataProbe:
    """What the participant's data card says, and whether it describes the data on disk."""

    card_given: bool
    needs_data: bool  # the model family trains on structures (OpenFold3)
    schema_version: str = ""
    signature_error: str = ""  # empty: signed by this participant's own key
    structures: int = 0
    valid: int = 0
    manifest_matches: bool | None = None  # None: the data folder was not given
    error: str = ""  # the card could not be read


def judge_data(p: DataProbe, terms: Terms) -> CheckResult:
    if not p.card_given:
        if p.needs_data:
            return failed(
                DATA,
                "no data card given",
                "run `foldfed data validate DIR --key NAME.key` and pass its datacard.json "
                "with --datacard",
            )
        return skipped(DATA, "no data card: the model family trains on no structures")
    if p.error:
        return failed(DATA, f"unreadable data card: {p.error}", VALIDATE_AGAIN)
    if p.schema_version != terms.schema_version:
        return failed(
            DATA,
            f"card validated against {p.schema_version!r}, the cycle uses {terms.schema_version!r}",
            f"install the foldfed release of schema {terms.schema_version}, then {VALIDATE_AGAIN}",
        )
    if p.signature_error:
        return failed(DATA, f"card signature: {p.signature_error}", VALIDATE_AGAIN)
    if p.manifest_matches is False:
        return failed(
            DATA, "the card describes other files than the data folder holds", VALIDATE_AGAIN
        )
    if p.valid < 1:
        return failed(
            DATA,
            f"0 of {p.structures} structures valid",
            f"fix the structures the local report (report.json) names, then {VALIDATE_AGAIN}",
        )
    where = "" if p.manifest_matches is None else ", matches the data folder"
    return passed(
        DATA, f"{p.valid} of {p.structures} structures valid ({p.schema_version}, signed{where})"
    )


# ---------------------------------------------------------------- split


@dataclass(frozen=True)
class SplitProbe:
    """This party's split reference (of3/data/split_standard.py), computed locally."""

    given: bool  # a local split configuration was given
    reference_hash: str = ""
    config: Mapping[str, object] = field(default_factory=dict)  # public: never the key
    error: str = ""  # the configuration could not be read


RESPLIT = "then split the data again with it (`foldfed data sample`) and gate again"


def judge_split(p: SplitProbe, terms: Terms) -> CheckResult:
    expected = terms.split
    if expected is None:
        return skipped(SPLIT, "the consortium config names no split standard ([split])")
    if not p.given:
        return failed(
            SPLIT,
            "no split configuration given",
            "pass --split with the sample.json (or split JSON) this site split its data by",
        )
    if p.error:
        return failed(SPLIT, f"unreadable split configuration: {p.error}", f"fix it, {RESPLIT}")
    if p.reference_hash == expected.reference_hash:
        return passed(
            SPLIT,
            f"reference hash {p.reference_hash[:16]}... is the consortium's "
            f"({p.config.get('standard')}, split by {p.config.get('split_by')})",
        )
    differing = [
        f"{k}: {p.config.get(k)!r} here, {v!r} in the consortium's config"
        for k, v in expected.config.items()
        if p.config.get(k) != v
    ]
    if differing:
        return failed(
            SPLIT,
            f"split configuration differs: {'; '.join(differing)}",
            f"set the split configuration to the consortium's [split] table, {RESPLIT}",
        )
    return failed(
        SPLIT,
        f"reference hash {p.reference_hash[:16]}... is not the consortium's "
        f"{expected.reference_hash[:16]}...: same configuration, so the split key differs",
        f"get the consortium's split key again (over its secret channel), {RESPLIT}",
    )


# ---------------------------------------------------------------- θ0


def judge_theta0(local_digest: str | None, terms: Terms, error: str = "") -> CheckResult:
    if local_digest is None:
        return failed(
            THETA0,
            f"no θ0 file: {error}",
            "point FOLDFED_INITIAL_MODEL (or --initial-model) at the cycle's θ0 file",
        )
    if local_digest != terms.theta0_digest.lower():
        return failed(
            THETA0,
            f"θ0 blake3 {local_digest[:16]}... is not the cycle's {terms.theta0_digest[:16]}...",
            "fetch the cycle's θ0 file again (or `foldfed initial-model` with the cycle's "
            "settings) and point FOLDFED_INITIAL_MODEL at it",
        )
    return passed(THETA0, f"θ0 blake3 {local_digest[:16]}... is the cycle's")


# ---------------------------------------------------------------- the verdict


def is_ready(results: Sequence[CheckResult]) -> bool:
    return all(r.result is not Result.FAIL for r in results)


def summary_table(results: Sequence[CheckResult]) -> str:
    """The results as a table a person reads: check, result, measured value; then each
    failure's fix."""
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result  measured"]
    lines += [f"{r.name:<{width}}  {r.result.value.upper():<6}  {r.value}" for r in results]
    fixes = [r for r in results if r.result is Result.FAIL]
    if fixes:
        lines.append("")
        lines += [f"FIX {r.name}: {r.fix}" for r in fixes]
    lines.append("")
    lines.append("READY" if is_ready(results) else f"NOT READY: {len(fixes)} check(s) failed")
    return "\n".join(lines)

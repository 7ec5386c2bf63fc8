"""A load-test scenario: who takes part, how long each computes, how fast each link is, how
big a delta is, how many steps, how much faster than real time, and what goes wrong.

Pure: parses a mapping (from YAML) into frozen dataclasses and validates it; every error
names the offending key. Times and sizes in a scenario are REAL (what the consortium would
see); `time_scale` S says how much faster the run goes:

- compute: each step's compute time c (real seconds) is slept for c / S;
- delta: the run sends delta_bytes / S real bytes per step, at the scenario's REAL
  bandwidth (the uploader's token bucket): bytes on the wire are honest and every upload
  takes 1/S of its real duration. Reports multiply measured times by S.
- latency: not emulated on the wire (loopback); the prediction adds two round trips per
  upload (manifest + have-request, receipt), so it stays visible in the report.

Codecs: `codecs` lists the (uplink, downlink) specs to compare; the scenario then runs once
per entry with the same seeds (the first is the reference, usually `fp32:v1`).
`upload_budget_s` (real seconds) turns on the uploaders' per-site codec choice
(FOLDFED_UPLOAD_BUDGET_S, scaled by S).

One concept, the scenario schema, in one module of over 400 lines: the dataclasses and the
parser that validates each of their fields; drawing times from a scenario is
`distributions`, running one is `runner`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from foldfed.topology import is_valid_participant_id

MIB = 1 << 20
DISTRIBUTIONS = ("fixed", "normal", "lognormal", "pareto")
Distribution = Literal["fixed", "normal", "lognormal", "pareto"]
FAULTS = ("disconnect", "late_join", "broker_restart")
FaultKind = Literal["disconnect", "late_join", "broker_restart"]
# The smallest delta the run sends (so a heavily scaled delta is still a real payload).
MIN_DELTA_BYTES = 4096


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the key and the reason."""


@dataclass(frozen=True)
class Compute:
    """Compute time per step, in real seconds.

    fixed: `seconds`; normal: mean `seconds`, deviation `sd` (cut at 0); lognormal
    (heavy-tailed): median `seconds`, shape `sigma`; pareto (heavy-tailed): minimum
    `seconds`, tail index `alpha`. Any of them: with probability `pause_probability` a
    step takes `pause_seconds` longer (a preempted node, a maintenance pause).
    """

    dist: Distribution = "fixed"
    seconds: float = 0.0
    sd: float = 0.0
    sigma: float = 0.0
    alpha: float = 0.0
    pause_probability: float = 0.0
    pause_seconds: float = 0.0


@dataclass(frozen=True)
class Participant:
    name: str
    compute: Compute
    # Real link bandwidth in megabits per second; 0 = unlimited.
    bandwidth_mbps: float = 0.0
    # Real round-trip time (used by the prediction; not emulated, see module doc).
    latency_ms: float = 0.0

    @property
    def bandwidth_bps(self) -> float:
        """Bytes per second (0 = unlimited)."""
        return self.bandwidth_mbps * 1e6 / 8


@dataclass(frozen=True)
class Fault:
    """disconnect: `participant`'s uploader is SIGKILLed in the middle of its upload of
    `step` and comes back after `down_s`; late_join: `participant` is not ready when the
    cycle starts, becomes ready once `step` is released, and must join the next cycle;
    broker_restart: the broker stops during step `step`'s uploads for `down_s`."""

    kind: FaultKind
    step: int
    participant: str = ""
    down_s: float = 0.0


@dataclass(frozen=True)
class CodecPair:
    """The cycle's uplink spec and the hub's downlink spec of one run."""

    uplink: str = "fp32:v1"
    downlink: str = "fp32:v1"
    # Wire bytes of one run-size delta each way (0: not sized yet, read as fp32's);
    # runner.size_codecs fills them in from the codecs' chunk sizes.
    uplink_bytes_run: int = 0
    downlink_bytes_run: int = 0
    # A short name for reports (default: the specs).
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.uplink if self.uplink == self.downlink else f"{self.uplink} / {self.downlink}"


@dataclass(frozen=True)
class Expect:
    """What the run must show (checked by the runner, asserted by the smoke test)."""

    # The participant whose extra time is measured against the prediction.
    straggler: str = ""
    # Allowed relative error of measured vs predicted straggler cost.
    tolerance: float = 0.05
    # The participant whose link goodput is measured, and the minimum ratio.
    goodput_participant: str = ""
    goodput_min: float = 0.95
    # Compare the final model digest with an undisturbed run of the same seeds.
    same_digest_as_undisturbed: bool = False
    # With codecs: the communication time per step, measured from the emulated links (the
    # slowest upload plus the slowest download, an upper bound of what they add to a
    # step), is within the compute time, at real size and link speed: for `comm_codec` (a
    # codec's label), or for some compared codec when that is empty. Each codec also runs
    # on unlimited links, for the wall(on) - wall(off) figure shown beside it.
    comm_within_compute: bool = False
    comm_codec: str = ""
    # The hub's update of every step equals the weighted mean of the deltas the
    # participants wrote, within the fixed-point grid (an independent numpy check of the
    # files: loadtest/sums.py). Needs `retain_steps: 0` (every step's files kept).
    exact_sums: bool = False
    # > 0: bytes on disk (hub and participants) stay flat after this many warm-up steps.
    disk_flat_after: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    participants: tuple[Participant, ...]
    steps: int
    time_scale: float
    delta_mib: float
    seed: int = 0
    faults: tuple[Fault, ...] = ()
    # late_join: global steps of the next cycle (the one the late joiner joins).
    next_cycle_steps: int = 0
    # Steps of the CI smoke version.
    smoke_steps: int = 3
    # True for the smoke version itself: checks that need the full run's many steps are
    # reported, not judged (verdicts.Check.needs_full_run).
    smoke_run: bool = False
    chunk_mib: int = 1
    weight: float = 1000.0
    expect: Expect = field(default_factory=Expect)
    # The codecs compared, one run each (empty: one run, fp32 both ways).
    codecs: tuple[CodecPair, ...] = ()
    # The smoke version's time scale (0: time_scale): a fast link test needs a lower S
    # than a smoke run can afford.
    smoke_time_scale: float = 0.0
    # Real seconds an upload may take per step (0: the uploaders' codec choice is off).
    upload_budget_s: float = 0.0
    # FOLDFED_RETAIN_STEPS and FOLDFED_RETAIN_CHECKPOINT_EVERY (docs/retention.md) for every
    # service of the run; None: the services' defaults.
    retain_steps: int | None = None
    retain_checkpoint_every: int | None = None

    # ------------------------------------------------------------ derived quantities

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.participants)

    def participant(self, name: str) -> Participant:
        for p in self.participants:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def delta_bytes_real(self) -> int:
        return int(self.delta_mib * MIB)

    @property
    def delta_elements(self) -> int:
        """F32 elements of the scaled delta the run actually sends."""
        return max(MIN_DELTA_BYTES, int(self.delta_bytes_real / self.time_scale)) // 4

    @property
    def delta_bytes_run(self) -> int:
        """Payload bytes tensor data of the scaled delta (the safetensors header adds ~100)."""
        return self.delta_elements * 4

    @property
    def uplink_bytes_run(self) -> int:
        """Bytes one upload of this run sends (the coded size with a lossy codec)."""
        return self.codec.uplink_bytes_run or self.delta_bytes_run

    @property
    def downlink_bytes_run(self) -> int:
        """Bytes of the global update each participant downloads per step."""
        return self.codec.downlink_bytes_run or self.delta_bytes_run

    def scaled(self, real_seconds: float) -> float:
        return real_seconds / self.time_scale

    def real(self, run_seconds: float) -> float:
        return run_seconds * self.time_scale

    @property
    def codec(self) -> CodecPair:
        """This run's codecs (the first compared pair)."""
        return self.codecs[0] if self.codecs else CodecPair()

    def with_codec(self, index: int) -> Scenario:
        """The run of the compared codec `index` alone, in a folder of its own."""
        return replace(self, name=f"{self.name}-codec{index}", codecs=(self.codecs[index],))

    @property
    def late_joiners(self) -> tuple[str, ...]:
        return tuple(f.participant for f in self.faults if f.kind == "late_join")

    def first_cycle(self) -> tuple[str, ...]:
        """The participants of the first cycle: everyone ready when it starts."""
        late = set(self.late_joiners)
        return tuple(n for n in self.names if n not in late)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.next_cycle_steps if self.late_joiners else 0)

    def smoke(self) -> Scenario:
        """The CI version: a few steps, the same participants, faults and checks."""
        steps = max(self.smoke_steps, max((f.step for f in self.faults), default=1) + 1)
        steps = min(steps, self.steps)
        nxt = min(self.next_cycle_steps, self.smoke_steps) if self.next_cycle_steps else 0
        # A smoke run still judges flatness, after half of its few steps.
        warmup = min(self.expect.disk_flat_after, steps // 2)
        return replace(
            self,
            name=f"{self.name}-smoke",
            steps=steps,
            next_cycle_steps=nxt,
            expect=replace(self.expect, disk_flat_after=warmup),
            smoke_run=True,
            time_scale=self.smoke_time_scale or self.time_scale,
        )

    def without_links(self) -> Scenario:
        """The same run on unlimited links (same seeds, codecs and budget): what a step
        takes when only compute and the services' own time remain. Its wall time, paired
        step by step with the linked run's, gives the time the links add."""
        free = tuple(replace(p, bandwidth_mbps=0.0) for p in self.participants)
        return replace(self, name=f"{self.name}-nolinks", participants=free)

    def undisturbed(self) -> Scenario:
        """The same participants and seeds without faults (the digest reference)."""
        return replace(self, name=f"{self.name}-undisturbed", faults=())

    def with_steps(self, steps: int) -> Scenario:
        return replace(self, steps=steps)


# ---------------------------------------------------------------------------- parsing


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _pick(raw: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{path or 'scenario'}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(allowed))
    if unknown:
        raise ScenarioError(
            f"{path or 'scenario'}: unknown key(s) {unknown}; allowed: {sorted(allowed)}"
        )


def _num(
    raw: Mapping[str, Any],
    key: str,
    path: str,
    default: float | None = None,
    *,
    minimum: float = 0.0,
    exclusive: bool = False,
    maximum: float = math.inf,
) -> float:
    value = raw.get(key, default)
    where = _where(path, key)
    if value is None:
        raise ScenarioError(f"{where}: required")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ScenarioError(f"{where}: must be finite, got {value}")
    if value < minimum or (exclusive and value == minimum) or value > maximum:
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        if maximum < math.inf:
            bound += f" and <= {maximum:g}"
        raise ScenarioError(f"{where}: must be {bound}, got {value:g}")
    return value


def _int(
    raw: Mapping[str, Any], key: str, path: str, default: int | None = None, minimum: int = 0
) -> int:
    value = raw.get(key, default)
    where = _where(path, key)
    if value is None:
        raise ScenarioError(f"{where}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise ScenarioError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _str(raw: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ScenarioError(f"{_where(path, key)}: expected a string, got {value!r}")
    return value


_COMPUTE_KEYS = ("dist", "seconds", "sd", "sigma", "alpha", "pause_probability", "pause_seconds")


def parse_compute(raw: Any, path: str) -> Compute:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = {"dist": "fixed", "seconds": raw}
    _pick(raw, path, _COMPUTE_KEYS)
    dist = _str(raw, "dist", path, "fixed")
    if dist not in DISTRIBUTIONS:
        raise ScenarioError(f"{_where(path, 'dist')}: {dist!r} is not one of {DISTRIBUTIONS}")
    compute = Compute(
        dist=cast(Distribution, dist),
        seconds=_num(raw, "seconds", path, exclusive=dist in ("lognormal", "pareto")),
        sd=_num(raw, "sd", path, 0.0),
        sigma=_num(raw, "sigma", path, 0.0),
        alpha=_num(raw, "alpha", path, 0.0),
        pause_probability=_num(raw, "pause_probability", path, 0.0, maximum=1.0),
        pause_seconds=_num(raw, "pause_seconds", path, 0.0),
    )
    if dist == "normal" and "sd" not in raw:
        raise ScenarioError(f"{_where(path, 'sd')}: required for a normal distribution")
    if dist == "lognormal" and compute.sigma <= 0:
        raise ScenarioError(f"{_where(path, 'sigma')}: must be > 0 for a lognormal")
    if dist == "pareto" and compute.alpha <= 1:
        # alpha <= 1 has no finite mean: a month-long plan cannot be made from it.
        raise ScenarioError(f"{_where(path, 'alpha')}: must be > 1 for a pareto (finite mean)")
    if compute.pause_probability > 0 and compute.pause_seconds <= 0:
        raise ScenarioError(f"{_where(path, 'pause_seconds')}: must be > 0 with pauses")
    return compute


_PARTICIPANT_KEYS = ("name", "compute", "bandwidth_mbps", "latency_ms")


def _participants(raw: Any, defaults: Mapping[str, Any]) -> tuple[Participant, ...]:
    if not isinstance(raw, list) or not raw:
        raise ScenarioError("participants: expected a non-empty list")
    out: list[Participant] = []
    for i, entry in enumerate(raw):
        path = f"participants[{i}]"
        _pick(entry, path, _PARTICIPANT_KEYS)
        merged = {**defaults, **entry}
        name = _str(merged, "name", path)
        if not is_valid_participant_id(name):
            raise ScenarioError(f"{path}.name: {name!r} is not a valid participant id")
        if "compute" not in merged:
            raise ScenarioError(f"{path}.compute: required (here or in defaults)")
        out.append(
            Participant(
                name=name,
                compute=parse_compute(merged["compute"], f"{path}.compute"),
                bandwidth_mbps=_num(merged, "bandwidth_mbps", path, 0.0),
                latency_ms=_num(merged, "latency_ms", path, 0.0),
            )
        )
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"participants: duplicate name(s) {dupes}")
    return tuple(out)


_FAULT_KEYS = ("kind", "step", "participant", "down_s")


def _faults(raw: Any, names: tuple[str, ...], steps: int) -> tuple[Fault, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ScenarioError("faults: expected a list")
    out: list[Fault] = []
    for i, entry in enumerate(raw):
        path = f"faults[{i}]"
        _pick(entry, path, _FAULT_KEYS)
        kind = _str(entry, "kind", path)
        if kind not in FAULTS:
            raise ScenarioError(f"{path}.kind: {kind!r} is not one of {FAULTS}")
        step = _int(entry, "step", path, minimum=1)
        if step > steps:
            raise ScenarioError(f"{path}.step: {step} is beyond the cycle's {steps} steps")
        participant = _str(entry, "participant", path, "")
        if kind in ("disconnect", "late_join") and participant not in names:
            raise ScenarioError(f"{path}.participant: {participant!r} is not a participant")
        if kind == "broker_restart" and participant:
            raise ScenarioError(f"{path}.participant: a broker restart concerns everyone")
        out.append(
            Fault(
                kind=cast(FaultKind, kind),
                step=step,
                participant=participant,
                down_s=_num(entry, "down_s", path, 0.0),
            )
        )
    return tuple(out)


_EXPECT_KEYS = (
    "straggler",
    "tolerance",
    "goodput_participant",
    "goodput_min",
    "same_digest_as_undisturbed",
    "comm_within_compute",
    "comm_codec",
    "exact_sums",
    "disk_flat_after",
)


def _expect(raw: Any, names: tuple[str, ...]) -> Expect:
    if raw is None:
        return Expect()
    _pick(raw, "expect", _EXPECT_KEYS)
    for key in ("straggler", "goodput_participant"):
        value = _str(raw, key, "expect", "")
        if value and value not in names:
            raise ScenarioError(f"expect.{key}: {value!r} is not a participant")
    flags = ("same_digest_as_undisturbed", "comm_within_compute", "exact_sums")
    same, comm, sums = (raw.get(k, False) for k in flags)
    for key, value in zip(flags, (same, comm, sums), strict=True):
        if not isinstance(value, bool):
            raise ScenarioError(f"expect.{key}: expected true/false, got {value!r}")
    return Expect(
        straggler=_str(raw, "straggler", "expect", ""),
        tolerance=_num(raw, "tolerance", "expect", 0.05, exclusive=True, maximum=1.0),
        goodput_participant=_str(raw, "goodput_participant", "expect", ""),
        goodput_min=_num(raw, "goodput_min", "expect", 0.95, exclusive=True, maximum=1.0),
        same_digest_as_undisturbed=same,
        comm_within_compute=comm,
        comm_codec=_str(raw, "comm_codec", "expect", ""),
        exact_sums=sums,
        disk_flat_after=_int(raw, "disk_flat_after", "expect", 0),
    )


def _codecs(raw: Any) -> tuple[CodecPair, ...]:
    """`codecs`: a list of specs (both ways) or {uplink, downlink} mappings."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ScenarioError("codecs: expected a non-empty list")
    out: list[CodecPair] = []
    for i, entry in enumerate(raw):
        path = f"codecs[{i}]"
        if isinstance(entry, str):
            entry = {"uplink": entry, "downlink": entry}
        _pick(entry, path, ("name", "uplink", "downlink"))
        # The specs themselves are checked where the codecs are (runner.size_codecs): this
        # module, like the codecs, is pure core, and the two layers' siblings stay apart.
        out.append(
            CodecPair(
                _str(entry, "uplink", path),
                _str(entry, "downlink", path, "fp32:v1"),
                name=_str(entry, "name", path, ""),
            )
        )
    return tuple(out)


_SCENARIO_KEYS = (
    "name",
    "description",
    "participants",
    "defaults",
    "steps",
    "time_scale",
    "delta_mib",
    "seed",
    "faults",
    "next_cycle_steps",
    "smoke_steps",
    "chunk_mib",
    "weight",
    "expect",
    "codecs",
    "smoke_time_scale",
    "upload_budget_s",
    "retain_steps",
    "retain_checkpoint_every",
)


def parse_scenario(raw: Any) -> Scenario:
    """A validated Scenario from the mapping a YAML file holds."""
    _pick(raw, "", _SCENARIO_KEYS)
    name = _str(raw, "name", "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
        raise ScenarioError(f"name: {name!r} must match [a-z0-9][a-z0-9_-]*")
    defaults = raw.get("defaults") or {}
    _pick(defaults, "defaults", tuple(k for k in _PARTICIPANT_KEYS if k != "name"))
    participants = _participants(raw.get("participants"), defaults)
    steps = _int(raw, "steps", "", minimum=1)
    names = tuple(p.name for p in participants)
    faults = _faults(raw.get("faults"), names, steps)
    late = [f for f in faults if f.kind == "late_join"]
    next_cycle = _int(raw, "next_cycle_steps", "", 0)
    if late and next_cycle < 1:
        raise ScenarioError("next_cycle_steps: required (>= 1) when a participant joins late")
    if len(late) >= len(names):
        raise ScenarioError("faults: at least one participant must be ready for the first cycle")
    chunk_mib = _int(raw, "chunk_mib", "", 1, minimum=1)
    if chunk_mib > 16:
        raise ScenarioError(f"chunk_mib: must be <= 16, got {chunk_mib}")
    scenario = Scenario(
        name=name,
        description=_str(raw, "description", "", ""),
        participants=participants,
        steps=steps,
        time_scale=_num(raw, "time_scale", "", 1.0, minimum=1.0),
        delta_mib=_num(raw, "delta_mib", "", exclusive=True),
        seed=_int(raw, "seed", "", 0),
        faults=faults,
        next_cycle_steps=next_cycle,
        smoke_steps=_int(raw, "smoke_steps", "", 3, minimum=1),
        chunk_mib=chunk_mib,
        weight=_num(raw, "weight", "", 1000.0, exclusive=True),
        expect=_expect(raw.get("expect"), names),
        codecs=_codecs(raw.get("codecs")),
        smoke_time_scale=_num(raw, "smoke_time_scale", "", 0.0),
        upload_budget_s=_num(raw, "upload_budget_s", "", 0.0),
        retain_steps=_optional_int(raw, "retain_steps"),
        retain_checkpoint_every=_optional_int(raw, "retain_checkpoint_every"),
    )
    if scenario.smoke_time_scale and scenario.smoke_time_scale < 1:
        raise ScenarioError("smoke_time_scale: must be >= 1 (or 0: time_scale)")
    if scenario.expect.comm_within_compute and len(scenario.codecs) < 1:
        raise ScenarioError("expect.comm_within_compute: needs `codecs`")
    if scenario.expect.comm_within_compute and min(steps, scenario.smoke_steps) < 2:
        # A cycle's first step downloads nothing: only the later ones measure a download.
        raise ScenarioError("expect.comm_within_compute: needs steps and smoke_steps >= 2")
    _check_footprint(scenario)
    labels = [c.label for c in scenario.codecs]
    if scenario.expect.comm_codec and scenario.expect.comm_codec not in labels:
        raise ScenarioError(
            f"expect.comm_codec: {scenario.expect.comm_codec!r} is not a codec's name {labels}"
        )
    return scenario


def _optional_int(raw: Mapping[str, Any], key: str) -> int | None:
    return None if raw.get(key) is None else _int(raw, key, "")


def _check_footprint(scenario: Scenario) -> None:
    """The sums check reads every step's files; the disk check needs steps after warm-up."""
    expect = scenario.expect
    if expect.exact_sums and scenario.retain_steps != 0:
        raise ScenarioError(
            "expect.exact_sums: needs retain_steps: 0 (the check reads every step's deltas "
            "and update, which retention would delete)"
        )
    if (
        expect.exact_sums
        and scenario.codecs
        and any(c.uplink != "fp32:v1" or c.downlink != "fp32:v1" for c in scenario.codecs)
    ):
        raise ScenarioError("expect.exact_sums: needs fp32 both ways (a lossy codec is not exact)")
    if expect.disk_flat_after and expect.disk_flat_after >= scenario.steps:
        raise ScenarioError(
            f"expect.disk_flat_after: {expect.disk_flat_after} warm-up steps leave none of the "
            f"{scenario.steps} steps to judge"
        )


def load_scenario(text: str) -> Scenario:
    """Parse YAML text (safe loader: plain data only, nothing executes)."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"not valid YAML: {exc}") from None
    return parse_scenario(raw)

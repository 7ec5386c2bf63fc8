"""Adaptive codec choice: the least lossy codec whose upload fits the step's budget.

Given the link's measured goodput G (bytes/s), a per-step upload budget T (s), the number
of elements n and candidate specs ordered least lossy first, the choice is the first
candidate whose wire size W (the sum of codec.chunk_bytes over the chunk plan: exact for
fixed-size codecs, an upper bound with +zstd) meets W / G ≤ T; if none does, the last
(most compressing) one, with a reason that says it does not fit. Pure arithmetic: the
uploader measures G, logs the returned reason, and acts on the choice.

When the choice may change. The hub decodes each member's delta with the spec its manifest
names, so without masking a member may change its spec at any step among those the cycle
allows, and its residual carries over (it lives in value space, not code space). A codec
with shared parameters (linear_shared: a shared grid and rotation) composes with masking
only when every member of a masked step uses it, so once steps are masked the uploader
must pass `at_cycle_start=False` mid-cycle: a change into or out of such a codec then waits
for the next cycle (the reason says so).

Which specs a cycle allows (`allowed_specs`): its own spec, and the member choices its
release lists (`FOLDFED_CODEC_CHOICES`, registry.check_choices: per-member specs, no shared
ranges). The hub accepts exactly these (`require_allowed_codec`, docs/format.md 14.8). The
candidates are ordered least lossy first by their wire size for this vector (more bytes
per element, less loss: true within each codec family and across the ones registered,
bf16 > int8 > rotated 4 > 2 > 1 bits), ties in the cycle's order.

Goodput (`Goodput`): bytes the uploader sent over the seconds its upload took, smoothed
over uploads; an upload that sent too little to measure the link (all chunks already held
by the hub, a resumed tail) leaves the estimate unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foldfed.codecs.plan import plan_chunks
from foldfed.codecs.registry import codec_from_spec
from foldfed.errors import CodecError


@dataclass(frozen=True)
class CodecChoice:
    spec: str
    wire_bytes: int
    seconds: float
    fits: bool
    reason: str


# An upload below this many bytes measures round trips, not the link.
MIN_MEASURED_BYTES = 64 << 10
# Weight of the newest upload in the smoothed goodput.
GOODPUT_WEIGHT = 0.5


@dataclass(frozen=True)
class Goodput:
    """The link's measured goodput in bytes/s (0: not measured yet) and its upload count."""

    bytes_per_s: float = 0.0
    uploads: int = 0

    def after(self, bytes_sent: int, seconds: float) -> Goodput:
        """The estimate once an upload of `bytes_sent` took `seconds`."""
        if bytes_sent < MIN_MEASURED_BYTES or not seconds > 0:
            return self
        rate = bytes_sent / seconds
        if self.uploads == 0:
            return Goodput(rate, 1)
        smoothed = GOODPUT_WEIGHT * rate + (1 - GOODPUT_WEIGHT) * self.bytes_per_s
        return Goodput(smoothed, self.uploads + 1)


def allowed_specs(
    cycle_spec: str,
    choices: tuple[str, ...] = (),
    elements: int = 1 << 20,
    max_chunk_bytes: int = 4 << 20,
) -> tuple[str, ...]:
    """The specs a member may send in a cycle of `cycle_spec` with member `choices`, least
    lossy (most bytes for `elements`) first."""
    specs = (cycle_spec, *choices)
    sizes = {spec: wire_size(spec, elements, max_chunk_bytes) for spec in specs}
    return tuple(sorted(specs, key=lambda spec: -sizes[spec]))  # stable: ties keep order


def choose_for_cycle(
    cycle_spec: str,
    goodput: Goodput,
    budget_s: float,
    elements: int,
    max_chunk_bytes: int,
    choices: tuple[str, ...] = (),
) -> CodecChoice:
    """The uplink spec for a step of a cycle coding with `cycle_spec`, and why."""
    if goodput.bytes_per_s <= 0:
        size = wire_size(cycle_spec, elements, max_chunk_bytes)
        return CodecChoice(cycle_spec, size, 0.0, True, f"{cycle_spec}: no goodput measured yet")
    return choose_codec(
        goodput.bytes_per_s,
        budget_s,
        elements,
        allowed_specs(cycle_spec, choices, elements, max_chunk_bytes),
        max_chunk_bytes=max_chunk_bytes,
    )


def wire_size(spec: str, elements: int, max_chunk_bytes: int = 4 << 20) -> int:
    """Bytes on the wire for `elements` with `spec` (upper bound when zstd is on)."""
    codec = codec_from_spec(spec)
    plan = plan_chunks(codec, elements, max_chunk_bytes)
    return sum(codec.chunk_bytes(s.elements) for s in plan.spans())


def choose_codec(
    goodput: float,
    budget_s: float,
    elements: int,
    candidates: Sequence[str],
    *,
    current: str | None = None,
    at_cycle_start: bool = True,
    max_chunk_bytes: int = 4 << 20,
) -> CodecChoice:
    """The least lossy candidate that fits; see the module docstring."""
    if not candidates:
        raise CodecError("no candidate codecs")
    if not (goodput > 0 and budget_s > 0):
        raise CodecError(f"goodput and budget must be > 0, got {goodput}, {budget_s}")
    sized = [(spec, wire_size(spec, elements, max_chunk_bytes)) for spec in candidates]
    best = next(((s, w) for s, w in sized if w / goodput <= budget_s), None)
    spec, size = best or sized[-1]
    seconds = size / goodput
    budget = f"{size} B at {goodput:.3g} B/s = {seconds:.3g} s, budget {budget_s:.3g} s"
    if best is None:
        reason = f"{spec}: no candidate fits ({budget}); the most compressing is used"
    else:
        lossier = [s for s, _ in sized[: sized.index(best)]]
        skipped = f"; less lossy {', '.join(lossier)} do not fit" if lossier else ""
        reason = f"{spec}: least lossy that fits ({budget}){skipped}"
    choice = CodecChoice(spec, size, seconds, best is not None, reason)
    held = _hold_shared(
        choice, current, at_cycle_start, elements, goodput, budget_s, max_chunk_bytes
    )
    return held


def _hold_shared(
    choice: CodecChoice,
    current: str | None,
    at_cycle_start: bool,
    elements: int,
    goodput: float,
    budget_s: float,
    max_chunk_bytes: int,
) -> CodecChoice:
    if at_cycle_start or current is None or current == choice.spec:
        return choice
    shared = codec_from_spec(current).linear_shared or codec_from_spec(choice.spec).linear_shared
    if not shared:
        return choice
    size = wire_size(current, elements, max_chunk_bytes)
    return CodecChoice(
        current,
        size,
        size / goodput,
        size / goodput <= budget_s,
        f"{current}: kept until the cycle ends (switching to {choice.spec} changes "
        f"parameters the step's members share); wanted: {choice.reason}",
    )

"""Adaptive codec choice: the least lossy codec whose upload fits the step's budget.

Given the link's measured goodput G (bytes/s), a per-step upload budget T (s), the number
of elements n and candidate specs ordered least lossy first, the choice is the first
candidate whose wire size W (the sum of codec.chunk_bytes over the chunk plan: exact for
fixed-size codecs, an upper bound with +zstd) meets W / G ≤ T; if none does, the last
(most compressing) one, with a reason that says it does not fit. Pure arithmetic: the
uploader measures G, logs the returned reason, and acts on the choice.

When the choice may change. A codec with shared parameters (linear_shared: a shared grid
and rotation) only decodes, and only composes with masking, when every member of a step
uses it, so the uploader passes `at_cycle_start=False` mid-cycle and a change into or out
of such a codec waits for the next cycle (the reason says so). A per-member codec (fp32,
bf16, int8, rotated with scale=block) may change at any step, among the specs the cycle
allows.
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

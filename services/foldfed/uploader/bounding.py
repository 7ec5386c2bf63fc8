"""A member's side of the update bound: what the hub will decode is measured exactly as
the hub measures it (aggregation.normbound, chunk by chunk) before anything is sent.

Within the release's bound B: sent as is. Above it: refused (UpdateOverBound: the step
waits for this member and the operator sees why), or, with FOLDFED_UPDATE_CLIP, scaled
down: x_c = s·x with s from the measured decoded norm, encoded again until
decode(encode(x_c)) is within B (a lossy codec adds energy, so x alone is not enough).

The error-feedback residual is then e_t = x_c - decode(encode(x_c)): the codec error of
what was sent, as always. The clipped excess (1 - s)·x is dropped, not carried, and
logged with its norm ("update clipped", dropped_norm). Carrying it would make e grow
without limit while a member keeps hitting the bound and re-send the excess later: a rate
limit, not a bound. An fp32 delta above B is clipped into a copy in the same dtypes,
measured again the same way. Deterministic: a restart re-encodes to the same bytes.
No torch here: numpy, the pure codecs, and files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from foldfed.aggregation.dtypes import decode_narrow, from_float64
from foldfed.aggregation.layout import ModelLayout, chunk_values
from foldfed.aggregation.normbound import (
    MAX_CLIP_ROUNDS,
    clip_scale,
    norm_of,
    sendable,
    squared_norm,
)
from foldfed.codecs import ChunkPlan, CodecContext, decode_vector, encode_vector
from foldfed.codecs.base import Codec
from foldfed.codecs.feedback import Compensated, Residual
from foldfed.durable import atomic_write
from foldfed.errors import FoldfedError
from foldfed.format import TensorSpec, canonical_order, encode_header
from foldfed.payloadfile import plan_chunks, read_chunk, read_layout

log = structlog.get_logger(__name__)


class UpdateOverBound(FoldfedError):
    """A delta decodes above the cycle's update bound and clipping is off: not sent."""


def encode_within(
    x: np.ndarray, codec: Codec, ctx: CodecContext, plan: ChunkPlan, bound: float, *, clip: bool
) -> Compensated:
    """Encode x (= Δ + e), scaled down with `clip`, so that what the hub decodes is within
    `bound`; the residual is the codec error of what is sent (module docstring)."""
    before = float(np.linalg.norm(x.astype(np.float64)))
    scale = clip_scale(before, bound) if clip else 1.0
    for _ in range(MAX_CLIP_ROUNDS):
        sent = x if scale == 1.0 else (x.astype(np.float64) * scale).astype(np.float32)
        chunks = encode_vector(codec, sent, ctx, plan)
        decoded = decode_vector(codec, chunks, ctx, plan)
        norm = norm_of([squared_norm(decoded[s.begin : s.end]) for s in plan.spans()])
        if sendable(norm, bound):
            if scale != 1.0:
                _log_clip(ctx.step, before, norm, bound, scale)
            return Compensated(chunks, decoded, Residual(ctx.cycle, ctx.step, sent - decoded))
        if not clip:
            raise UpdateOverBound(_over(ctx.step, norm, bound))
        scale *= clip_scale(norm, bound)
    raise UpdateOverBound(_over(ctx.step, norm, bound) + f" after {MAX_CLIP_ROUNDS} clips")


def payload_within(
    source: Path, clipped: Path, step: int, bound: float, chunk_size: int, *, clip: bool
) -> Path:
    """The safetensors payload to send: `source` when within `bound`, else (with `clip`) a
    scaled copy written at `clipped`; UpdateOverBound when clipping is off."""
    if bound <= 0:
        return source
    norm = file_norm(source, chunk_size)
    if sendable(norm, bound):
        return source
    if not clip:
        raise UpdateOverBound(_over(step, norm, bound))
    sent, scale = norm, clip_scale(norm, bound)
    for _ in range(MAX_CLIP_ROUNDS):
        _write_scaled(source, scale, clipped)
        sent = file_norm(clipped, chunk_size)
        if sendable(sent, bound):
            _log_clip(step, norm, sent, bound, scale)
            return clipped
        scale *= clip_scale(sent, bound)
    raise UpdateOverBound(_over(step, sent, bound) + f" after {MAX_CLIP_ROUNDS} clips")


def file_norm(path: Path, chunk_size: int) -> float:
    """The L2 norm the hub measures of a safetensors payload, chunk by chunk."""
    plan = plan_chunks(path, chunk_size)
    layout = ModelLayout.from_spans(read_layout(path))
    squares = []
    for index in range(len(plan.chunk_digests)):
        body = read_chunk(path, chunk_size, index)
        values = chunk_values(layout, plan.tensors, index, chunk_size, plan.payload_size, body)
        squares.append(sum(squared_norm(v) for v in values))
    return norm_of(squares)


def _write_scaled(source: Path, scale: float, path: Path) -> None:
    """`source` with every value times `scale`, in the same dtypes and canonical layout."""
    spans = read_layout(source)
    data = source.read_bytes()
    specs = [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in spans]
    by_name = {s.name: s for s in spans}
    parts = [encode_header(specs)]
    for spec in canonical_order(specs):
        span = by_name[spec.name]
        raw = decode_narrow(memoryview(data)[span.begin : span.end], span.dtype, tensor=span.name)
        scaled = raw.astype(np.float64) * scale
        parts.append(np.ascontiguousarray(from_float64(scaled, span.dtype)).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, b"".join(parts))


def _over(step: int, norm: float, bound: float) -> str:
    return (
        f"delta {step} decodes to L2 norm {norm:.6g}, over the cycle's bound {bound:.6g}: "
        "not sent (FOLDFED_UPDATE_CLIP=on scales it down to the bound)"
    )


def _log_clip(step: int, before: float, sent: float, bound: float, scale: float) -> None:
    # Dropped, not carried into the residual (module docstring).
    log.warning("update clipped", step=step, norm=before, sent_norm=sent, bound=bound,
                scale=scale, dropped_norm=before * (1 - scale))  # fmt: skip

"""The hub's downlink coder: the global update through a codec, with the hub's own error
feedback, made durable so that a finalize repeated after a crash gives the same bytes.

For step t with exact update U_t (float32, canonical order) and the hub's residual e:

    e's step < t   encode x = U_t + e (codecs.compensate, direction "down", sender "hub",
                   the hub's own ranges); write the coded chunks, back to back, to
                   updates/coded-<t>.bin and their sizes to updates/coded-<t>.json (each
                   atomically), and only then the new residual e_t: its write is the
                   commit point of "step t is encoded" (codecs/feedback.py, rule 2);
    e's step ≥ t   step t was encoded before: decode the stored chunks, never add e again.

Either way the result is d_t = decode(chunks), the update every party applies; a repeat
recomputes U_t identically (the sum and the optimizer state generation t do not change),
so a crash before the commit re-encodes the same bytes (rule 1). The residual file is
codecs_store.ResidualStore at <state>/downlink.residual.

A progressive finalize (aggregation/progressive.py) codes the same update chunk by chunk as
its elements become final (`DownlinkCoder.session`): every codec codes each chunk alone
(codecs/plan.py; its randomness is indexed by global element position, randomness.py), and
x = U_t + e, d_t and e_t = x - d_t are elementwise, so coding chunk j of U_t alone gives
the bytes, the decoded values and the residual slice that `code` gives for that chunk of
the whole vector (a test pins it). Nothing is written before `commit`, which writes the
same files in the same order as `code`: a crash mid-way leaves the residual of step t - 1,
and the next attempt codes the same bytes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldfed.codecs import (
    Codec,
    CodecContext,
    Residual,
    ResidualAlreadyApplied,
    carried,
    codec_from_spec,
    compensate,
    decode_vector,
    plan_chunks,
)
from foldfed.codecs.base import flat_float32
from foldfed.codecs.plan import ChunkPlan, ChunkSpan
from foldfed.codecs_store import ResidualStore
from foldfed.durable import atomic_write
from foldfed.errors import StoreError
from foldfed.topology import HUB_ID


@dataclass(frozen=True)
class CodedUpdate:
    """Step `step`'s coded update on disk: the chunks back to back, and their sizes."""

    step: int
    spec: str
    path: Path
    chunk_sizes: tuple[int, ...]

    def chunk(self, index: int) -> bytes:
        begin = sum(self.chunk_sizes[:index])
        with open(self.path, "rb") as f:
            f.seek(begin)
            body = f.read(self.chunk_sizes[index])
        if len(body) != self.chunk_sizes[index]:
            raise StoreError(f"{self.path.name}: short read of chunk {index}")
        return body

    def chunks(self) -> list[bytes]:
        data = self.path.read_bytes()
        if len(data) != sum(self.chunk_sizes):
            raise StoreError(
                f"{self.path.name}: {len(data)} bytes, sizes say {sum(self.chunk_sizes)}"
            )
        out, at = [], 0
        for size in self.chunk_sizes:
            out.append(data[at : at + size])
            at += size
        return out


class DownlinkCoder:
    """Codes the hub's updates of one cycle with `spec`; files under `folder`."""

    def __init__(
        self,
        folder: Path,
        residual_path: Path,
        spec: str,
        *,
        chunk_limit: int,
        cycle: int,
        seed: int,
    ) -> None:
        self.folder = folder
        self.codec: Codec = codec_from_spec(spec)
        self.residuals = ResidualStore(residual_path)
        self.chunk_limit, self.cycle, self.seed = chunk_limit, cycle, seed

    def context(self, step: int) -> CodecContext:
        return CodecContext(self.cycle, step, HUB_ID, "down", self.seed, None)

    def plan(self, elements: int) -> ChunkPlan:
        return plan_chunks(self.codec, elements, self.chunk_limit)

    def code(self, step: int, exact: np.ndarray) -> np.ndarray:
        """d_t for `exact` = U_t, durably (see the module docstring)."""
        ctx, plan = self.context(step), self.plan(exact.size)
        residual = self.residuals.load()
        try:
            carried(residual, cycle=self.cycle, step=step, elements=exact.size)
        except ResidualAlreadyApplied:
            return decode_vector(self.codec, self.stored(step).chunks(), ctx, plan)
        out = compensate(exact, residual, self.codec, ctx, plan)
        self.commit(step, out.chunks, out.residual)
        return out.decoded

    def session(self, step: int, elements: int) -> DownlinkSession:
        """Step `step`'s coding, chunk by chunk, for a progressive finalize."""
        return DownlinkSession(self, step, elements)

    def commit(self, step: int, chunks: list[bytes], residual: Residual) -> None:
        """The coded chunks of `step`, then its residual: the commit point (rule 2)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._bin(step), b"".join(chunks))
        sizes = {"chunk_sizes": [len(c) for c in chunks], "spec": self.codec.spec, "step": step}
        atomic_write(self._sizes(step), json.dumps(sizes, sort_keys=True).encode())
        self.residuals.save(residual)  # the commit point

    def stored(self, step: int) -> CodedUpdate:
        """Step `step`'s coded update as written; StoreError if it is not there."""
        try:
            meta = json.loads(self._sizes(step).read_bytes())
        except FileNotFoundError:
            raise StoreError(f"no coded update for step {step} in {self.folder}") from None
        if meta.get("step") != step or meta.get("spec") != self.codec.spec:
            raise StoreError(
                f"{self._sizes(step).name} is {meta}, not step {step} {self.codec.spec}"
            )
        return CodedUpdate(step, self.codec.spec, self._bin(step), tuple(meta["chunk_sizes"]))

    def _bin(self, step: int) -> Path:
        return self.folder / f"coded-{step:012d}.bin"

    def _sizes(self, step: int) -> Path:
        return self.folder / f"coded-{step:012d}.json"


class DownlinkSession:
    """One step's downlink coding, chunk after chunk in plan order (see the module
    docstring): `code_chunk` for each, then `commit` once every chunk is coded."""

    def __init__(self, coder: DownlinkCoder, step: int, elements: int) -> None:
        self.coder, self.step = coder, step
        self.ctx, self.plan = coder.context(step), coder.plan(elements)
        self.chunks: list[bytes] = []
        self._stored: CodedUpdate | None = None
        self._carried = np.zeros(0, dtype=np.float32)
        try:
            self._carried = carried(
                coder.residuals.load(), cycle=coder.cycle, step=step, elements=elements
            )
        except ResidualAlreadyApplied:
            self._stored = coder.stored(step)  # committed before: its chunks, never again
        self._left = np.empty(elements if self._stored is None else 0, dtype=np.float32)

    def spans(self) -> list[ChunkSpan]:
        return self.plan.spans()

    def code_chunk(self, index: int, exact: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Chunk `index` of d_t from U_t's elements of its span: (its bytes, d_t there)."""
        if index != len(self.chunks):
            raise ValueError(f"chunk {index} coded out of order (next is {len(self.chunks)})")
        span = self.plan.span(index)
        codec = self.coder.codec
        if self._stored is not None:
            body = self._stored.chunk(index)
            decoded = codec.decode(body, span.elements, self.ctx, span.first_block)
        else:
            flat = flat_float32(exact)
            if flat.size != span.elements:
                raise ValueError(f"chunk {index} has {span.elements} elements, got {flat.size}")
            x = flat + self._carried[span.begin : span.end]
            body = codec.encode(x, self.ctx, span.first_block)
            decoded = codec.decode(body, span.elements, self.ctx, span.first_block)
            self._left[span.begin : span.end] = x - decoded
        self.chunks.append(body)
        return body, decoded

    def commit(self) -> None:
        """Write the coded update and, last, the residual e_t (a no-op if step t was
        committed before)."""
        if len(self.chunks) != self.plan.chunks:
            raise ValueError(f"{len(self.chunks)} of {self.plan.chunks} chunks coded")
        if self._stored is None:
            residual = Residual(self.coder.cycle, self.step, self._left)
            self.coder.commit(self.step, self.chunks, residual)

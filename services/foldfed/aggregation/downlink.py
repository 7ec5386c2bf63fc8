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
the whole vector (a test pins it). The session reads e_{t-1} slice by slice and writes the
coded chunks and e_t to temporary files as each chunk is coded, so it holds O(chunk) of
them (4 B per parameter of residual would be 1.47 GB at OpenFold3-full size). Nothing is
renamed into place before `commit`, which commits the same files in the same order as
`code`, the residual last: a crash mid-way leaves the residual of step t - 1 (and
temporaries that the aggregator deletes at start-up), and the next attempt codes the same
bytes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldfed.aggregation.fileio import AtomicFile
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
from foldfed.codecs_store import ResidualReader, ResidualStore, ResidualWriter
from foldfed.durable import atomic_write
from foldfed.errors import CodecError, StoreError
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
        atomic_write(self.bin_path(step), b"".join(chunks))
        self.write_sizes(step, [len(c) for c in chunks])
        self.residuals.save(residual)  # the commit point

    def write_sizes(self, step: int, sizes: list[int]) -> None:
        """Step `step`'s chunk sizes (the .json beside the .bin), atomically."""
        meta = {"chunk_sizes": sizes, "spec": self.codec.spec, "step": step}
        atomic_write(self._sizes(step), json.dumps(meta, sort_keys=True).encode())

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
        return CodedUpdate(step, self.codec.spec, self.bin_path(step), tuple(meta["chunk_sizes"]))

    def bin_path(self, step: int) -> Path:
        return self.folder / f"coded-{step:012d}.bin"

    def _sizes(self, step: int) -> Path:
        return self.folder / f"coded-{step:012d}.json"


class DownlinkSession:
    """One step's downlink coding, chunk after chunk in plan order (see the module
    docstring): `code_chunk` for each, then `commit` once every chunk is coded, or
    `discard`. Memory O(chunk): the carried residual is read by slices, and the coded
    chunks and the new residual go to temporary files as each chunk is coded."""

    def __init__(self, coder: DownlinkCoder, step: int, elements: int) -> None:
        self.coder, self.step = coder, step
        self.ctx, self.plan = coder.context(step), coder.plan(elements)
        self.sizes: list[int] = []  # of the chunks coded so far
        self._stored: CodedUpdate | None = None
        self._carried: ResidualReader | None = None
        self._bin: AtomicFile | None = None
        self._left: ResidualWriter | None = None
        try:
            self._carried = self._open_carried(elements)
            if self._stored is None:
                coder.folder.mkdir(parents=True, exist_ok=True)
                self._bin = AtomicFile(coder.bin_path(step))
                self._left = coder.residuals.writer(coder.cycle, step, elements)
        except BaseException:
            self.discard()
            raise

    def _open_carried(self, elements: int) -> ResidualReader | None:
        """e_{t-1}, to read by slices (None: zeros); codecs.carried's rules, without
        loading it: another cycle's is dropped, one of step t or later means step t was
        committed before (its stored chunks are used, never coded again)."""
        reader = self.coder.residuals.open()
        if reader is None or reader.cycle != self.coder.cycle:
            return _closed(reader)
        if reader.step >= self.step:
            reader.close()
            self._stored = self.coder.stored(self.step)
            return None
        if reader.elements != elements:
            reader.close()
            raise CodecError(f"residual has {reader.elements} elements, delta has {elements}")
        return reader

    def spans(self) -> list[ChunkSpan]:
        return self.plan.spans()

    def code_chunk(self, index: int, exact: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Chunk `index` of d_t from U_t's elements of its span: (its bytes, d_t there)."""
        if index != len(self.sizes):
            raise ValueError(f"chunk {index} coded out of order (next is {len(self.sizes)})")
        span = self.plan.span(index)
        codec = self.coder.codec
        if self._stored is not None:
            body = self._stored.chunk(index)
            decoded = codec.decode(body, span.elements, self.ctx, span.first_block)
        else:
            assert self._bin is not None and self._left is not None
            flat = flat_float32(exact)
            if flat.size != span.elements:
                raise ValueError(f"chunk {index} has {span.elements} elements, got {flat.size}")
            x = flat if self._carried is None else flat + self._carried.read(span.begin, span.end)
            body = codec.encode(x, self.ctx, span.first_block)
            decoded = codec.decode(body, span.elements, self.ctx, span.first_block)
            self._bin.write(body)
            self._left.write(x - decoded)
        self.sizes.append(len(body))
        return body, decoded

    def sync_written(self) -> None:
        """fdatasync the temporary files so far: `commit` then has only the tail to wait for."""
        if self._bin is not None and self._left is not None:
            self._bin.sync_written()
            self._left.sync_written()

    def commit(self) -> None:
        """Commit the coded update and, last, the residual e_t, in DownlinkCoder.commit's
        order and with its bytes (a no-op if step t was committed before)."""
        if len(self.sizes) != self.plan.chunks:
            raise ValueError(f"{len(self.sizes)} of {self.plan.chunks} chunks coded")
        if self._bin is not None and self._left is not None:
            self._bin.commit()
            self.coder.write_sizes(self.step, self.sizes)
            self._left.commit()  # the commit point
        self.discard()

    def discard(self) -> None:
        """Delete what was not committed and close the files (safe to call twice)."""
        if self._bin is not None:
            self._bin.__exit__(None, None, None)
        if self._left is not None:
            self._left.discard()
        self._carried = _closed(self._carried)


def _closed(reader: ResidualReader | None) -> None:
    if reader is not None:
        reader.close()

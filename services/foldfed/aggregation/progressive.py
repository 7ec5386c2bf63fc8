"""A progressive finalize: the step's update and θ_{t+1}, front to back, while deltas arrive.

finalize.py computes step t's outputs in one pass once every delta is in. Every operation
of that pass is elementwise (the mean, the server optimizer, the rounding to each
tensor's dtype, θ_t + update; the downlink codec codes each chunk alone), and both files
are written in canonical order, front to back. So the same pass can stop at any element
and go on later: `ProgressiveFinalize.advance(prefix)` computes the canonical elements
[done, prefix) — those every member's counted chunks already cover (aggregation/progress.py)
— and returns the downlink chunks of the update they complete, to broadcast at once;
`finish()` computes the rest and commits. The bytes are finalize_step's, whatever the
schedule of prefixes (tests pin it for every optimizer, both downlink kinds and several
schedules):

- fp32 downlink: the update file is written as its elements become final; its byte chunks
  (the aggregator's FOLDFED_CHUNK_SIZE) are cut from the written bytes as each one fills;
- coded downlink: elements are computed one downlink chunk at a time (the codec's chunk
  plan over the canonical vector): the exact update U_t of the chunk's span, coded with
  the hub's residual slice (downlink.DownlinkSession), and θ_{t+1} = θ_t + d_t there.

Commit points are finalize_step's: nothing of a progressive run is durable before
`finish()`. The files are written under temporary names (fileio.AtomicFile), the optimizer
state into a temporary generation (state.py), the coded chunks and the residual to
temporary files as each chunk is coded (downlink.DownlinkSession: memory O(chunk));
`finish()` commits them in the order `DownlinkCoder.code` does (the residual last: the
commit point of "step t is coded"), then the update and the model are renamed into place
and the optimizer state committed. A crash mid-way leaves step t - 1's
state: the next attempt starts from zero and writes the same bytes (the sums of the ranges
finished before the crash are final, and every step is deterministic), so chunks already
broadcast are the ones the final update manifest names.

Already written bytes are flushed and fdatasync'ed as the run goes (`advance`): they are
not durable in any sense that matters before the rename, but the final fsync then has
only the tail left, which is what keeps the release after the last delivery short.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from foldfed.aggregation.accumulator import Accumulator
from foldfed.aggregation.downlink import DownlinkCoder, DownlinkSession
from foldfed.aggregation.dtypes import STORAGE, add_in_dtype, from_float64, to_float64
from foldfed.aggregation.errors import FinalizeError
from foldfed.aggregation.fileio import AtomicFile, pread_into
from foldfed.aggregation.finalize import (
    DEFAULT_SLICE_ELEMENTS,
    FinalizeResult,
    _base_hasher,
    _check_base,
    _check_finite,
    _Finalizer,
    _read_header,
    canonical_header,
    canonical_order,
)
from foldfed.aggregation.fixedpoint import check_weight
from foldfed.aggregation.layout import ModelLayout, TensorSlot
from foldfed.aggregation.progress import DownlinkCut
from foldfed.aggregation.server_opt import ServerOptimizer
from foldfed.aggregation.state import OptimizerState
from foldfed.digests import digest_of
from foldfed.format import TensorSpan, parse_layout


@dataclass(frozen=True)
class UpdateChunk:
    """One downlink chunk of the update: its index, bytes and blake3 digest."""

    index: int
    body: bytes
    digest: bytes


@dataclass(frozen=True)
class ProgressiveResult:
    """What finalize_step returns, and what the update manifest needs of the chunks."""

    result: FinalizeResult
    digests: tuple[bytes, ...]  # every downlink chunk's, in index order
    sizes: tuple[int, ...]
    payload_digest: bytes  # blake3 of the chunks back to back (the plain update file's)
    payload_size: int
    tensors: tuple[TensorSpan, ...]  # the plain update file's layout (its header's)


@dataclass
class _Piece:
    """Elements [first, first + count) of tensor `slot`, at `at` in the canonical vector."""

    slot: TensorSlot
    first: int
    count: int
    at: int


@dataclass
class _Cutter:
    """The plain update file's bytes, cut into chunks of `size` as they are written."""

    size: int
    pending: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self.pending += data
        out = []
        while len(self.pending) >= self.size:
            out.append(bytes(self.pending[: self.size]))
            del self.pending[: self.size]
        return out

    def rest(self) -> list[bytes]:
        out = [bytes(self.pending)] if self.pending else []
        self.pending.clear()
        return out


class ProgressiveFinalize:
    """Step `step`'s finalize, advanced prefix by prefix (see the module docstring).

    Arguments are finalize_step's, with `downlink` the hub's coder (None: the fp32 update
    file travels, cut into `update_chunk_size` byte chunks). Use as a context manager or
    call `discard()`: an unfinished run deletes its temporary files.
    """

    def __init__(
        self,
        layout: ModelLayout,
        accumulator: Accumulator,
        weight_sum: float,
        base_model_path: Path,
        out_update_path: Path,
        out_model_path: Path,
        optimizer: ServerOptimizer,
        state_dir: Path,
        *,
        step: int,
        downlink: DownlinkCoder | None,
        update_chunk_size: int,
        slice_elements: int = DEFAULT_SLICE_ELEMENTS,
    ) -> None:
        check_weight(weight_sum)
        if accumulator.elements != layout.elements:
            raise ValueError(
                f"accumulator has {accumulator.elements} elements, model {layout.elements}"
            )
        if slice_elements < 1:
            raise ValueError(f"slice_elements must be positive, got {slice_elements}")
        self.elements = layout.elements
        self._slice = slice_elements
        self._order = canonical_order(layout)
        base_spans, base_header = _read_header(base_model_path)
        layout.check_compatible(base_spans)
        self._base_spans = {span.name: span for span in base_spans}
        self._state = OptimizerState(state_dir, optimizer, layout.elements, step)
        self._job = _Finalizer(accumulator, weight_sum, optimizer, self._state, slice_elements)
        self._files: list[AtomicFile] = []
        self._coding: DownlinkSession | None = None
        self._base_fd = -1
        try:
            self._open(layout, base_model_path, base_header, out_update_path, out_model_path)
            header = canonical_header(layout)
            self.tensors = parse_layout(header)
            if downlink is not None:
                self._coding = downlink.session(step, layout.elements)
                self.cut = DownlinkCut.coded((s.begin, s.end) for s in self._coding.spans())
            else:
                size = len(header) + sum(s.count * STORAGE[s.dtype].itemsize for s in self._order)
                self.cut = DownlinkCut.plain(self.tensors, size, update_chunk_size)
            self._cutter = _Cutter(update_chunk_size)
            self._payload_hash = blake3.blake3()
            self._digests: list[bytes] = []
            self._sizes: list[int] = []
            self._done = 0  # canonical elements written to both files
            # A header longer than a chunk fills chunks before any element is final.
            self._backlog = self._cut([header]) if self._coding is None else []
        except BaseException:
            self.discard()
            raise

    def _open(
        self, layout: ModelLayout, base: Path, base_header: bytes, update: Path, model: Path
    ) -> None:
        self._update_out = AtomicFile(update)
        self._files.append(self._update_out)
        self._model_out = AtomicFile(model)
        self._files.append(self._model_out)
        self._base_path = base
        self._base_fd = os.open(base, os.O_RDONLY)
        header = canonical_header(layout)
        self._base_hash = _base_hasher(base, base_header, header, self._state)
        self._update_out.write(header)
        self._model_out.write(header)

    # ---------------------------------------------------------------- progress

    @property
    def done(self) -> int:
        """Canonical elements finished so far."""
        return self._done

    @property
    def published(self) -> int:
        """Downlink chunks handed out so far (indices 0 .. published - 1)."""
        return len(self._digests)

    def advance(self, prefix: int) -> list[UpdateChunk]:
        """Compute what a final prefix of `prefix` canonical elements allows; the downlink
        chunks that newly became complete, in index order."""
        prefix = min(prefix, self.elements)
        out, self._backlog = self._backlog, []
        before = self._done
        if self._coding is not None:
            while self.published < self.cut.chunks and self.cut.ends[self.published] <= prefix:
                out.append(self._code_next())
        elif prefix > self._done:
            out += self._cut(self._write(self._done, prefix, None))
            if self._done == self.elements:  # the last, partial chunk: nothing more comes
                out += self._emit(self._cutter.rest())
        if self._done > before:
            self._sync()
        return out

    def finish(self) -> tuple[ProgressiveResult, list[UpdateChunk]]:
        """Compute the rest and commit (finalize_step's commit order); the result, and the
        downlink chunks not handed out before."""
        try:
            rest = self.advance(self.elements)
            if self._coding is None:
                rest += self._emit(self._cutter.rest())
            _check_base(self._base_hash, self._state, self._base_path)
            if self._coding is not None:
                self._coding.commit()  # the coded update, then the residual
            update_digest = self._update_out.commit()
            model_digest = self._model_out.commit()
            self._state.commit(model_digest)
        except BaseException:
            self.discard()
            raise
        self._close_base()
        result = FinalizeResult(
            update_digest, model_digest, self._update_out.path, self._model_out.path
        )
        payload_digest = update_digest if self._coding is None else self._payload_hash.digest()
        return (
            ProgressiveResult(
                result,
                tuple(self._digests),
                tuple(self._sizes),
                payload_digest,
                sum(self._sizes),
                self.tensors,
            ),
            rest,
        )

    def discard(self) -> None:
        """Forget the run: temporary files deleted, optimizer state as it was."""
        self._state.discard()
        if self._coding is not None:
            self._coding.discard()
        for f in self._files:
            f.__exit__(None, None, None)
        self._files.clear()
        self._close_base()

    def __enter__(self) -> ProgressiveFinalize:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    # ---------------------------------------------------------------- the work

    def _code_next(self) -> UpdateChunk:
        assert self._coding is not None
        index = self.published
        begin, end = self.cut.end_of(index), self.cut.ends[index]
        exact = np.empty(end - begin, dtype=np.float32)
        for piece in self._pieces(begin, end):
            update = self._job._update(piece.slot, piece.slot.offset + piece.first, piece.count)
            exact[piece.at - begin : piece.at - begin + piece.count] = to_float64(
                update, piece.slot.dtype
            ).astype(np.float32)
        body, decoded = self._coding.code_chunk(index, exact)
        if decoded.dtype != np.float32 or decoded.size != end - begin:
            raise FinalizeError("the downlink must return one float32 per model element")
        self._write(begin, end, decoded)
        self._payload_hash.update(body)
        return self._chunk(index, body)

    def _write(self, begin: int, end: int, applied: np.ndarray | None) -> list[bytes]:
        """Update and θ_{t+1} of canonical elements [begin, end) appended to both files;
        the update's bytes (for the plain downlink's chunks). `applied`: d_t there."""
        if begin != self._done:
            raise ValueError(f"elements written out of order: {begin} after {self._done}")
        written: list[bytes] = []
        for piece in self._pieces(begin, end):
            slot, storage = piece.slot, STORAGE[piece.slot.dtype]
            theta = np.empty(piece.count, dtype=storage)
            span = self._base_spans[slot.name]
            pread_into(self._base_fd, theta, span.begin + piece.first * storage.itemsize)
            if self._base_hash is not None:
                self._base_hash.update(theta.view(np.uint8).data)
            if applied is None:
                update = self._job._update(slot, slot.offset + piece.first, piece.count)
            else:
                values = applied[piece.at - begin : piece.at - begin + piece.count]
                update = from_float64(values.astype(np.float64), slot.dtype)
                _check_finite(slot, "update", update)
            model = add_in_dtype(theta, update, slot.dtype)
            _check_finite(slot, "next model", model)
            self._update_out.write(update)
            self._model_out.write(model)
            if applied is None:
                written.append(update.view(np.uint8).tobytes())
        self._done = end
        return written

    def _pieces(self, begin: int, end: int) -> Iterator[_Piece]:
        """Canonical elements [begin, end) as tensor pieces of at most the slice size."""
        at = 0
        for slot in self._order:
            lo, hi = max(begin, at), min(end, at + slot.count)
            for start in range(lo, hi, self._slice):
                count = min(self._slice, hi - start)
                yield _Piece(slot, start - at, count, start)
            at += slot.count
            if at >= end:
                break

    def _emit(self, bodies: Sequence[bytes]) -> list[UpdateChunk]:
        """Complete chunks of the plain update, numbered on from those handed out."""
        return [self._chunk(self.published, body) for body in bodies]

    def _cut(self, written: Sequence[bytes]) -> list[UpdateChunk]:
        """The plain update's newly written bytes -> the chunks they complete."""
        return self._emit([body for data in written for body in self._cutter.feed(data)])

    def _chunk(self, index: int, body: bytes) -> UpdateChunk:
        digest = digest_of(body)
        self._digests.append(digest)
        self._sizes.append(len(body))
        return UpdateChunk(index, body, digest)

    def _sync(self) -> None:
        for f in self._files:
            f.sync_written()
        if self._coding is not None:
            self._coding.sync_written()

    def _close_base(self) -> None:
        if self._base_fd >= 0:
            os.close(self._base_fd)
            self._base_fd = -1

"""A step's integer sum -> the global update and the next model, streamed slice by slice.

For each tensor, in slices of at most `slice_elements` elements, finalize reads the sums
from the accumulator, the optimizer state and θ_t, computes

    mean   = sum / (W * 2**F)                    float64 (fixedpoint.dequantize_mean)
    update = optimizer(mean, state)              float64, rounded once to the tensor's dtype
    θ_t+1  = θ_t + update                        in the tensor's dtype, as torch adds

and appends the update and θ_t+1 to their files. Memory is O(slice) whatever the model
size; every operation is elementwise and correctly rounded, so the bytes do not depend on
the slice size or the machine.

With a lossy downlink (`downlink`, the hub's coder with its error feedback), the update
that travels is not the exact one: finalize first gathers the exact update as one float32
vector in canonical order (O(model) memory), asks `downlink` for the update every party
will apply (the decoded coded update, d_t), and then writes d_t as the update and
θ_t+1 = θ_t + d_t, so the hub's θ_t+1 is bit-identical to every participant's.

Both outputs are canonical payloads (foldfed.format): byte-identical to what
`deltafile.write_delta(path, tensors)` writes for the same tensors (same header bytes,
tensors in its order), whatever the order or metadata of θ_t's file. The header comes
from the format's own encoder, fed names, dtypes and shapes: the hub never loads torch.
The update has the model's names, dtypes and shapes. Each file is written to a temporary
name, fsynced and renamed, and its blake3 digest (foldfed.digests) is computed while
writing. Finalizing again with the same inputs writes the same bytes (see state.py for the
optimizer state).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from foldfed.aggregation.accumulator import Accumulator
from foldfed.aggregation.dtypes import (
    STORAGE,
    add_in_dtype,
    count_nonfinite,
    from_float64,
    to_float64,
)
from foldfed.aggregation.errors import FinalizeError
from foldfed.aggregation.fileio import AtomicFile, pread_into
from foldfed.aggregation.fixedpoint import check_weight, dequantize_mean
from foldfed.aggregation.layout import ModelLayout, TensorSlot
from foldfed.aggregation.server_opt import ServerOptimizer
from foldfed.aggregation.state import OptimizerState
from foldfed.errors import StoreError
from foldfed.format import TensorSpan, TensorSpec, encode_header
from foldfed.format import canonical_order as canonical_spec_order
from foldfed.payloadfile import read_layout

# 64 Ki elements: a slice's float64 temporaries (512 KiB each) stay in cache from one step
# of the pipeline to the next, and its reads and writes are still big enough for syscalls
# not to matter. Measured on 64 MiB of float32: 1 Mi-element slices took 1.6x (FedAvg) to
# 3x (FedAdam) as long.
DEFAULT_SLICE_ELEMENTS = 1 << 16

# The exact update (float32, canonical order) -> the update every party applies.
Downlink = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FinalizeResult:
    update_digest: bytes
    model_digest: bytes
    update_path: Path
    model_path: Path


def canonical_order(layout: ModelLayout) -> list[TensorSlot]:
    """The tensors in the order `deltafile.write_delta` lays them out (format.canonical_order)."""
    slots = {slot.name: slot for slot in layout.slots}
    return [slots[spec.name] for spec in canonical_spec_order(_specs(layout))]


def canonical_header(layout: ModelLayout) -> bytes:
    """The length prefix and header `deltafile.write_delta` writes for the model's tensors.

    The same encoder the writer uses (format.encode_header), fed names, dtypes and shapes:
    identical bytes are what make the digests agree (a test pins it).
    """
    return encode_header(_specs(layout))


def _specs(layout: ModelLayout) -> list[TensorSpec]:
    return [TensorSpec(slot.name, slot.dtype, slot.shape) for slot in layout.slots]


def finalize_step(
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
    slice_elements: int = DEFAULT_SLICE_ELEMENTS,
    downlink: Downlink | None = None,
) -> FinalizeResult:
    """Write step `step`'s global update and θ_{step+1}; see the module docstring.

    `weight_sum` is the sum of the weights added (fixedpoint.weight_total); `step` names
    the optimizer-state generation to read (state.py; FedAvg keeps none); `downlink`, if
    given, turns the exact update into the one that is applied and written.
    """
    check_weight(weight_sum)
    if accumulator.elements != layout.elements:
        raise ValueError(
            f"accumulator has {accumulator.elements} elements, model {layout.elements}"
        )
    if slice_elements < 1:
        raise ValueError(f"slice_elements must be positive, got {slice_elements}")
    base_spans, base_header = _read_header(base_model_path)
    layout.check_compatible(base_spans)
    state = OptimizerState(state_dir, optimizer, layout.elements, step)
    job = _Finalizer(accumulator, weight_sum, optimizer, state, slice_elements)
    try:
        if downlink is not None:
            applied = downlink(job.exact_vector(layout))
            if applied.dtype != np.float32 or applied.size != layout.elements:
                raise FinalizeError("the downlink must return one float32 per model element")
            job.applied = applied
        with AtomicFile(out_update_path) as update_out, AtomicFile(out_model_path) as model_out:
            header = canonical_header(layout)
            base_hash = _base_hasher(base_model_path, base_header, header, state)
            update_out.write(header)
            model_out.write(header)
            with open(base_model_path, "rb", buffering=0) as base:
                for update, model in job.model(layout, base.fileno(), base_spans, base_hash):
                    update_out.write(update)
                    model_out.write(model)
            _check_base(base_hash, state, base_model_path)
            update_digest, model_digest = update_out.commit(), model_out.commit()
        state.commit(model_digest)
    except BaseException:
        state.discard()
        raise
    return FinalizeResult(update_digest, model_digest, out_update_path, out_model_path)


@dataclass
class _Finalizer:
    accumulator: Accumulator
    weight_sum: float
    optimizer: ServerOptimizer
    state: OptimizerState
    slice_elements: int
    # The update to apply, float32 in canonical order (a lossy downlink's); None: exact.
    applied: np.ndarray | None = None

    def exact_vector(self, layout: ModelLayout) -> np.ndarray:
        """The exact update of every tensor, as float32, in canonical file order."""
        out = np.empty(layout.elements, dtype=np.float32)
        at = 0
        for slot in canonical_order(layout):
            for start in range(0, slot.count, self.slice_elements):
                count = min(self.slice_elements, slot.count - start)
                update = self._update(slot, slot.offset + start, count)
                out[at : at + count] = to_float64(update, slot.dtype).astype(np.float32)
                at += count
        return out

    def model(
        self,
        layout: ModelLayout,
        base_fd: int,
        base_spans: Sequence[TensorSpan],
        base_hash: blake3.blake3 | None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(update, next model) slices of every tensor, in canonical file order."""
        spans = {span.name: span for span in base_spans}
        at = 0  # where the tensor starts in the canonical-order vector
        for slot in canonical_order(layout):
            yield from self.tensor(slot, base_fd, spans[slot.name], base_hash, at)
            at += slot.count

    def tensor(
        self,
        slot: TensorSlot,
        base_fd: int,
        span: TensorSpan,
        base_hash: blake3.blake3 | None,
        at: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(update, next model) of `slot`, slice after slice, as stored elements."""
        storage = STORAGE[slot.dtype]
        for start in range(0, slot.count, self.slice_elements):
            count = min(self.slice_elements, slot.count - start)
            theta = np.empty(count, dtype=storage)
            pread_into(base_fd, theta, span.begin + start * storage.itemsize)
            if base_hash is not None:
                base_hash.update(theta.view(np.uint8).data)
            if self.applied is None:
                update = self._update(slot, slot.offset + start, count)
            else:
                piece = self.applied[at + start : at + start + count]
                update = from_float64(piece.astype(np.float64), slot.dtype)
                _check_finite(slot, "update", update)
            model = add_in_dtype(theta, update, slot.dtype)
            _check_finite(slot, "next model", model)
            yield update, model

    def _update(self, slot: TensorSlot, offset: int, count: int) -> np.ndarray:
        mean = dequantize_mean(self.accumulator.read(offset, count), self.weight_sum)
        update, state = self.optimizer.step(mean, self.state.read(offset, count))
        self.state.write(offset, state)
        stored = from_float64(update, slot.dtype)
        _check_finite(slot, "update", stored)
        return stored


def _base_hasher(
    path: Path, base_header: bytes, header: bytes, state: OptimizerState
) -> blake3.blake3 | None:
    """A hasher for θ_t when the optimizer state names the model it goes with.

    A canonical θ_t (every model finalize wrote) is read front to back in file order, so
    hashing the slices as they are read gives the file's digest at no extra read. Any other
    file is hashed in a pass of its own, and checked at once.
    """
    if state.expected_model_digest is None:
        return None
    hasher = blake3.blake3()
    if base_header == header:
        hasher.update(base_header)
        return hasher
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            hasher.update(block)
    _check_base(hasher, state, path)
    return None


def _check_base(hasher: blake3.blake3 | None, state: OptimizerState, path: Path) -> None:
    expected = state.expected_model_digest
    if hasher is not None and expected is not None and hasher.digest() != expected:
        raise StoreError(
            f"{path.name} is not the model the optimizer state goes with: "
            f"blake3 {hasher.digest().hex()[:12]} != {expected.hex()[:12]}"
        )


def _check_finite(slot: TensorSlot, what: str, stored: np.ndarray) -> None:
    bad = count_nonfinite(stored, slot.dtype)
    if bad:
        raise FinalizeError(
            f"the {what} of tensor {slot.name!r} has {bad} non-finite values in {slot.dtype}"
        )


def _read_header(path: Path) -> tuple[Sequence[TensorSpan], bytes]:
    """θ_t's layout and its raw header bytes (length prefix included)."""
    spans = read_layout(path)
    data_start = spans[0].begin if spans else os.path.getsize(path)
    with open(path, "rb") as f:
        return spans, f.read(data_start)

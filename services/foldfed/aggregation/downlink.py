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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldfed.codecs import (
    Codec,
    CodecContext,
    ResidualAlreadyApplied,
    carried,
    codec_from_spec,
    compensate,
    decode_vector,
    plan_chunks,
)
from foldfed.codecs.plan import ChunkPlan
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
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._bin(step), b"".join(out.chunks))
        sizes = {"chunk_sizes": [len(c) for c in out.chunks], "spec": self.codec.spec, "step": step}
        atomic_write(self._sizes(step), json.dumps(sizes, sort_keys=True).encode())
        self.residuals.save(out.residual)  # the commit point
        return out.decoded

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

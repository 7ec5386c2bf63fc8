"""A member's side of secure aggregation: its delta as a masked fixed-point vector.

With FOLDFED_SECURE_AGGREGATION on, delta t travels as a `masked-ring` payload
(docs/format.md, "Masked payloads"): for each model element, in the delta file's tensor
order (the model's, which the hub checks),

    y = rint(w * x * 2**24) + sum_{j > me} m_{me,j} - sum_{j < me} m_{me,j}   (mod 2**k)

q is made by the hub's own `aggregation.quantize` on the same values, so the hub's
unmasked sum is bit-identical to the plaintext run's. Masks (foldfed.secagg) come from this
member's Ed25519 seed (FOLDFED_SIGNING_KEY) and the members' public keys
(FOLDFED_MEMBER_KEYS); the members are the ones release t names.

Update bound: the hub sees no plaintext, so the member applies the bound itself (refuse,
or clip with FOLDFED_UPDATE_CLIP: uploader/bounding.py, the fp32 path's) and attests the
norm of what it masked in the signed manifest; the hub checks that number.

Uplink codecs do not compose with these masks (a codec's per-member scales and rounding
would not sum on the ring): a cycle with a codec other than fp32:v1 is refused with a
ConfigError, never silently sent in clear.

Deterministic: the same delta, weight and step give the same bytes, so a restarted member
sends the same manifest id and chunks. The payload, then its manifest (the commit point),
are written under coding/ (delta-<t>.masked, delta-<t>.manifest) one chunk at a time
(memory O(chunk)); a restart after the commit reuses them as they are, so the upload
journal resumes. No torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from foldfed.aggregation.dtypes import decode_narrow
from foldfed.aggregation.fileio import AtomicFile
from foldfed.aggregation.fixedpoint import quantize
from foldfed.codedvector import vector_spans
from foldfed.digests import digest_of
from foldfed.domain import CODEC_MASKED_RING, Manifest
from foldfed.durable import atomic_write
from foldfed.errors import ConfigError
from foldfed.format import TensorSpan
from foldfed.keyfiles import read_keyring, read_private_key
from foldfed.messages import decode, encode
from foldfed.payloadfile import read_layout
from foldfed.secagg.agreement import pair_keys
from foldfed.secagg.masks import check_ring_bits, mask_contribution, member_mask, word_size
from foldfed.spool import DeltaRecord
from foldfed.uploader.bounding import file_norm
from foldfed.uploader.coding import Prepared, UplinkCoder

log = structlog.get_logger(__name__)


class MaskedUplink:
    """Makes delta t's masked payload and manifest (see the module docstring)."""

    def __init__(
        self, coder: UplinkCoder, signing_key: Path | None, member_keys: Path | None, bits: int
    ) -> None:
        if signing_key is None or member_keys is None:
            raise ConfigError(
                "FOLDFED_SECURE_AGGREGATION needs FOLDFED_SIGNING_KEY and FOLDFED_MEMBER_KEYS:"
                " the pairwise mask keys come from them"
            )
        check_ring_bits(bits)
        self.coder = coder
        self.bits = bits
        self._seed = read_private_key(signing_key).seed
        self._publics = {k.name: k.public for k in read_keyring(member_keys).keys}

    def prepare(self, delta: DeltaRecord) -> Prepared:
        coding = self.coder.coding_for(delta.step)
        if not coding.reference:
            raise ConfigError(
                f"the cycle's uplink codec {coding.spec!r} does not compose with secure"
                " aggregation: run the cycle with FOLDFED_CODEC=fp32:v1"
            )
        members = self.coder.members_for(delta.step)
        me = self.coder.participant
        if me not in members:
            raise ConfigError(f"release {delta.step} does not name {me!r} among its members")
        stored = self._stored(delta.step)
        if stored is not None:
            return stored
        publics = self._member_publics(members)
        keys = pair_keys(me, self._seed, publics, cycle=coding.cycle, step=delta.step)
        bounded = self.coder.bounded_payload(delta)  # refused or clipped as the fp32 path
        norm = file_norm(bounded, self.coder.chunk_limit)
        self.coder.folder.mkdir(parents=True, exist_ok=True)
        path = self._payload(delta.step)
        masked = _write_masked(bounded, path, delta.weight, self.coder.chunk_limit,
                               lambda b, e: member_mask(me, keys, b, e, self.bits),
                               self.bits, len(members))  # fmt: skip
        manifest = Manifest(
            step=delta.step,
            participant=me,
            weight=delta.weight,
            codec=CODEC_MASKED_RING,
            tensors=masked.tensors,
            chunk_size=self.coder.chunk_limit,
            payload_size=masked.size,
            chunk_digests=masked.digests,
            payload_digest=masked.digest,
            base_model_digest=delta.base_model_digest,
            cycle=coding.cycle,
            ring_bits=self.bits,
            attested_norm=norm,
        )
        serialized = encode(manifest)[1]
        atomic_write(self._manifest(delta.step), serialized)  # after the payload: the commit
        log.info("delta masked", step=delta.step, members=len(members), ring_bits=self.bits,
                 bytes=masked.size, attested_norm=norm)  # fmt: skip
        return Prepared(manifest, serialized, path)

    def _stored(self, step: int) -> Prepared | None:
        """What an earlier run (before a restart) made for `step`: the same bytes, and the
        same payload file, so the upload journal resumes where it stopped."""
        try:
            serialized = self._manifest(step).read_bytes()
        except FileNotFoundError:
            return None
        manifest = decode("foldfed.v1.DeltaManifest", serialized)
        path = self._payload(step)
        if not (isinstance(manifest, Manifest) and manifest.masked and path.is_file()):
            return None
        if manifest.ring_bits != self.bits or manifest.step != step:
            return None
        return Prepared(manifest, serialized, path)

    def _payload(self, step: int) -> Path:
        return self.coder.folder / f"delta-{step:012d}.masked"

    def _manifest(self, step: int) -> Path:
        return self.coder.folder / f"delta-{step:012d}.manifest"

    def _member_publics(self, members: tuple[str, ...]) -> Mapping[str, bytes]:
        missing = [m for m in members if m not in self._publics]
        if missing:
            raise ConfigError(f"FOLDFED_MEMBER_KEYS has no key for member {missing[0]!r}")
        return {m: self._publics[m] for m in members}


@dataclass(frozen=True)
class _MaskedPayload:
    tensors: tuple[TensorSpan, ...]
    digests: tuple[bytes, ...]
    digest: bytes
    size: int


def _write_masked(
    source: Path,
    out: Path,
    weight: float,
    chunk_size: int,
    mask_of: Callable[[int, int], np.ndarray],
    bits: int,
    members: int,
) -> _MaskedPayload:
    """Write the masked payload of the safetensors file `source` to `out`, one wire chunk
    at a time (memory O(chunk), whatever the model): each chunk's elements are read,
    quantized exactly as the hub quantizes them (`aggregation.quantize`, elementwise, so
    the cut does not matter), masked with `mask_of(begin, end)` and hashed."""
    spans = read_layout(source)
    tensors = vector_spans([(s.name, s.dtype, tuple(s.shape)) for s in spans])
    elements = tensors[-1].end if tensors else 0
    per_chunk = chunk_size // word_size(bits)  # chunk sizes are multiples of 8: whole words
    digests = []
    fd = os.open(source, os.O_RDONLY)
    try:
        with AtomicFile(out) as payload:
            for begin in range(0, elements, per_chunk):
                end = min(begin + per_chunk, elements)
                q = np.empty(end - begin, dtype=np.int64)
                for span, at in zip(spans, tensors, strict=True):
                    lo, hi = max(at.begin, begin), min(at.end, end)
                    if lo < hi:
                        raw = os.pread(fd, (hi - lo) * span.itemsize,
                                       span.begin + (lo - at.begin) * span.itemsize)  # fmt: skip
                        values = decode_narrow(raw, span.dtype, tensor=span.name)
                        q[lo - begin : hi - begin] = quantize(values, weight, tensor=span.name)
                body = mask_contribution(q, mask_of(begin, end), bits, members).tobytes()
                digests.append(digest_of(body))
                payload.write(body)
            digest = payload.commit()
    finally:
        os.close(fd)
    return _MaskedPayload(tensors, tuple(digests), digest, elements * word_size(bits))

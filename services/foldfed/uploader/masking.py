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
sends the same manifest id and chunks (the upload journal resumes them). The payload and
its manifest are written under coding/ (delta-<t>.masked, delta-<t>.manifest). No torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import structlog

from foldfed.aggregation.dtypes import decode_narrow
from foldfed.aggregation.fixedpoint import quantize
from foldfed.codedvector import vector_spans
from foldfed.digests import digest_of
from foldfed.domain import CODEC_MASKED_RING, Manifest
from foldfed.durable import atomic_write
from foldfed.errors import ConfigError
from foldfed.format import TensorSpan, chunk_count, chunk_range
from foldfed.keyfiles import read_keyring, read_private_key
from foldfed.messages import encode
from foldfed.payloadfile import read_layout
from foldfed.secagg.agreement import pair_keys
from foldfed.secagg.masks import check_ring_bits, mask_contribution, member_mask
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
        publics = self._member_publics(members)
        keys = pair_keys(me, self._seed, publics, cycle=coding.cycle, step=delta.step)
        bounded = self.coder.bounded_payload(delta)  # refused or clipped as the fp32 path
        norm = file_norm(bounded, self.coder.chunk_limit)
        tensors, q = _quantized(bounded, delta.weight)
        words = mask_contribution(q, member_mask(me, keys, 0, q.size, self.bits), self.bits,
                                  len(members))  # fmt: skip
        payload = words.tobytes()
        del q, words
        chunk = self.coder.chunk_limit
        digests = tuple(
            digest_of(payload[slice(*chunk_range(len(payload), chunk, i))])
            for i in range(chunk_count(len(payload), chunk))
        )
        manifest = Manifest(
            step=delta.step,
            participant=me,
            weight=delta.weight,
            codec=CODEC_MASKED_RING,
            tensors=tensors,
            chunk_size=chunk,
            payload_size=len(payload),
            chunk_digests=digests,
            payload_digest=digest_of(payload),
            base_model_digest=delta.base_model_digest,
            cycle=coding.cycle,
            ring_bits=self.bits,
            attested_norm=norm,
        )
        serialized = encode(manifest)[1]
        self.coder.folder.mkdir(parents=True, exist_ok=True)
        path = self.coder.folder / f"delta-{delta.step:012d}.masked"
        atomic_write(path, payload)
        atomic_write(self.coder.folder / f"delta-{delta.step:012d}.manifest", serialized)
        log.info("delta masked", step=delta.step, members=len(members), ring_bits=self.bits,
                 bytes=len(payload), attested_norm=norm)  # fmt: skip
        return Prepared(manifest, serialized, path)

    def _member_publics(self, members: tuple[str, ...]) -> Mapping[str, bytes]:
        missing = [m for m in members if m not in self._publics]
        if missing:
            raise ConfigError(f"FOLDFED_MEMBER_KEYS has no key for member {missing[0]!r}")
        return {m: self._publics[m] for m in members}


def _quantized(path: Path, weight: float) -> tuple[tuple[TensorSpan, ...], np.ndarray]:
    """The file's tensors as vector spans, and q = rint(w * x * 2**24) of every element in
    file order, quantized tensor by tensor exactly as the hub quantizes a chunk."""
    spans = read_layout(path)
    data = path.read_bytes()
    tensors = vector_spans([(s.name, s.dtype, tuple(s.shape)) for s in spans])
    q = np.empty(tensors[-1].end if tensors else 0, dtype=np.int64)
    for span, at in zip(spans, tensors, strict=True):
        values = decode_narrow(memoryview(data)[span.begin : span.end], span.dtype,
                               tensor=span.name)  # fmt: skip
        q[at.begin : at.end] = quantize(values, weight, tensor=span.name)
    return tensors, q

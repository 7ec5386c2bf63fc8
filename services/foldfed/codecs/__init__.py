"""Update codecs: a flat float32 vector to bytes per wire chunk and back, deterministically.

Layer 1 (pure core): numpy, blake3 and zstandard only; no I/O. One concept per module:

| module | concept |
|---|---|
| spec | the canonical, versioned parameter string a manifest carries |
| randomness | sign flips and uniforms from blake3 streams, by global element position |
| hadamard | the randomized Hadamard rotation and its padding |
| packing | b-bit codes packed into bytes |
| scale | grid ranges: shared ones from members' delta statistics, or a coder's own |
| context | what a coder needs besides the vector (cycle, step, sender, shared ranges) |
| base | the Codec and LinearCodec contracts, ring sizes |
| floats, int8, rotated | the codecs; zstdlayer, the optional outer layer |
| registry | codecs by spec; the cycle check |
| plan, vector | chunk plans; a whole vector through a codec |
| feedback | error feedback with step-tagged residuals (uplink and downlink) |
| adaptive | the least lossy codec that fits an upload budget |

docs/format.md, section 14, gives the byte layouts, bounds and rules.
"""

from foldfed.codecs.adaptive import (
    CodecChoice,
    Goodput,
    allowed_specs,
    choose_codec,
    choose_for_cycle,
    wire_size,
)
from foldfed.codecs.base import Codec, LinearCodec, ring_bits
from foldfed.codecs.context import CodecContext
from foldfed.codecs.feedback import (
    Compensated,
    Residual,
    ResidualAlreadyApplied,
    carried,
    compensate,
)
from foldfed.codecs.plan import ChunkPlan, ChunkSpan, plan_chunks
from foldfed.codecs.registry import (
    NAMES,
    check_choices,
    codec_from_spec,
    require_allowed_codec,
    require_cycle_codec,
)
from foldfed.codecs.scale import BlockStats, SharedRanges, block_stats, pooled, shared_ranges
from foldfed.codecs.vector import decode_vector, encode_vector, wire_bytes

__all__ = [
    "NAMES",
    "BlockStats",
    "ChunkPlan",
    "ChunkSpan",
    "Codec",
    "CodecChoice",
    "CodecContext",
    "Compensated",
    "Goodput",
    "LinearCodec",
    "Residual",
    "ResidualAlreadyApplied",
    "SharedRanges",
    "allowed_specs",
    "block_stats",
    "carried",
    "check_choices",
    "choose_codec",
    "choose_for_cycle",
    "codec_from_spec",
    "compensate",
    "decode_vector",
    "encode_vector",
    "plan_chunks",
    "pooled",
    "require_allowed_codec",
    "require_cycle_codec",
    "ring_bits",
    "shared_ranges",
    "wire_bytes",
    "wire_size",
]

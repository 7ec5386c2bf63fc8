"""Pairwise masks on the ring of the fixed-point sum: the arithmetic of secure aggregation.

Pure: bytes and numbers in, numpy arrays out (no files, no network, no clock).

Each member i of a step holds its fixed-point contribution q_i (aggregation/fixedpoint.py:
q_i = rint(w_i * x_i * 2**24), an int64 per model element) and sends instead

    y_i = q_i + sum_{j > i} m_ij - sum_{j < i} m_ij        (mod 2**k)

where m_ij = m_ji is a pseudo-random vector only members i and j can compute, and members
are ordered by participant id. Every m_ij appears once with + and once with -, so

    sum_i y_i = sum_i q_i = Q                              (mod 2**k)

exactly. With |Q| < 2**(k-1) (each |q_i| <= (2**(k-1) - 1) // N, `contribution_limit`,
checked by the member before masking) Q is recovered by reducing the sum mod 2**k and
reading it as a signed k-bit number (`ring_reduce`). The hub sums the words as int64
with wraparound (2**k divides 2**64), so the unmasked total is bit-identical to the
plaintext run's Q, and everything after Q (mean, server optimizer, downlink) is unchanged.

The ring: k = 32 (default: 4 bytes per element, the size of an fp32 delta) or 64. With the
grid's 24 fraction bits, k = 32 holds |Q| < 128 in units of w * x: sample-count weights of
a few thousand and per-element deltas of 1e-2 fit with room. A member whose q does not
fit refuses to send (MaskRangeError names FOLDFED_SECAGG_RING_BITS): never a wrong sum.

The masks: m_ij = PRG(K_ij) expanded to k-bit little-endian words, with
K_ij = HKDF-SHA256(X25519(sk_i, pk_j), info = LABEL || cycle || step || id_a || id_b)
for the ordered pair (a, b) = sorted(i, j). The PRG is AES-256-CTR over a zero plaintext,
the 128-bit big-endian counter starting at the block that holds the first word: any
element range [begin, end) is made alone (`pair_mask`), so chunk c's mask needs no other
chunk, and a member that restarts regenerates the same bytes. A key is used for one
(cycle, step, pair) only, so the zero IV is safe. Without sk_i or sk_j, m_ij is
indistinguishable from uniform (AES as a PRF), and so is y_i: one masked vector alone
says nothing about q_i. What the hub can learn is the sum Q of all members, by design.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from foldfed.errors import FoldfedError

RING_BITS = (32, 64)
DEFAULT_RING_BITS = 32
LABEL = b"foldfed.secagg.mask/1"
KEY_SIZE = 32
_AES_BLOCK = 16
_PIECE = 1 << 20
_ZEROS = memoryview(bytes(_PIECE))
_WORD = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


class MaskRangeError(FoldfedError):
    """A contribution that the ring cannot hold for this many members: not sent."""


def check_ring_bits(bits: int) -> None:
    if bits not in RING_BITS:
        raise ValueError(f"ring bits must be one of {RING_BITS}, got {bits}")


def word_dtype(bits: int) -> np.dtype:
    """The little-endian unsigned word one element travels as on a ring of `bits`."""
    check_ring_bits(bits)
    return _WORD[bits]


def word_size(bits: int) -> int:
    return word_dtype(bits).itemsize


def contribution_limit(bits: int, members: int) -> int:
    """The largest |q| a member may mask so that the sum of `members` stays below 2**(k-1)."""
    check_ring_bits(bits)
    if members < 1:
        raise ValueError(f"members must be at least 1, got {members}")
    return ((1 << (bits - 1)) - 1) // members


def pair_key(shared_secret: bytes, cycle: int, step: int, a: str, b: str) -> bytes:
    """K_ab: the AES-256 key of pair (a, b) for one (cycle, step); a < b required."""
    if not a < b:
        raise ValueError(f"a pair is named in order: {a!r} must sort before {b!r}")
    info = LABEL + struct.pack(">QQ", cycle, step) + _named(a) + _named(b)
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info)
    return kdf.derive(shared_secret)


def _named(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">H", len(raw)) + raw  # length-prefixed: ("ab","c") != ("a","bc")


def pair_mask(
    key: bytes, begin: int, end: int, bits: int, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Words [begin, end) of the pair's mask stream, as unsigned k-bit integers.

    `scratch`: a uint8 buffer to write into (`scratch_size` bytes at least), reused across
    calls so that a member's N - 1 streams fault in their pages once; the result is then a
    view of it, valid until the next call with the same buffer."""
    dtype = word_dtype(bits)
    if not 0 <= begin <= end:
        raise ValueError(f"bad element range [{begin}, {end})")
    block, skip = divmod(begin * dtype.itemsize, _AES_BLOCK)
    size = skip + (end - begin) * dtype.itemsize
    out = np.empty(scratch_size(begin, end, bits), dtype=np.uint8) if scratch is None else scratch
    if out.dtype != np.uint8 or out.size < scratch_size(begin, end, bits):
        raise ValueError("scratch must be a uint8 buffer of scratch_size bytes at least")
    counter = block.to_bytes(_AES_BLOCK, "big")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    # CTR over zeros is the key stream. Fed from one shared zero buffer piece by piece:
    # a fresh zero input as large as the output would cost more than the AES itself.
    view = memoryview(out)
    for at in range(0, size, _PIECE):
        piece = min(_PIECE, size - at)
        encryptor.update_into(_ZEROS[:piece], view[at : at + piece + _AES_BLOCK - 1])
    return out[skip : skip + (end - begin) * dtype.itemsize].view(dtype)


def scratch_size(begin: int, end: int, bits: int) -> int:
    """Bytes `pair_mask` needs for words [begin, end): the words, the offset of the first
    one in its AES block, and the slack `update_into` asks for."""
    itemsize = word_dtype(bits).itemsize
    return (begin * itemsize) % _AES_BLOCK + (end - begin) * itemsize + _AES_BLOCK - 1


def member_mask(
    member: str, pair_keys: Mapping[str, bytes], begin: int, end: int, bits: int
) -> np.ndarray:
    """sum_{j > member} m_ij - sum_{j < member} m_ij over [begin, end), mod 2**bits.

    `pair_keys` maps every other member j to K_{member,j} (pair_key with the pair in order).
    """
    total = np.zeros(end - begin, dtype=word_dtype(bits))
    scratch = np.empty(scratch_size(begin, end, bits), dtype=np.uint8)
    for other in sorted(pair_keys):
        if other == member:
            raise ValueError(f"member {member!r} has no pair with itself")
        mask = pair_mask(pair_keys[other], begin, end, bits, scratch)
        if other > member:
            np.add(total, mask, out=total)  # unsigned: wraps mod 2**bits
        else:
            np.subtract(total, mask, out=total)
    return total


def mask_contribution(q: np.ndarray, mask: np.ndarray, bits: int, members: int) -> np.ndarray:
    """y = q + mask (mod 2**bits) as words, after checking q fits (`contribution_limit`)."""
    dtype = word_dtype(bits)
    if q.dtype != np.int64 or mask.dtype != dtype or q.shape != mask.shape:
        raise ValueError(f"q must be int64 and mask {dtype} of one shape")
    limit = contribution_limit(bits, members)
    peak = max(int(q.max()), -int(q.min())) if q.size else 0
    if peak > limit:
        raise MaskRangeError(
            f"a contribution of |q| = {peak} does not fit the {bits}-bit ring with {members} "
            f"members (limit {limit}): set FOLDFED_SECAGG_RING_BITS=64, or a lower weight or "
            "update bound"
        )
    words = q.astype(dtype) if bits < 64 else q.view(dtype)  # two's complement, mod 2**k
    return words + mask


def words_to_sum_terms(words: np.ndarray, bits: int) -> np.ndarray:
    """A masked contribution's words as the int64 terms the hub adds (wrapping)."""
    if words.dtype != word_dtype(bits):
        raise ValueError(f"words must be {word_dtype(bits)}, got {words.dtype}")
    return words.astype(np.int64) if bits < 64 else words.view(np.int64)


def ring_reduce(total: np.ndarray, bits: int) -> np.ndarray:
    """The signed k-bit value of each int64 sum (mod 2**64) of masked words: Q."""
    check_ring_bits(bits)
    if bits == 64:
        return total.astype(np.int64, copy=True)
    half = np.int64(1 << (bits - 1))
    low = np.bitwise_and(total, np.int64((1 << bits) - 1))
    return np.subtract(np.bitwise_xor(low, half), half)


def words_from_bytes(body: bytes | memoryview, bits: int) -> np.ndarray:
    """The little-endian words of a masked chunk's body (its length a multiple of a word)."""
    dtype = word_dtype(bits)
    if len(body) % dtype.itemsize:
        raise ValueError(f"{len(body)} bytes are not whole {bits}-bit words")
    return np.frombuffer(body, dtype=dtype)

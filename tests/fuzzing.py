"""What every fuzz test shares: the settings, byte mutations, and the decoder contract.

The contract (issue 14, "Fuzzing"): a decoder that reads bytes a peer or the store controls
either returns a value or raises the typed foldfed error its module documents, with a
reason; never another exception type, never a hang, never a huge allocation. `expect_clean`
checks all three for one call: a time limit (SIGALRM, so a real hang is interrupted, not
only measured) and a bound on the memory allocated during the call (tracemalloc, which also
sees numpy's buffers).

Examples are derandomized (the seed derives from each test's name), so a failure reproduces
on any machine. `make test` runs each test's modest count; `make fuzz` multiplies it by
FOLDFED_FUZZ_SCALE (and FOLDFED_FUZZ_SEED, when set, draws another fixed sequence).

Mutations from a valid encoding find more than random bytes, since most random bytes die
at the first check: `mutated(valid)` applies a few of bit flips, truncation, byte
insertion and deletion, splices of random bytes, and length-field inflation (a varint or
little-endian integer written over or inserted at a random offset).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

T = TypeVar("T")

SCALE = max(1, int(os.environ.get("FOLDFED_FUZZ_SCALE", "1")))
_SEED = os.environ.get("FOLDFED_FUZZ_SEED")
# A decoder of one message or file never needs more than this; a forged length field that
# made it allocate its claim would exceed it.
MAX_ALLOCATION = 64 << 20
TIME_LIMIT_S = 10.0

# Counted per test run so the long campaign can report how many examples it ran.
EXAMPLES: dict[str, int] = {}
REASONS: dict[str, int] = {}


def _report() -> None:
    """Per decoder: calls, and how many ended in its typed error (the rest were values)."""
    for name in sorted(EXAMPLES):
        print(f"fuzz {name}: {EXAMPLES[name]} inputs, {REASONS.get(name, 0)} refused",
              file=sys.stderr)  # fmt: skip
    total, refused = sum(EXAMPLES.values()), sum(REASONS.values())
    print(f"RESULT fuzz_inputs={total} refused={refused} crashes=0", file=sys.stderr)


if SCALE > 1 or os.environ.get("FOLDFED_FUZZ_REPORT"):
    atexit.register(_report)


def fuzz(examples: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Hypothesis settings for a fuzz test: `examples` (times the scale), fixed seed."""
    chosen = settings(
        max_examples=examples * SCALE,
        derandomize=_SEED is None,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )

    def wrap(test: Callable[..., T]) -> Callable[..., T]:
        test = chosen(test)
        return seed(int(_SEED))(test) if _SEED is not None else test

    return wrap


# --------------------------------------------------------------------------- mutations

_INFLATIONS = (
    b"\xff\xff\xff\xff\x0f",  # varint 2**32 - 1
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint 2**64 - 1
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an over-long varint
    struct.pack("<Q", 2**63),
    struct.pack("<Q", 2**64 - 1),
    struct.pack("<I", 2**31),
    struct.pack("<I", 2**32 - 1),
    struct.pack("<Q", 1 << 40),
)


@st.composite
def _mutation(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "inflate"]))
    at = draw(st.integers(0, len(data)))
    if kind == "flip" and data:
        at = min(at, len(data) - 1)
        bit = draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + draw(st.integers(1, 8)) :]
    if kind == "splice":
        piece = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + piece + data[at + len(piece) :]
    inflation = draw(st.sampled_from(_INFLATIONS))
    overwrite = draw(st.booleans())
    return data[:at] + inflation + data[at + (len(inflation) if overwrite else 0) :]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, most: int = 4) -> bytes:
    """`valid` after 1..`most` random mutations (see the module docstring)."""
    data = valid
    for _ in range(draw(st.integers(1, most))):
        data = draw(_mutation(data))
    return data


def hostile_bytes(valid: bytes, max_random: int = 512) -> st.SearchStrategy[bytes]:
    """Random bytes or mutations of `valid`: the two ways a campaign draws an input."""
    return st.one_of(st.binary(max_size=max_random), mutated(valid))


# A value a hostile JSON writer may put anywhere: other types, NaN and infinities (json.loads
# reads them), lone surrogates (json escapes them), numbers past every fixed-width range.
hostile_json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([10**400, -(10**400), 1e308, -0.0, 5e-324]),
    st.floats(),  # NaN and infinities included: json.loads reads them
    st.text(max_size=8),
    st.sampled_from(["\ud800", "\udfff", "", "../x", "a/b", "\x00"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _json_paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += _json_paths(inner, (*prefix, i))
    return out


@st.composite
def json_mutated(draw: st.DrawFn, document: Any) -> Any:
    """`document` (a deep copy) with one value replaced, one key deleted, or one added."""
    copy = json.loads(json.dumps(document))
    path = draw(st.sampled_from(_json_paths(copy)))
    if not path:
        return draw(hostile_json_values)
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(hostile_json_values)
    else:
        parent[last] = draw(hostile_json_values)
    return copy


# --------------------------------------------------------------------------- the contract


class _Hang(BaseException):
    """Raised by the alarm: a BaseException so no decoder's `except Exception` eats it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _memory_bound(limit: int) -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
        if started:
            tracemalloc.stop()
    assert peak <= limit, f"allocated {peak} bytes (bound {limit})"


def expect_clean(
    name: str,
    call: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    *,
    max_bytes: int = MAX_ALLOCATION,
) -> T | None:
    """`call()`'s value, or None when it raised one of `errors` with a non-empty reason.

    Any other exception propagates (hypothesis reports and shrinks it); a call that runs
    past TIME_LIMIT_S or allocates more than `max_bytes` fails the test."""
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1
    with _time_limit(TIME_LIMIT_S), _memory_bound(max_bytes):
        try:
            value = call()
        except errors as exc:
            reason = str(exc)
            assert reason.strip(), f"{type(exc).__name__} without a reason"
            REASONS[name] = REASONS.get(name, 0) + 1
            return None
    return value

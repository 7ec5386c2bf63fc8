"""One round of local training, whatever the model: its result, its seeds, torch's
deterministic mode, and the stop request that cuts it short.

Every model family shares these: the demo MLP (trainer/local.py), OpenFold3 (of3/) and the
load tests' simulated trainer. They live here, below both the trainer and the model
libraries its backends wrap, so that of3 never imports the trainer package: the trainer
imports of3 (through its OpenFold3 backend), never the other way round.

A round is a function of its inputs alone (θ_t, the data, the seeds): a trainer that
crashed mid-round trains it again and writes the same bytes. Seeds are derived from names
and numbers with blake3 (stable across processes and machines, unlike `hash`); torch's
process-wide deterministic mode and thread count are set and restored under one lock, so
rounds run one at a time within a process. Importing this module does not import torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from foldfed.errors import FoldfedError

if TYPE_CHECKING:
    import torch

# Called between optimizer steps: True when the round must stop (the service is stopping).
StopCheck = Callable[[], bool]

_TORCH_SETTINGS = threading.Lock()


class TrainingInterrupted(FoldfedError):
    """The round was asked to stop before it finished; nothing was produced."""


@dataclass(frozen=True)
class RoundResult:
    """What one round gives the trainer: Δ = θ_local - θ_t, its weight (the samples it
    saw) and the round's metrics (losses, compute_s)."""

    delta: dict[str, torch.Tensor]
    weight: float
    metrics: dict[str, float]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from parts; stable across runs and machines (unlike `hash`)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(blake3.blake3(text).digest()[:8], "little") >> 1


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """torch's deterministic algorithms on and `threads` intra-op threads (a reduction split
    across threads sums in another order), restored on exit.

    Process-wide settings: set and restored under a lock so concurrent rounds in one process
    (tests run several participants) cannot see each other's half-restored state."""
    import torch

    with _TORCH_SETTINGS:
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        was_threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(was_threads)
            torch.use_deterministic_algorithms(was_deterministic)

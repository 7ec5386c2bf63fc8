"""The small CPU task of the tests and the demo: teacher-student regression.

Every participant learns the same target function but sees a different part of the input
space: participant i's inputs are Gaussian around its own centre, the centres evenly spaced
on a circle, far apart compared with their spread. The global test set draws equally from
every participant's region.

The target ("teacher") is a fixed random tanh network plus a level that is flat over each
region and differs between regions (a soft nearest-centre mix of evenly spaced levels in
[-1, 1], in a seeded order). A purely random network alone did not do: for some seeds its
regions look alike and a lone participant extrapolates well. With the levels, a lone
participant learns nothing about the other regions' levels and is off by about the gap
between them, while the federation sees every region: after 5 rounds its global test loss
is about a third of the best lone participant's (3 participants, 10 seeds tried; with 5
participants it wins on most seeds). That is the property the demo shows and the tests check.

Everything is a function of the seed (and the number of participants, which places the
regions): `make_model(seed)` gives the same θ_0 bytes on any machine, and the data of
(seed, participant index) is the same wherever it is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from foldfed.deltafile import write_delta
from foldfed.digests import file_digest
from foldfed.localround import derive_seed
from foldfed.trainer.local import Split, state_of

INPUT_DIM = 8
HIDDEN = 64
TEACHER_HIDDEN = 32
# Centres lie on a circle of this radius in the first two input dimensions; inputs spread
# around them with unit standard deviation, so regions barely overlap.
CENTRE_RADIUS = 4.0
SPREAD = 1.0
# Teacher network: pre-activation scale (the target bends within a region) and weight
# against the per-region levels, which carry most of the difference between regions.
TEACHER_GAIN = 1.5
TEACHER_WEIGHT = 0.25
LEVEL_RANGE = 1.0
# Softness of the nearest-centre mix of levels (squared distance units): flat within a
# region, changing only in the empty space between regions.
LEVEL_SOFTNESS = 2.0
HELDOUT_FRACTION = 5  # one sample in five is the participant's local held-out slice
TEST_PER_REGION = 256


def make_model(seed: int) -> torch.nn.Module:
    """The student: an 8 → 64 → 64 → 1 MLP (4,801 float32 parameters), seeded init."""
    with torch.random.fork_rng(devices=[]):
        # fork_rng keeps the caller's global RNG untouched; nn.Linear draws from it.
        torch.manual_seed(derive_seed(seed, "model"))
        return torch.nn.Sequential(
            torch.nn.Linear(INPUT_DIM, HIDDEN),
            torch.nn.SiLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.SiLU(),
            torch.nn.Linear(HIDDEN, 1),
        ).to(torch.float32)


def initial_model(path: Path, seed: int) -> bytes:
    """Write θ_0 canonically at `path`; returns its model digest."""
    write_delta(path, state_of(make_model(seed)))
    return file_digest(path)


def centre(index: int, n_participants: int) -> torch.Tensor:
    """The centre of participant `index`'s input distribution."""
    if not 0 <= index < n_participants:
        raise ValueError(f"participant index {index} outside [0, {n_participants})")
    angle = 2 * math.pi * index / n_participants
    out = torch.zeros(INPUT_DIM)
    out[0], out[1] = CENTRE_RADIUS * math.cos(angle), CENTRE_RADIUS * math.sin(angle)
    return out


def teacher(seed: int, n_participants: int, x: torch.Tensor) -> torch.Tensor:
    """The shared target function of inputs `x` (rows), shape (rows, 1)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "teacher"))
    w1 = torch.randn(INPUT_DIM, TEACHER_HIDDEN, generator=g) * TEACHER_GAIN / math.sqrt(INPUT_DIM)
    b1 = torch.randn(TEACHER_HIDDEN, generator=g)
    w2 = torch.randn(TEACHER_HIDDEN, 1, generator=g) / math.sqrt(TEACHER_HIDDEN)
    network = torch.tanh(x @ w1 + b1) @ w2
    return TEACHER_WEIGHT * network + _levels(seed, n_participants, x)


def _levels(seed: int, n_participants: int, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, "levels", n_participants))
    levels = torch.linspace(-LEVEL_RANGE, LEVEL_RANGE, n_participants)
    levels = levels[torch.randperm(n_participants, generator=g)]
    centres = torch.stack([centre(i, n_participants) for i in range(n_participants)])
    sq_dist = ((x[:, None, :] - centres[None]) ** 2).sum(dim=-1)
    return torch.softmax(-sq_dist / LEVEL_SOFTNESS, dim=1) @ levels[:, None]


def _draw(seed: int, purpose: str, index: int, n_participants: int, count: int) -> Split:
    g = torch.Generator().manual_seed(derive_seed(seed, purpose, index, n_participants))
    x = SPREAD * torch.randn(count, INPUT_DIM, generator=g) + centre(index, n_participants)
    return Split(x, teacher(seed, n_participants, x))


def participant_dataset(
    index: int, n_participants: int, seed: int, samples: int = 2048
) -> tuple[Split, Split]:
    """Participant `index`'s (train, held-out) data: `samples` draws, one in five held out."""
    if samples < HELDOUT_FRACTION:
        raise ValueError(f"need at least {HELDOUT_FRACTION} samples, got {samples}")
    data = _draw(seed, "participant", index, n_participants, samples)
    cut = samples - samples // HELDOUT_FRACTION
    return Split(data.x[:cut], data.y[:cut]), Split(data.x[cut:], data.y[cut:])


def global_testset(n_participants: int, seed: int, per_region: int = TEST_PER_REGION) -> Split:
    """Fresh draws from every participant's region, the same number from each."""
    parts = [_draw(seed, "test", i, n_participants, per_region) for i in range(n_participants)]
    return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))

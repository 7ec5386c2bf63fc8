"""What a codec needs besides the vector: who encodes which step, and the shared parameters.

Everything here is agreed or derivable by every party alone, so that two members (or a
member before and after a restart) that encode for the same (cycle, step) use the same
rotation and the same grid:

- `seed`: the cycle's codec seed, agreed when the cycle is set up (with its codec spec);
- `cycle`, `step`: name the rotation stream; a new step draws new sign flips;
- `direction`: "up" for members' deltas, "down" for the hub's global update, so the two
  coders of a step never share signs;
- `sender`: names the stochastic-rounding stream (the participant id, or "hub"); rounding
  noise is independent between members but fixed for each;
- `ranges`: the shared per-block ranges of scale.py, for codecs that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from foldfed.codecs.randomness import stream_key
from foldfed.codecs.scale import SharedRanges

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class CodecContext:
    cycle: int
    step: int
    sender: str
    direction: Direction = "up"
    seed: int = 0
    ranges: SharedRanges | None = None

    def rotation_key(self) -> bytes:
        """The sign-flip stream: shared by every member of (cycle, step, direction)."""
        return stream_key("rotation", self.seed, self.cycle, self.step, self.direction)

    def rounding_key(self) -> bytes:
        """The stochastic-rounding stream: one per sender and (cycle, step, direction)."""
        return stream_key("rounding", self.seed, self.cycle, self.step, self.direction, self.sender)

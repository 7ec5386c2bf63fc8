"""The aggregator's rejection: a delta whose numbers cannot enter the sum."""

from __future__ import annotations

from foldfed.errors import FoldfedError, Reject


class AggregationError(Reject):
    """A delta (or one chunk of it) cannot be added to the sum; `reason` says why.

    A `Reject`, because the fault is in the input (a non-finite value, a value off the
    fixed-point grid, a tensor that does not match the model), not in the aggregator: the
    message is dead-lettered with the reason and the sum it would have joined is untouched.
    """


class FinalizeError(FoldfedError):
    """The step's sum cannot become a valid model (e.g. the update overflows the dtype).

    Not a `Reject`: no single message is at fault, and the step stays unreleased.
    """

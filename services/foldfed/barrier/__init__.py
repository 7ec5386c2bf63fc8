"""The barrier: closes global step t when every participant of the cycle delivered, has the
aggregator finalize it, then releases step t+1.

The package re-exports the pure state machine only; the SQLite store is imported on its
own (`from foldfed.barrier.store import BarrierStore`), so importing the core never loads
sqlite3 or any other I/O module.
"""

from foldfed.barrier.machine import (
    REPORT_WINDOW,
    BarrierState,
    CycleDone,
    CycleStarted,
    Delivered,
    Delivery,
    Effect,
    Effects,
    Event,
    Finalized,
    FlagMismatch,
    Ignored,
    ModelReported,
    Phase,
    Recover,
    Release,
    ReleasedModel,
    Report,
    RequestFinalize,
    StepRecord,
    pending,
    replay,
    transition,
)

__all__ = [
    "REPORT_WINDOW",
    "BarrierState",
    "CycleDone",
    "CycleStarted",
    "Delivered",
    "Delivery",
    "Effect",
    "Effects",
    "Event",
    "Finalized",
    "FlagMismatch",
    "Ignored",
    "ModelReported",
    "Phase",
    "Recover",
    "Release",
    "ReleasedModel",
    "Report",
    "RequestFinalize",
    "StepRecord",
    "pending",
    "replay",
    "transition",
]

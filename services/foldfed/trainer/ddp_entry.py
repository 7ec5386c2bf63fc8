"""The trainer as a torch DDP job across a company's GPUs (or CPU processes with gloo):

    torchrun --nproc-per-node N -m foldfed.trainer.ddp_entry

Every rank reads the same FOLDFED_* settings. Rank 0 is the ordinary trainer process
(`run_service`, health server included): it alone reads releases from the spool, evaluates
and writes the model report and the delta, and its backend leads every round (of3/ddp.py).
Ranks > 0 build the same model and data and follow; they never touch the spool. When rank 0
stops (SIGTERM: torchrun forwards it to every rank, and only rank 0 acts on it) it tells the
others, mid-round included, and they exit with it. With one process it is the plain trainer.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from foldfed.logs import configure_logging
from foldfed.of3.backend import Of3Backend
from foldfed.of3.ddp import init_from_env, send_stop
from foldfed.of3.training import DistContext
from foldfed.runtime import run_service
from foldfed.trainer.backend import TrainerSettings
from foldfed.trainer.families import make_backend, trainer_settings_from_env
from foldfed.trainer.service import run_trainer


def main() -> int:
    settings = trainer_settings_from_env(os.environ)
    ctx = init_from_env()
    if ctx.world_size == 1:  # torchrun with one process: the plain trainer
        _serve(settings)
        return 0
    try:
        if ctx.rank == 0:
            try:
                _serve(settings)
            finally:
                send_stop(ctx)
        else:
            configure_logging("trainer", settings.participant)
            # torchrun sends SIGTERM to every rank; rank 0 decides when everyone stops.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(settings, ctx)
    finally:
        dist.destroy_process_group()
    return 0


def _serve(settings: TrainerSettings) -> None:
    run_service(
        "trainer", lambda stop: run_trainer(settings, stop), participant=settings.participant
    )


def follow(settings: TrainerSettings, ctx: DistContext) -> None:
    """Ranks > 0: build the same model and data as rank 0, then train what it sends."""
    backend = make_backend(settings)  # joins the job `ctx` describes (already initialised)
    if not isinstance(backend, Of3Backend):
        raise TypeError(f"FOLDFED_MODEL={settings.model} cannot run as a DDP job")
    backend.follow()


if __name__ == "__main__":
    sys.exit(main())

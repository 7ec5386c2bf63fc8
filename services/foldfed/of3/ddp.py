"""The trainer as a torch DDP job across a company's GPUs (or CPU processes with gloo).

    torchrun --nproc-per-node N -m foldfed.of3.ddp

Every rank reads the same FOLDFED_* settings. Rank 0 is the ordinary trainer process: it
alone reads releases from the spool, evaluates and writes the model report and the delta.
Before each round it broadcasts (step, θ_t) to the other ranks; all ranks then run the same
round, each doing its share of every optimizer step's micro-batches (training.py), with one
gradient all-reduce per optimizer step, and all end with the same θ. Ranks > 0 never touch
the spool. When rank 0 stops (SIGTERM: torchrun forwards it to every rank, and only rank 0
acts on it) it tells the others, mid-round included, and they exit with it.

Backend: nccl when CUDA is available, else gloo (FOLDFED_DDP_BACKEND overrides).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from foldfed.of3.training import DistContext, StopCheck

if TYPE_CHECKING:
    from foldfed.trainer.service import TrainerSettings

_ROUND, _STOP = 1, 0


def init_from_env(env: Mapping[str, str] = os.environ) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    world = int(env.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(env.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if world == 1:
        return DistContext(device=device)
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=env.get("FOLDFED_DDP_BACKEND") or _backend(cuda))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def _backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def send_round(
    ctx: DistContext, step: int, theta: Mapping[str, torch.Tensor], names: Sequence[str]
) -> None:
    """Rank 0: announce a round and share θ_t (in the trainable order every rank knows)."""
    dist.broadcast(torch.tensor([_ROUND, step], dtype=torch.int64, device=ctx.device), src=0)
    for name in names:
        dist.broadcast(theta[name].to(ctx.device).contiguous(), src=0)


def send_stop(ctx: DistContext) -> None:
    """Rank 0: no more rounds."""
    dist.broadcast(torch.tensor([_STOP, 0], dtype=torch.int64, device=ctx.device), src=0)


def receive_round(
    ctx: DistContext, shapes: Mapping[str, torch.Size]
) -> tuple[int, dict[str, torch.Tensor]] | None:
    """Ranks > 0: the next (step, θ_t) with θ_t on the CPU, or None when rank 0 said stop.
    `shapes`: the trainable parameters' shapes, in the order rank 0 sends them."""
    header = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    dist.broadcast(header, src=0)
    kind, step = int(header[0]), int(header[1])
    if kind == _STOP:
        return None
    theta: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.float32, device=ctx.device)
        dist.broadcast(tensor, src=0)
        theta[name] = tensor.cpu()
    return step, theta


def agreed_stop(ctx: DistContext, local: StopCheck | None) -> StopCheck:
    """A stop check every rank calls at the same point: true on all ranks once any rank's
    own check (rank 0's stop event; None elsewhere) is true."""

    def check() -> bool:
        flag = torch.tensor(
            [1 if local is not None and local() else 0], dtype=torch.int64, device=ctx.device
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return check


def main() -> int:
    """Entry point of `torchrun -m foldfed.of3.ddp`."""
    from foldfed.cli import _run_service
    from foldfed.logs import configure_logging
    from foldfed.tracing import setup_tracing
    from foldfed.trainer.service import TrainerSettings, run_trainer

    settings = TrainerSettings.from_env(os.environ)
    ctx = init_from_env()
    configure_logging("trainer", settings.participant)
    if ctx.world_size == 1:  # torchrun with one process: the plain trainer
        setup_tracing("trainer", settings.participant)
        _run_service(lambda stop: run_trainer(settings, stop))
        return 0
    try:
        if ctx.rank == 0:
            setup_tracing("trainer", settings.participant)
            try:
                _run_service(lambda stop: run_trainer(settings, stop))
            finally:
                send_stop(ctx)
        else:
            # torchrun sends SIGTERM to every rank; rank 0 decides when everyone stops.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(settings, ctx)
    finally:
        dist.destroy_process_group()
    return 0


def follow(settings: TrainerSettings, ctx: DistContext) -> None:
    """Ranks > 0: build the same model and data as rank 0, then train what it sends."""
    from foldfed.of3.backend import Of3Backend
    from foldfed.trainer.service import make_backend

    backend = make_backend(settings, ctx)
    assert isinstance(backend, Of3Backend)
    backend.follow()


if __name__ == "__main__":
    sys.exit(main())

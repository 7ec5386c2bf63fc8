"""DDP primitives of the OpenFold3 trainer: joining the job torchrun started, rank 0
announcing rounds (step, θ_t) or the end, and a stop check every rank agrees on.

The entry point that runs the trainer as such a job is trainer/ddp_entry.py
(`torchrun --nproc-per-node N -m foldfed.trainer.ddp_entry`). Before each round rank 0
broadcasts (step, θ_t) to the other ranks; all ranks then run the same round, each doing
its share of every optimizer step's micro-batches (training.py), with one gradient
all-reduce per optimizer step, and all end with the same θ. When rank 0 stops it tells the
others, mid-round included.

Backend: nccl when CUDA is available, else gloo (FOLDFED_DDP_BACKEND overrides).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from foldfed.localround import StopCheck
from foldfed.of3.training import DistContext
from foldfed.settings import load

_ROUND, _STOP = 1, 0


def init_from_env(env: Mapping[str, str] = os.environ) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT: torch's
    variables, read as torch documents them; ours come from the settings registry)."""
    world = int(env.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(env.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if world == 1:
        return DistContext(device=device)
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=load(env).ddp_backend or _backend(cuda))
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

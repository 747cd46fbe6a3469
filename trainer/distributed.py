"""What a rank's code needs of the job once it runs: which rank it is, and the few collectives the engine,
evaluation and checkpoints use, each a no-op for one rank.

The bottom layer of the distribution code: it imports nothing of the start-up (``trainer.startup``), the
launcher's environment (``trainer.launch_env``), the watchdog or the host checks, so that all of those, and
every module that only needs a rank's identity, can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def deepspeed_args(ctx: DistContext) -> SimpleNamespace:
    """``deepspeed.initialize``'s ``args``: the device this rank chose (``trainer.launch_env.device_index``) as
    ``device_rank``. Without it DeepSpeed sets the device to LOCAL_RANK, which a task that sees one GPU does not
    have."""
    return SimpleNamespace(device_rank=0 if ctx.device.index is None else ctx.device.index)


def all_reduce_sums(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum float64 scalars over ranks; exact for the counts and sums evaluation needs."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()

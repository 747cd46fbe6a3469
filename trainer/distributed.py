"""Process-group start-up that works the same under the deepspeed launcher, torchrun and plain python."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(extra: dict | None = None) -> dict:
    """The environment for a child ``deepspeed`` / ``python launch/...`` process: the launcher sets the rank
    variables itself (stale ones from this shell would mislead it), output unbuffered, and this interpreter's
    ``bin/`` first on PATH so DeepSpeed's op builder finds the venv's ninja (another one rebuilds the op)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | (extra or {})


def _single_process_env() -> None:
    """Plain ``python``: give torch.distributed a one-rank world (DeepSpeed would otherwise try mpi4py)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _share_cpu_threads() -> None:
    """CPU ranks on one host split its cores instead of each taking all of them."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def init_distributed(timeout_s: float = 600.0) -> DistContext:
    _single_process_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        _share_cpu_threads()
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=acc.communication_backend_name(),
                                       timeout=timedelta(seconds=timeout_s))
        except RuntimeError as e:  # torch's DistNetworkError: rank 0 could not host the rendezvous store
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                raise
            addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
            raise ConfigError(f"port {port} on {addr} is already in use (MASTER_PORT); pass a free one with "
                              "--master_port") from None
        if acc.device_name() == "cpu":
            _unlink_shm_allreduce_buffer()
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 66 MB /dev/shm file per rank and run, never removed:
    a test suite or a sweep fills /dev/shm until the machine runs out of memory. Its init maps every rank's
    file, so once all ranks are past it (the barrier) each removes its own name; the mappings live on until
    the processes exit, however they exit."""
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    dist.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


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


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()

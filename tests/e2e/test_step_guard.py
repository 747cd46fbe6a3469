"""The per-step agreement on 2 gloo ranks: a signal that reached one rank stops both under its own name (a Slurm
job requeues itself after a time-limit warning, not after the scheduler's SIGTERM), and the lowest rank with a
non-finite loss is named on both."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.launching import free_port
from trainer.distributed import DistContext
from trainer.faults.step_guard import agree_on_step

CASES = [  # (rank 0's signal, rank 1's signal, rank 0 finite, rank 1 finite) -> (signal, nonfinite rank)
    ((None, None, True, True), (None, None)),
    ((None, "SIGUSR2", True, True), ("SIGUSR2", None)),
    (("SIGUSR1", None, True, True), ("SIGUSR1", None)),
    (("SIGTERM", "SIGUSR2", True, True), ("SIGTERM", None)),
    (("SIGUSR2", "SIGTERM", True, True), ("SIGTERM", None)),
    ((None, None, True, False), (None, 1)),
    ((None, "SIGUSR2", False, False), ("SIGUSR2", 0)),
]


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"))
    got = []
    for (s0, s1, f0, f1), _ in CASES:
        finite = torch.tensor((f0, f1)[rank])
        verdict = agree_on_step(ctx, (s0, s1)[rank], finite)
        got.append((verdict.signal, verdict.nonfinite_rank))
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_both_ranks_agree_on_the_signal_and_the_nonfinite_rank(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    want = [expected for _, expected in CASES]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == want, rank

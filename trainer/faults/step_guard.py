"""Per-step agreement between ranks, and the veto that makes a skipped step leave no trace.

Once per optimizer step, after the last backward and before DeepSpeed applies the update, the ranks
all-reduce two flags: which preemption signal was received, and which ranks computed a non-finite loss. One
small all-reduce serves both, so every rank sees a NaN on any rank, or a signal that reached any rank, at
the same step and acts on it identically: the job's stop is named by the signal itself (what a Slurm job does
next depends on it), however the signal was spread over the ranks.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import DistContext


# Codes for the all-reduce's MAX, weakest first: when ranks saw different signals, SIGTERM (a requeue,
# preemption or cancel by the scheduler) wins over a time-limit warning, which would have the job requeue itself.
SIGNAL_CODES = ("SIGUSR1", "SIGUSR2", "SIGTERM")


@dataclass(frozen=True)
class StepVerdict:
    signal: str | None  # the preemption signal any rank received (see SIGNAL_CODES), None when none did
    nonfinite_rank: int | None  # the lowest rank whose loss was not finite this step; None when all were

    @property
    def preempt(self) -> bool:
        return self.signal is not None


def agree_on_step(ctx: DistContext, signal: str | None, finite: torch.Tensor) -> StepVerdict:
    """``signal``: the preemption signal this rank received, if any. ``finite``: a bool scalar tensor, False if
    any of this rank's micro-batch losses was nan or inf."""
    code = SIGNAL_CODES.index(signal) + 1 if signal else 0
    flags = torch.stack([torch.tensor(float(code), dtype=torch.float64, device=finite.device),
                         (~finite).to(torch.float64) * (ctx.world - ctx.rank)])
    if ctx.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    seen, lowest = flags.tolist()
    return StepVerdict(SIGNAL_CODES[int(seen) - 1] if seen else None, ctx.world - int(lowest) if lowest else None)


class StepGate:
    """Lets the loop veto the base optimizer's update for one step.

    DeepSpeed's wrappers (ZeRO 1/2, bf16) call the base optimizer's ``step`` once per parameter group,
    after their own clipping and overflow checks; vetoing it there leaves weights and optimizer state
    (Adam moments, step counts) exactly as they were, whatever the wrapper, stage or precision.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.closed = False
        inner = optimizer.step

        def step(_optimizer, *args, **kwargs):
            return None if self.closed else inner(*args, **kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as torch's LR schedulers expect

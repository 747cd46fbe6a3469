"""Per-step agreement between ranks, and the veto that makes a skipped step leave no trace.

Once per optimizer step, after the last backward and before DeepSpeed applies the update, the ranks
all-reduce three flags: which preemption signal was received, which ranks computed a non-finite loss, and whether
the gradient norm the loop clipped by is non-finite (trainer/clipping.py). One small all-reduce serves them all,
so every rank sees a NaN on any rank, or a signal that reached any rank, at the same step and acts on it
identically: the job's stop is named by the signal itself (what a Slurm job does next depends on it), however the
signal was spread over the ranks. Reading its result is the one value a training step reads back from the device:
the flags are built on the device from device tensors, with no copy from the host.
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
    nonfinite_grad: bool = False  # the global gradient norm was not finite (a finite loss can still overflow)

    @property
    def preempt(self) -> bool:
        return self.signal is not None

    @property
    def vetoed(self) -> bool:
        """The update must not be applied: a non-finite loss or gradient."""
        return self.nonfinite_rank is not None or self.nonfinite_grad


def agree_on_step(ctx: DistContext, signal: str | None, finite: torch.Tensor,
                  grad_norm: torch.Tensor | None = None) -> StepVerdict:
    """``signal``: the preemption signal this rank received, if any. ``finite``: a bool scalar tensor, False if
    any of this rank's micro-batch losses was nan or inf. ``grad_norm``: the global gradient norm measured before
    the update, where the loop measured one."""
    code = SIGNAL_CODES.index(signal) + 1 if signal else 0
    bad_grad = finite.new_zeros(()) if grad_norm is None else ~torch.isfinite(grad_norm)
    flags = torch.stack([finite.new_full((), float(code), dtype=torch.float64),
                         (~finite).to(torch.float64) * (ctx.world - ctx.rank),
                         bad_grad.to(torch.float64)])
    if ctx.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    seen, lowest, grad = flags.tolist()
    return StepVerdict(SIGNAL_CODES[int(seen) - 1] if seen else None, ctx.world - int(lowest) if lowest else None,
                       bool(grad))


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

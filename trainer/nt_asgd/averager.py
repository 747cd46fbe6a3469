"""NT-ASGD (Merity et al. 2017): SGD until validation stops improving, then average the iterates.

The wrapped optimizer keeps doing plain steps, so the learning rate given for a step (variable-BPTT
rescale included) is the one used in that step; this wrapper only keeps the uniform running average of
the iterates from the step averaging starts (ASGD with lambda = 0), sharded over the data-parallel
ranks, and swaps it into the model to evaluate and to save.

Step numbers are the engine's 1-based count of optimizer steps taken. "Averaging starts at step s"
means the iterate after step s is the first one in the average: a trigger at the evaluation after step
k starts it at k + 1; ``t0 = s`` starts it at s whatever the trigger says.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..distributed import DistContext, all_reduce_sums
from .sharded_average import ShardedAverage


def nonmono_triggered(history: list[float], loss: float, nonmono: int) -> bool:
    """The paper's test: worse than the best of all earlier checks except the last ``nonmono``."""
    return len(history) > nonmono and loss > min(history[:-nonmono])


class NTASGD:
    def __init__(self, module: nn.Module, ctx: DistContext, nonmono: int = 5, t0: int = 0,
                 stop_on_trigger: bool = False):
        self.module = module
        self.ctx = ctx
        self.nonmono = nonmono
        self.t0 = t0
        self.stop_on_trigger = stop_on_trigger
        self.history: list[float] = []
        self.start_step: int | None = t0 or None
        self.count = 0  # iterates in the average
        self.average = ShardedAverage(module, ctx)

    @property
    def averaging(self) -> bool:
        return self.count > 0

    def after_step(self, step: int) -> None:
        """Call after every optimizer step with the number of steps taken so far."""
        if self.start_step is not None and step >= self.start_step:
            self.count += 1
            self.average.update(1.0 / self.count)

    def observe(self, loss: float, step: int) -> str | None:
        """Feed a validation loss; every rank decides on the mean over ranks, so all switch together.

        Returns ``"start"`` when averaging is switched on, ``"stop"`` when it already runs, the trigger
        fires again and ``stop_on_trigger`` is set (the paper's fine-tuning stop), else None.
        """
        loss = all_reduce_sums({"loss": loss}, self.ctx)["loss"] / self.ctx.world
        fired = nonmono_triggered(self.history, loss, self.nonmono)
        self.history.append(loss)
        if not fired:
            return None
        if self.start_step is None:
            self.start_step = step + 1
            return "start"
        return "stop" if self.stop_on_trigger and self.averaging else None

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the duration; the raw ones come back untouched (under bf16 the
        fp32 masters too: the next optimizer step starts from the raw iterate, not from a bf16 rounding of it)."""
        if not self.averaging:
            yield
            return
        flat = self.average.gather()
        targets = self.average.targets()
        raw = [t.detach().clone() for t in targets]
        self.average.copy_into_params(flat)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, r in zip(targets, raw):
                    t.data.copy_(r)

    def scalars(self) -> dict[str, float]:
        return {"asgd/averaging": float(self.averaging), "asgd/averaged_steps": float(self.count)}

    def state_dict(self) -> dict:
        """World-size independent: the whole average (gathered, a collective) and the trigger's history."""
        return {
            "history": list(self.history),
            "start_step": self.start_step,
            "count": self.count,
            "names": list(self.average.names),
            "average": self.average.gather().cpu() if self.averaging else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.average.names:
            raise ValueError("averaged parameters do not match the model's parameters")
        self.history = list(state["history"])
        self.start_step = state["start_step"]
        self.count = state["count"]
        if state["average"] is not None:
            self.average.load_flat(state["average"])

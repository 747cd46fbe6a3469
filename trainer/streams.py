"""A ready training stream for recipes whose data fits in memory as tensors (a toy, a small tabular set): a fresh
seeded permutation per epoch, each step's global batch split over ranks and micro-batches by the plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import ConfigError
from .recipe import BatchPlan, TrainData, TrainStep


@dataclass
class Example:
    """A micro-batch of supervised examples."""

    inputs: torch.Tensor
    targets: torch.Tensor


class ShuffledTensors(TrainData):
    """Epoch ``e`` visits the examples in ``randperm(n)`` drawn from ``seed + e`` (the same order on every rank and
    any world size), ``global_batch`` per step, the remainder dropped; the position is the steps taken."""

    def __init__(self, plan: BatchPlan, inputs: torch.Tensor, targets: torch.Tensor, seed: int,
                 device: torch.device | str = "cpu"):
        super().__init__(plan)
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        if len(inputs) < plan.global_batch:
            raise ConfigError(f"data.batch_size={plan.global_batch} is larger than the {len(inputs)} training "
                              f"examples; use at most {len(inputs)}")
        self.inputs, self.targets, self.seed, self.device = inputs, targets, seed, device
        self.position: int | None = None

    def steps_per_epoch(self) -> int:
        return len(self.inputs) // self.plan.global_batch

    def steps(self, epoch: int) -> Iterator[TrainStep]:
        plan = self.plan
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed + epoch))
        for step in range(self.position or 0, self.steps_per_epoch()):
            first = step * plan.global_batch
            micro = []
            for cols in plan.micro_slices():
                idx = order[first + cols.start:first + cols.stop]
                micro.append(Example(self.inputs[idx].to(self.device), self.targets[idx].to(self.device)))
            self.position = step + 1
            yield TrainStep(micro, units=plan.per_rank, position=step + 1)
        self.position = None

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state.get("position")

"""The plug-in interface between the engine and a recipe.

The engine owns distribution, the optimizer step, logging, evaluation cadence and checkpoints;
a recipe owns its model, data order, loss and metrics. Nothing recipe-specific lives in the engine.
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .config import RecipeConfig
from .distributed import DistContext


def even_shares(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes that differ by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return tuple(base + (i < extra) for i in range(parts))


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split over ranks and accumulation steps.

    ``shares[r]`` is rank ``r``'s part of the global batch; shares differ by at most one (the first
    ``global_batch % world`` ranks take one more) where the recipe allows uneven splits, so any world
    size trains the same global batch. Each rank cuts its share into ``accumulation`` contiguous
    micro-batches as evenly as possible, the largest ``micro`` long. A micro-batch's loss is weighted
    by its size (``loss_weight``) so the all-reduced gradient is exactly the global batch's.
    """

    global_batch: int
    world: int
    rank: int
    shares: tuple[int, ...]
    micro: int
    accumulation: int

    @property
    def per_rank(self) -> int:
        """This rank's share of the global batch."""
        return self.shares[self.rank]

    @property
    def offset(self) -> int:
        """This rank's first column (sample) of the global batch."""
        return sum(self.shares[:self.rank])

    @property
    def even(self) -> bool:
        """Every micro-batch of every rank has ``micro`` samples (the only split DeepSpeed's own batch
        arithmetic describes)."""
        return self.micro * self.accumulation * self.world == self.global_batch

    def micro_sizes(self, rank: int | None = None) -> tuple[int, ...]:
        return even_shares(self.shares[self.rank if rank is None else rank], self.accumulation)

    def micro_slices(self, rank: int | None = None) -> list[slice]:
        """Each micro-batch's columns within the global batch, in order (for rank ``rank``, default this one)."""
        rank = self.rank if rank is None else rank
        start = sum(self.shares[:rank])
        out = []
        for size in self.micro_sizes(rank):
            out.append(slice(start, start + size))
            start += size
        return out

    def loss_weight(self, size: int) -> float:
        """What a micro-batch's mean loss over ``size`` samples is multiplied by before backward, so DeepSpeed's
        averaging (over ``accumulation`` steps, then over ``world`` ranks) yields the global batch's mean."""
        return size * self.accumulation * self.world / self.global_batch

    def weighted_loss(self, result: "MicroResult") -> torch.Tensor:
        """What is back-propagated for ``result``: its loss, weighted by its size when it has one."""
        return result.loss if result.size is None else result.loss * self.loss_weight(result.size)


@dataclass
class TrainStep:
    """One optimizer step's worth of this rank's data."""

    micro_batches: list[Any]
    units: int  # tokens or samples this rank processes in the step (for throughput)
    position: Any  # JSON-able data position right after this step, for exact resume
    lr_scale: float = 1.0  # multiplies the scheduled learning rate for this step only


@dataclass
class MicroResult:
    loss: torch.Tensor  # what is back-propagated: the mean over the micro-batch's samples
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-micro means, logged under train/
    size: int | None = None  # samples the means are over: weights loss and metrics (None: every micro alike)


class Recipe(ABC):
    config_model: ClassVar[type[RecipeConfig]]
    unit: ClassVar[str] = "samples"  # "tokens" or "samples": names perf/<unit>_per_s
    best_metric: ClassVar[str] = "loss"  # the validation metric that picks the 'best' checkpoint
    best_mode: ClassVar[str] = "min"  # "min": lower is better; "max": higher (accuracy)
    report_split: ClassVar[str] = "test"  # what launch/evaluate.py evaluates without --split
    default_precision: ClassVar[str] = "fp32"  # what train.precision=auto means on a bf16-capable GPU
    eval_modes: ClassVar[tuple[str, ...]] = ("standard",)  # launch/evaluate.py --pointer asks for "pointer"
    uneven_batches: ClassVar[bool] = False  # True: the recipe trains on BatchPlan shares that differ by rank

    def __init__(self, cfg: RecipeConfig, ctx: DistContext, plan: BatchPlan):
        self.cfg = cfg
        self.ctx = ctx
        self.plan = plan

    def setup(self) -> None:
        """Load data; called on every rank before the model is built."""

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based)."""
        return 1.0

    def steps_per_epoch(self) -> int | None:
        return None

    @abstractmethod
    def train_steps(self, epoch: int, position: Any | None) -> Iterator[TrainStep]:
        """This rank's steps of ``epoch``, starting after ``position`` (None = the epoch's start)."""

    @abstractmethod
    def micro_loss(self, engine, micro: Any) -> MicroResult: ...

    @classmethod
    def improves(cls, score: float, best: float | None) -> bool:
        """Whether a validation ``score`` beats the ``best`` so far (None: nothing yet)."""
        if best is None or (isinstance(best, float) and math.isinf(best)):  # inf: written before best_mode
            return True
        return score > best if cls.best_mode == "max" else score < best

    def before_step(self, engine, step: int, epoch: float) -> dict[str, float]:
        """Hook before every optimizer step (schedules); returns scalars to log."""
        return {}

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, mode: str = "standard") -> dict[str, float]:
        """This rank's additive sums over its share of ``split`` (e.g. summed loss and count)."""

    @abstractmethod
    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from sums already reduced over all ranks."""

    def train_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Derived training metrics (e.g. perplexity) from logged means."""
        return means

    def state_dict(self) -> dict:
        """State shared by all ranks (saved once), e.g. the data-order generator."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        """State private to this rank (saved per rank), e.g. a carried hidden state."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def load_rank_states(self, states: list[dict]) -> None:
        """Every rank's ``rank_state_dict``, in rank order, saved by a run on ``len(states)`` ranks, another world
        size than this one (the global batch is the same): take this rank's share. By default, start fresh."""

    def checkpoint_signature(self) -> dict:
        """Facts a checkpoint must share with this run to be loadable (vocabulary, shapes)."""
        return {}

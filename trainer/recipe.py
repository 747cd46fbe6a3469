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


@dataclass
class BatchPlan:
    """How the global batch is split: ``global_batch = micro * accumulation * world``."""

    global_batch: int
    world: int
    per_rank: int
    micro: int
    accumulation: int


@dataclass
class TrainStep:
    """One optimizer step's worth of this rank's data."""

    micro_batches: list[Any]
    units: int  # tokens or samples this rank processes in the step (for throughput)
    position: Any  # JSON-able data position right after this step, for exact resume
    lr_scale: float = 1.0  # multiplies the scheduled learning rate for this step only


@dataclass
class MicroResult:
    loss: torch.Tensor  # what is back-propagated
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-micro means, logged under train/


class Recipe(ABC):
    config_model: ClassVar[type[RecipeConfig]]
    unit: ClassVar[str] = "samples"  # "tokens" or "samples": names perf/<unit>_per_s
    best_metric: ClassVar[str] = "loss"  # the validation metric that picks the 'best' checkpoint
    best_mode: ClassVar[str] = "min"  # "min": lower is better; "max": higher (accuracy)
    report_split: ClassVar[str] = "test"  # what launch/evaluate.py evaluates without --split
    default_precision: ClassVar[str] = "bf16"  # what train.precision=auto means on a bf16-capable GPU
    eval_modes: ClassVar[tuple[str, ...]] = ("standard",)  # launch/evaluate.py --pointer asks for "pointer"

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

"""The plug-in interface between the engine and a recipe.

The engine owns distribution, the optimizer step, logging, evaluation cadence and checkpoints; a recipe owns its
model, its loss and metrics, and hands the engine a ``TrainData`` stream that owns the data order. Nothing
recipe-specific lives in the engine.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .batching import BatchPlan
from .config import RecipeConfig
from .distributed import DistContext


@dataclass
class TrainStep:
    """One optimizer step's worth of this rank's data."""

    micro_batches: list[Any]  # the recipe's typed micro-batches, in order
    units: int  # tokens or samples this rank processes in the step (for throughput)
    position: Any  # the stream's position right after this step (the stream saves its own; for readers and tests)
    lr_scale: float = 1.0  # multiplies the scheduled learning rate for this step only


@dataclass
class MicroResult:
    loss: torch.Tensor  # what is back-propagated: the mean over the micro-batch's samples
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-micro means, logged under train/
    size: int | None = None  # samples the means are over: weights loss and metrics (None: every micro alike)


@dataclass(frozen=True)
class StepContext:
    """What one optimizer step's losses share, handed to each of them: nothing is kept between hooks.

    ``draws`` holds the recipe's per-step random draws (AWD-LSTM's masks for the global batch); None outside a
    training step (the gradient analysis' extra forwards), where a recipe draws as its model does by default."""

    step: int  # optimizer steps taken before this one (0-based index of this step)
    epoch: float  # epochs completed, fractional
    draws: Any = None
    scalars: dict[str, float] = field(default_factory=dict)  # logged at step + 1 (the schedules' rates)


class TrainData(ABC):
    """A rank's training stream: the engine asks it for steps; it owns the data order, the position within the
    epoch and whatever the stream carries (a hidden state), and saves them itself."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan

    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    @abstractmethod
    def steps(self, epoch: int) -> Iterator[TrainStep]:
        """This rank's steps of ``epoch`` from the stream's position (the epoch's start unless a checkpoint put
        it elsewhere); at the epoch's end the position goes back to its start."""

    def report(self) -> dict[str, float]:
        """This rank's additive counters reported (summed over ranks) with every evaluation during training, e.g.
        unreadable images skipped so far."""
        return {}

    def state_dict(self) -> dict:
        """State shared by all ranks (saved once), e.g. the position and the data-order generator."""
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


class Recipe(ABC):
    """A model family's plug-in. Built for training and for evaluation alike (``launch/evaluate.py`` never asks
    for training data); everything training-only hangs off the ``TrainData`` of :meth:`train_data`."""

    config_model: ClassVar[type[RecipeConfig]]
    unit: ClassVar[str] = "samples"  # "tokens" or "samples": names perf/<unit>_per_s
    best_metric: ClassVar[str] = "loss"  # the validation metric that picks the 'best' checkpoint
    best_mode: ClassVar[str] = "min"  # "min": lower is better; "max": higher (accuracy)
    report_split: ClassVar[str] = "test"  # what launch/evaluate.py evaluates without --split
    default_precision: ClassVar[str] = "fp32"  # what train.precision=auto means on a bf16-capable GPU
    eval_modes: ClassVar[tuple[str, ...]] = ("standard",)  # launch/evaluate.py --pointer asks for "pointer"
    uneven_batches: ClassVar[bool] = False  # True: the recipe trains on BatchPlan shares that differ by rank

    def __init__(self, cfg: RecipeConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx

    def setup(self) -> None:
        """Load what training and evaluation share (data, vocabulary); called on every rank before the model."""

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    @abstractmethod
    def train_data(self, plan: BatchPlan) -> TrainData:
        """A fresh training stream for this rank's share of ``plan`` (the engine's, or the gradient analysis'
        own: two streams share nothing)."""

    def for_training(self, model: nn.Module, data: TrainData) -> nn.Module:
        """The model the training loop runs (e.g. compiled around the per-step schedules); by default itself."""
        return model

    def lr_factor(self, step: int, data: TrainData) -> float:
        """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based)."""
        return 1.0

    def begin_step(self, model: nn.Module, step: int, epoch: float, data: TrainData) -> StepContext:
        """Before step ``step`` (0-based): set its schedules on the model, draw what its losses share."""
        return StepContext(step, epoch)

    @abstractmethod
    def loss(self, model: nn.Module, micro: Any, step: StepContext | None) -> MicroResult:
        """One micro-batch's loss on ``model`` (the bare module: DeepSpeed's engine only runs the backward)."""

    @classmethod
    def improves(cls, score: float, best: float | None) -> bool:
        """Whether a validation ``score`` beats the ``best`` so far (None: nothing yet)."""
        if best is None or (isinstance(best, float) and math.isinf(best)):  # inf: written before best_mode
            return True
        return score > best if cls.best_mode == "max" else score < best

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, mode: str = "standard") -> dict[str, float]:
        """This rank's additive sums over its share of ``split`` (e.g. summed loss and count)."""

    @abstractmethod
    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from sums already reduced over all ranks."""

    def train_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Derived training metrics (e.g. perplexity) from logged means."""
        return means

    def checkpoint_signature(self) -> dict:
        """Facts a checkpoint must share with this run to be loadable (vocabulary, shapes)."""
        return {}

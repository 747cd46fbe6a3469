"""Drop-rate schedules from "Dropout Reduces Underfitting" (Liu et al., 2023).

Early dropout regularises only the first ``cutoff_epoch`` epochs (it lowers the variance of
mini-batch gradients while the model underfits); late dropout switches regularisation on only
after ``cutoff_epoch``. Values follow the paper's ``drop_scheduler`` per optimizer step, but are
computed in closed form so no per-step array is built for long runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from trainer.config import Section

Mode = Literal["standard", "early", "late"]
Shape = Literal["constant", "linear"]

_MODES = ("standard", "early", "late")
_SHAPES = ("constant", "linear")


@dataclass(frozen=True)
class DropSchedule:
    """One drop rate as a function of the optimizer step.

    A config never asks for a ``cutoff_epoch`` at or past ``epochs`` (a recipe config's ``check_epochs``
    rejects it when the config is validated); built directly, a schedule treats such a cutoff as an
    early or late phase covering the whole run. Steps past the run keep the last scheduled value so
    an extra step cannot crash training.
    """

    base: float
    mode: Mode = "standard"
    shape: Shape = "constant"
    cutoff_epoch: int = 0
    epochs: int = 1
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.base < 1.0:
            raise ValueError(f"base rate must be in [0, 1), got {self.base}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.shape not in _SHAPES:
            raise ValueError(f"shape must be one of {_SHAPES}, got {self.shape!r}")
        if self.mode == "late" and self.shape != "constant":
            raise ValueError("late allows constant only")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {self.epochs}, {self.steps_per_epoch}")
        if self.cutoff_epoch < 0:
            raise ValueError(f"cutoff_epoch must be >= 0, got {self.cutoff_epoch}")
        if self.mode != "standard" and self.cutoff_epoch == 0:
            raise ValueError(f"mode '{self.mode}' needs cutoff_epoch >= 1")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def cutoff_step(self) -> int:
        return self.cutoff_epoch * self.steps_per_epoch

    def value(self, step: int) -> float:
        """Rate for the 0-based optimizer step about to be taken (``epoch * steps_per_epoch + i``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        it = min(step, self.total_steps - 1)
        if self.mode == "standard":
            return self.base
        cut = self.cutoff_step
        if self.mode == "late":
            return 0.0 if it < cut else self.base
        # early
        if it >= cut:
            return 0.0
        if self.shape == "constant" or cut == 1:
            return self.base
        if it == cut - 1:
            return 0.0
        # Same arithmetic as np.linspace(base, 0, cut)[it], so values match the reference bit for bit.
        return it * (-self.base / (cut - 1)) + self.base

    def describe(self) -> str:
        if self.mode == "standard" or self.base == 0.0:
            return f"{self.base:g} throughout"
        if self.mode == "late":
            return f"0 until epoch {self.cutoff_epoch}, then {self.base:g}"
        if self.shape == "linear":
            return f"{self.base:g} falling linearly to 0 by epoch {self.cutoff_epoch}, then 0"
        return f"{self.base:g} until epoch {self.cutoff_epoch}, then 0"


def check_cutoff(key: str, mode: str, cut: int, epochs: int, what: str) -> None:
    """An early phase that never ends, or a late one that never starts, is a mistake, not a schedule."""
    if mode != "standard" and cut >= epochs:
        never = "never end" if mode == "early" else "never start"
        raise ValueError(f"drop.{key}={cut} is not before train.epochs={epochs}: {mode} {what} would {never}; "
                         f"lower drop.{key} below {epochs} or raise train.epochs")


class DropTiming(Section):
    """When a recipe's own dropout rates apply: the rates stay where the recipe configures them
    (e.g. AWD-LSTM's five), each becoming the base of a schedule with this mode, shape and cutoff."""

    mode: Mode = Field("standard", description="standard: configured rates throughout; early: only before "
                       "cutoff_epoch; late: only from cutoff_epoch")
    schedule: Shape = Field("constant", description="early phase shape: constant, or linear decay to 0 at the "
                            "cutoff; late allows constant only")
    cutoff_epoch: int = Field(0, ge=0, description="epoch where early dropout ends / late dropout starts; "
                              "1 .. train.epochs-1 for early and late")

    @model_validator(mode="after")
    def _check(self) -> DropTiming:
        if self.mode == "late" and self.schedule == "linear":
            raise ValueError("schedule: late allows constant only (mode is 'late', got 'linear')")
        if self.mode != "standard" and self.cutoff_epoch == 0:
            raise ValueError(f"cutoff_epoch: mode '{self.mode}' needs a cutoff epoch >= 1")
        return self

    def check_epochs(self, epochs: int) -> None:
        """Raise ValueError naming both keys if an early or late cutoff is not before ``train.epochs``
        (called from the recipe config's validator, where ``train.epochs`` is known)."""
        check_cutoff("cutoff_epoch", self.mode, self.cutoff_epoch, epochs, "dropout")

    def schedule_for(self, base: float, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return DropSchedule(base=base, mode=self.mode, shape=self.schedule, cutoff_epoch=self.cutoff_epoch,
                            epochs=epochs, steps_per_epoch=steps_per_epoch)

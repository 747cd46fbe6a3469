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

    A config never asks for a ``cutoff_epoch`` at or past ``epochs`` (:meth:`DropConfig.check_epochs`
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


_WHAT = {"dropout": "dropout", "drop_path": "stochastic depth"}


def _check_cutoff(key: str, mode: str, cut: int, epochs: int, what: str) -> None:
    """An early phase that never ends, or a late one that never starts, is a mistake, not a schedule."""
    if mode != "standard" and cut >= epochs:
        never = "never end" if mode == "early" else "never start"
        raise ValueError(f"drop.{key}={cut} is not before train.epochs={epochs}: {mode} {what} would {never}; "
                         f"lower drop.{key} below {epochs} or raise train.epochs")


class DropConfig(Section):
    """Dropout and stochastic-depth rates with their early/late schedules.

    The shared ``mode``/``schedule``/``cutoff_epoch`` apply to both kinds unless a per-kind
    override is set, since the paper pairs e.g. early dropout with standard stochastic depth.
    """

    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate (all nn.Dropout layers, attention included)")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic-depth rate of the last block; "
                             "earlier blocks get linearly less, the first none")
    mode: Mode = Field("standard", description="standard: rate throughout; early: only before cutoff_epoch; "
                       "late: only from cutoff_epoch")
    schedule: Shape = Field("constant", description="early phase shape: constant, or linear decay to 0 at the "
                            "cutoff; late allows constant only; ignored by standard")
    cutoff_epoch: int = Field(0, ge=0, description="epoch where early dropout ends / late dropout starts; "
                              "1 .. train.epochs-1 for early and late")
    dropout_mode: Mode | None = Field(None, description="dropout's mode; None = mode")
    drop_path_mode: Mode | None = Field(None, description="stochastic depth's mode; None = mode")
    dropout_schedule: Shape | None = Field(None, description="dropout's schedule; None = schedule")
    drop_path_schedule: Shape | None = Field(None, description="stochastic depth's schedule; None = schedule")
    dropout_cutoff_epoch: int | None = Field(None, ge=0, description="dropout's cutoff epoch; None = cutoff_epoch")
    drop_path_cutoff_epoch: int | None = Field(None, ge=0,
                                               description="stochastic depth's cutoff epoch; None = cutoff_epoch")

    def _resolve(self, kind: str) -> tuple[tuple[str, Mode], tuple[str, Shape], tuple[str, int]]:
        """Effective (key, value) per setting, so errors can name the key the user actually set."""
        out = []
        for shared in ("mode", "schedule", "cutoff_epoch"):
            key = f"{kind}_{shared}"
            value = getattr(self, key)
            out.append((key, value) if value is not None else (shared, getattr(self, shared)))
        return tuple(out)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check_schedules(self) -> DropConfig:
        for kind in ("dropout", "drop_path"):
            (mode_key, mode), (shape_key, shape), (cut_key, cut) = self._resolve(kind)
            if mode == "late" and shape == "linear":
                raise ValueError(f"{shape_key}: late allows constant only ({mode_key} is 'late', got 'linear')")
            if mode != "standard" and cut == 0:
                raise ValueError(f"{cut_key}: {mode_key} '{mode}' needs a cutoff epoch >= 1")
        return self

    def check_epochs(self, epochs: int) -> None:
        """Raise ValueError naming both keys if an early or late cutoff is not before ``train.epochs``.

        A recipe config calls it from its own validator, where ``train.epochs`` is known. A kind whose rate is 0
        is not checked: its schedule is 0 whatever the cutoff (e.g. a dropout baseline of an early-dropout recipe).
        """
        for kind in ("dropout", "drop_path"):
            (_, mode), _, (cut_key, cut) = self._resolve(kind)
            if getattr(self, kind) > 0:
                _check_cutoff(cut_key, mode, cut, epochs, _WHAT[kind])

    def _schedule_for(self, kind: str, epochs: int, steps_per_epoch: int) -> DropSchedule:
        (_, mode), (_, shape), (_, cut) = self._resolve(kind)
        return DropSchedule(base=getattr(self, kind), mode=mode, shape=shape, cutoff_epoch=cut,
                            epochs=epochs, steps_per_epoch=steps_per_epoch)

    def dropout_schedule_for(self, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return self._schedule_for("dropout", epochs, steps_per_epoch)

    def drop_path_schedule_for(self, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return self._schedule_for("drop_path", epochs, steps_per_epoch)


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
        _check_cutoff("cutoff_epoch", self.mode, self.cutoff_epoch, epochs, "dropout")

    def schedule_for(self, base: float, epochs: int, steps_per_epoch: int) -> DropSchedule:
        return DropSchedule(base=base, mode=self.mode, shape=self.schedule, cutoff_epoch=self.cutoff_epoch,
                            epochs=epochs, steps_per_epoch=steps_per_epoch)

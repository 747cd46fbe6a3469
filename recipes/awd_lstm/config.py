"""The AWD-LSTM recipe's config: every hyperparameter of the paper's command line, typed and bounded."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from trainer.config import DataConfig, OptimConfig, RecipeConfig, Section, TrainConfig
from trainer.nt_asgd.config import NTASGDKeys
from trainer.schedules import DropTiming


class AWDModelConfig(Section):
    emsize: int = Field(400, ge=1)
    nhid: int = Field(1150, ge=1)
    nlayers: int = Field(3, ge=1)
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="locked dropout on the last layer's output")
    dropouth: float = Field(0.25, ge=0.0, lt=1.0, description="locked dropout between LSTM layers")
    dropouti: float = Field(0.4, ge=0.0, lt=1.0, description="locked dropout on the embedding output")
    dropoute: float = Field(0.1, ge=0.0, lt=1.0, description="embedding (whole-word) dropout")
    wdrop: float = Field(0.5, ge=0.0, lt=1.0, description="DropConnect on hidden-to-hidden weights")
    alpha: float = Field(2.0, ge=0.0, description="activation regularization weight")
    beta: float = Field(1.0, ge=0.0, description="temporal activation regularization weight")
    tie_weights: bool = True


class AWDDataConfig(DataConfig):
    dataset: Literal["ptb", "wikitext-2"] = "ptb"
    batch_size: int = Field(20, ge=1)
    bptt: int = Field(70, ge=5)
    eval_batch_size: int = Field(10, ge=1)
    test_batch_size: int = Field(1, ge=1)
    verify: bool = Field(True, description="check the files' md5 sums")
    download: bool = Field(True, description="fetch missing files from the canonical source")


class AWDOptimConfig(OptimConfig, NTASGDKeys):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(30.0, gt=0)
    clip: float = Field(0.25, ge=0)
    wdecay: float = Field(1.2e-6, ge=0)
    averaging: Literal["none", "nt_asgd"] = "nt_asgd"


class PointerConfig(Section):
    """The continuous cache pointer of launch/evaluate.py --pointer (defaults: the paper's PTB values)."""

    window: int = Field(2000, ge=1)
    lambdah: float = Field(0.1, ge=0.0, le=1.0, description="weight of the pointer distribution")
    theta: float = Field(1.0, gt=0.0, description="inverse temperature of the pointer attention")
    batch_size: int = Field(1, ge=1, description="streams evaluated side by side (the paper: 1)")
    chunk: int = Field(5000, ge=1, description="positions scored at once (the paper's pointer bptt)")
    skip_until_full: bool = Field(True, description="use the pointer only where the reference does")


RateName = Literal["dropout", "dropouth", "dropouti", "dropoute", "wdrop"]
DROPOUT_RATES: tuple[str, ...] = get_args(RateName)


class AWDDropConfig(DropTiming):
    """Early / late schedules for the model's dropout rates (model.dropout ... model.wdrop are the bases)."""

    rates: list[RateName] = Field(
        default_factory=lambda: list(DROPOUT_RATES), description="which of the model's rates follow the schedule")


class AWDTrainConfig(TrainConfig):
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "fp32"


class AWDConfig(RecipeConfig):
    resume_may_change = (*RecipeConfig.resume_may_change, "pointer.*")  # evaluation only

    seed: int = 141
    train: AWDTrainConfig
    data: AWDDataConfig
    model: AWDModelConfig
    optim: AWDOptimConfig
    pointer: PointerConfig = Field(default_factory=PointerConfig)
    drop: AWDDropConfig = Field(default_factory=AWDDropConfig)

    @model_validator(mode="after")
    def _check_drop(self) -> "AWDConfig":
        if self.drop.rates:  # before any rank starts: a cutoff the run never reaches
            self.drop.check_epochs(self.train.epochs)
        return self

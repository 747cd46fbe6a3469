"""Linear regression on generated data: one config class, one YAML file, one recipe class."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from trainer.config import DataConfig, OptimConfig, RecipeConfig, Section, TrainConfig
from trainer.recipe import BatchPlan, MicroResult, Recipe, StepContext
from trainer.streams import Example, ShuffledTensors


class ToyModel(Section):
    features: int = Field(8, ge=1)
    noise: float = Field(0.1, ge=0.0, description="standard deviation of the targets' noise")


class ToyData(DataConfig):
    train_size: int = Field(512, ge=1)
    valid_size: int = Field(128, ge=1)


class ToyConfig(RecipeConfig):
    train: TrainConfig
    data: ToyData
    optim: OptimConfig
    model: ToyModel


class ToyRegression(Recipe):
    config_model = ToyConfig
    report_split = "valid"

    cfg: ToyConfig

    def setup(self) -> None:
        """The data, drawn from the seed: y = x . w + noise, the same on every rank."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        m, d = self.cfg.model, self.cfg.data
        w = torch.randn(m.features, 1, generator=g)
        x = torch.randn(d.train_size + d.valid_size, m.features, generator=g)
        y = x @ w + m.noise * torch.randn(len(x), 1, generator=g)
        self.train_xy, self.valid_xy = (x[:d.train_size], y[:d.train_size]), (x[d.train_size:], y[d.train_size:])

    def build_model(self) -> nn.Module:
        return nn.Linear(self.cfg.model.features, 1)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.cfg.optim.lr)

    def train_data(self, plan: BatchPlan) -> ShuffledTensors:
        return ShuffledTensors(plan, *self.train_xy, seed=self.cfg.seed, device=self.ctx.device)

    def loss(self, model: nn.Module, micro: Example, step: StepContext | None) -> MicroResult:
        loss = nn.functional.mse_loss(model(micro.inputs), micro.targets)
        return MicroResult(loss, {"loss": loss.detach()})

    def evaluate(self, model: nn.Module, split: str, mode: str = "standard") -> dict[str, float]:
        """This rank's share of the validation examples: summed squared error and count."""
        x, y = self.valid_xy
        share = slice(self.ctx.rank, None, self.ctx.world)
        x, y = x[share].to(self.ctx.device), y[share].to(self.ctx.device)
        return {"se": float(((model(x) - y) ** 2).sum()), "n": float(len(x))}

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["se"] / sums["n"]}

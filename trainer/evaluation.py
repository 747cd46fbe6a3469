"""Exact evaluation over ranks: each rank sums over its share, the sums are reduced, then finalized."""

from __future__ import annotations

import torch
from torch import nn

from .distributed import DistContext, all_reduce_sums
from .recipe import Recipe


def evaluate_split(recipe: Recipe, module: nn.Module, split: str, ctx: DistContext, mode: str = "standard",
                   extra: dict[str, float] | None = None) -> dict[str, float]:
    """``extra``: more of this rank's sums, reduced with the recipe's (a training stream's own counters)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        sums = {**recipe.evaluate(module, split, mode), **(extra or {})}
    module.train(was_training)
    return recipe.finalize_metrics(all_reduce_sums(sums, ctx))

"""Weights as one flat vector in a module's canonical parameter order (``named_parameters()``, a tied weight
once): how an iterate average is kept, saved and put back into a model."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def copy_flat_into_params(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def copy_flat_into(module: nn.Module, flat: torch.Tensor) -> None:
    """Load a flat vector laid out in the module's canonical parameter order (see ShardedAverage)."""
    params = [p for _, p in module.named_parameters()]
    if flat.numel() != sum(p.numel() for p in params):
        raise ValueError(f"averaged state has {flat.numel()} values, the model {sum(p.numel() for p in params)}")
    copy_flat_into_params(params, flat)


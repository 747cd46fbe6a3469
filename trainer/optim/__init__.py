"""Optimizer wrappers any recipe can turn on from its config."""

from __future__ import annotations

from torch import nn

from ..config import OptimConfig
from ..distributed import DistContext
from .nt_asgd import NTASGD, nonmono_triggered

__all__ = ["NTASGD", "build_averager", "nonmono_triggered"]


def build_averager(cfg: OptimConfig, module: nn.Module, ctx: DistContext) -> NTASGD | None:
    if cfg.averaging == "nt_asgd":
        return NTASGD(module, ctx, nonmono=cfg.nonmono, t0=cfg.t0, stop_on_trigger=cfg.stop_on_nonmono)
    return None

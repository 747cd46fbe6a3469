"""NT-ASGD (Merity et al. 2017), an iterate-averaging wrapper any recipe can turn on from its config."""

from __future__ import annotations

from torch import nn

from ..distributed import DistContext
from .averager import NTASGD, nonmono_triggered

__all__ = ["NTASGD", "build_averager", "nonmono_triggered"]


def build_averager(cfg, module: nn.Module, ctx: DistContext) -> NTASGD | None:
    if cfg.averaging == "nt_asgd":
        return NTASGD(module, ctx, nonmono=cfg.nonmono, t0=cfg.t0, stop_on_trigger=cfg.stop_on_nonmono)
    return None

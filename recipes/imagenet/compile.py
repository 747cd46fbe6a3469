"""``train.compile``: torch.compile of the ImageNet recipes' timm model, with the per-step schedules kept out of
its graphs.

torch.compile specializes a graph on a module's float attributes: a dropout ``p`` or a drop path's ``drop_prob``
that changes means a new graph. A rate that is constant, or changes once (standard, late, and early constant
schedules: at the cutoff), costs one recompile at most; a linear early schedule changes it every step, which would
recompile every step until torch gives up and runs eagerly. So the modules that read a linearly scheduled rate stay
eager (``torch.compiler.disable``) and the graphs are compiled around them: the dropout and drop-path modules
themselves, the float copies' owners, and timm's fused attention, which hands ``attn_drop.p`` to
``scaled_dot_product_attention`` (it stays flash attention, eagerly).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.schedules import DropSchedule

from .drop_sites import DropSites


def _changes_every_step(schedule: DropSchedule) -> bool:
    return schedule.base > 0 and schedule.mode == "early" and schedule.shape == "linear"


def eager_modules(model: nn.Module, dropout: DropSchedule, drop_path: DropSchedule) -> list[nn.Module]:
    """The modules that must run eagerly under these schedules (see the module docstring)."""
    sites = DropSites.of(model)
    eager: list[nn.Module] = []
    if _changes_every_step(dropout):
        eager += list(sites.dropouts.values()) + [owner for owner, _ in sites.rate_attrs.values()]
        eager += [m for m in model.modules() if getattr(m, "fused_attn", False) and hasattr(m, "attn_drop")]
    if _changes_every_step(drop_path):
        eager += [path for paths in sites.drop_paths for path in paths]
    return eager


def compile_model(model: nn.Module, dropout: DropSchedule, drop_path: DropSchedule) -> list[nn.Module]:
    """Compile ``model`` in place (its parameters and state dict keep their names); returns the modules left
    eager."""
    eager = eager_modules(model, dropout, drop_path)
    for module in eager:
        module.forward = torch.compiler.disable(module.forward, recursive=True)
    model.compile()
    return eager

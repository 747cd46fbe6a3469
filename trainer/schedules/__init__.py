"""Drop-rate schedules (early/late dropout and stochastic depth, Liu et al. 2023) and their application."""

from .apply import DropSites, current_rates, is_head, prepare_drop_path, set_drop_path, set_dropout
from .drop import DropConfig, DropSchedule, DropTiming

__all__ = [
    "DropConfig",
    "DropSchedule",
    "DropSites",
    "DropTiming",
    "current_rates",
    "is_head",
    "prepare_drop_path",
    "set_drop_path",
    "set_dropout",
]

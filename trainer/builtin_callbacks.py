"""The features any recipe's run may turn on, each deciding from the config (or the environment) in its factory."""

from __future__ import annotations

from typing import Callable

from .analysis import GradientAnalysisCallback
from .callbacks import Callback, Callbacks
from .config import RecipeConfig
from .distributed import DistContext
from .faults.inject import FaultInjection
from .nt_asgd import NTASGDCallback

Factory = Callable[[RecipeConfig, DistContext], "Callback | None"]

# fault injection first: a start-up fault fires before anything else is built
FACTORIES: list[Factory] = [FaultInjection.from_env, NTASGDCallback.from_config, GradientAnalysisCallback.from_config]


def build_callbacks(cfg: RecipeConfig, ctx: DistContext, extra: list[Callback] = ()) -> Callbacks:
    """The callbacks this run's config turns on, then ``extra`` (a caller's own)."""
    built = [f(cfg, ctx) for f in FACTORIES]
    return Callbacks([c for c in built if c is not None] + list(extra))

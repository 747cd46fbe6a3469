"""NT-ASGD's attachment to the training loop: the average follows every applied update, validation drives the
trigger, evaluation and 'best' see the averaged weights, and checkpoints keep the average whole."""

from __future__ import annotations

import logging

from ..callbacks import Callback, Loop, Verdict
from ..config import RecipeConfig
from ..distributed import DistContext
from .averager import NTASGD

log = logging.getLogger("trainer")


class NTASGDCallback(Callback):
    name = "nt_asgd"

    def __init__(self, nonmono: int, t0: int, stop_on_trigger: bool):
        self.options = dict(nonmono=nonmono, t0=t0, stop_on_trigger=stop_on_trigger)
        self.averager: NTASGD | None = None

    @classmethod
    def from_config(cls, cfg: RecipeConfig, ctx: DistContext) -> NTASGDCallback | None:
        """On where the recipe's optimizer section has NT-ASGD's keys (``NTASGDKeys``) and asks for it."""
        o = cfg.optim
        if getattr(o, "averaging", "none") != "nt_asgd":
            return None
        return cls(o.nonmono, o.t0, o.stop_on_nonmono)

    def on_start(self, loop: Loop) -> None:
        self.averager = NTASGD(loop.module, loop.ctx, **self.options)

    def after_step(self, step: int, applied: bool) -> None:
        if applied:  # a vetoed update left the weights as they were: the iterate is not new
            self.averager.after_step(step)

    def on_validate(self, metrics: dict[str, float], step: int) -> Verdict | None:
        event = self.averager.observe(metrics["loss"], step)
        if event == "start":
            log.info("validation stopped improving: averaging (NT-ASGD) from step %d", self.averager.start_step)
            return Verdict(fields={"asgd_start_step": self.averager.start_step})
        if event == "stop":
            log.info("validation stopped improving while averaging: stopping (optim.stop_on_nonmono)")
            return Verdict(stop=True, fields={"stop": "nonmono"})
        return None

    def eval_weights(self):
        return self.averager.swapped()

    def scalars(self) -> dict[str, float]:
        return self.averager.scalars()

    def record_fields(self) -> dict:
        return {} if self.averager.start_step is None else {"asgd_start_step": self.averager.start_step}

    def state_dict(self) -> dict:
        """The averager's (a collective); ``eval_weights``: what a reader of the checkpoint without an engine
        evaluates (``launch/evaluate.py``, ``train.init_from``), the average once there is one."""
        state = self.averager.state_dict()
        return {**state, "eval_weights": state["average"]}

    def load_state_dict(self, state: dict) -> None:
        self.averager.load_state_dict({k: v for k, v in state.items() if k != "eval_weights"})

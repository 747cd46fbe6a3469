"""The loop's plug-in points for features that are not a recipe: NT-ASGD, the gradient analysis, fault injection.

The engine calls every hook of every callback in order and names none of them; the checkpointer saves each
callback's ``state_dict`` under its ``name`` without knowing what it is. A feature turns itself on from the
config (or the environment) in its factory (``trainer/builtin_callbacks.py`` lists them).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
from torch import nn

from .config import RecipeConfig
from .distributed import DistContext

if TYPE_CHECKING:
    from .monitor import Monitor
    from .recipe import Recipe, TrainData


@dataclass
class Loop:
    """What a callback may use once the engine is built (``on_start``)."""

    cfg: RecipeConfig
    ctx: DistContext
    recipe: Recipe
    data: TrainData
    module: nn.Module  # the trained module, inside DeepSpeed's engine
    monitor: Monitor


@dataclass
class Verdict:
    """A callback's answer to a validation: stop the run, and fields for the ``valid`` record."""

    stop: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Every hook is optional. Step numbers are the engine's count of optimizer steps taken (1-based)."""

    name: str = ""  # the key its state is saved under; "" keeps no state

    def on_model(self, model: nn.Module) -> None:
        """The model is built, before DeepSpeed wraps it (its fp32 initialization)."""

    def on_start(self, loop: Loop) -> None:
        """The engine is built, before a resume loads anything."""

    def before_step(self, step: int) -> None:
        """Step ``step`` is about to run."""

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """A micro-batch's weighted loss of step ``step``, before backward; returns what is back-propagated."""
        return loss

    def after_step(self, step: int, applied: bool) -> None:
        """Step ``step`` ran; ``applied``: its update was not vetoed (a non-finite loss or gradient)."""

    def on_step_end(self, step: int) -> None:
        """After step ``step``'s validation and checkpoint, outside the throughput window: periodic work."""

    def on_validate(self, metrics: dict[str, float], step: int) -> Verdict | None:
        """A validation at step ``step`` (under :meth:`eval_weights`) gave ``metrics``."""
        return None

    def eval_weights(self) -> ContextManager:
        """The weights to evaluate and keep as 'best' while the context is open (e.g. an average)."""
        return _nothing()

    def scalars(self) -> dict[str, float]:
        """Logged with every ``train`` record (TensorBoard tag -> value; the record's key has ``_`` for ``/``)."""
        return {}

    def record_fields(self) -> dict[str, Any]:
        """Extra fields of ``train`` records."""
        return {}

    def on_staged(self, tag: str) -> None:
        """Checkpoint ``tag``'s files are all written and nothing is published yet."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class Callbacks(Callback):
    """Many callbacks as one: each hook runs them in order."""

    def __init__(self, callbacks: list[Callback]):
        self.items = list(callbacks)
        names = [c.name for c in self.items if c.name]
        if len(names) != len(set(names)):
            raise ValueError(f"callbacks' state names repeat: {names}")

    def on_model(self, model):
        for c in self.items:
            c.on_model(model)

    def on_start(self, loop):
        for c in self.items:
            c.on_start(loop)

    def before_step(self, step):
        for c in self.items:
            c.before_step(step)

    def on_loss(self, loss, step):
        for c in self.items:
            loss = c.on_loss(loss, step)
        return loss

    def after_step(self, step, applied):
        for c in self.items:
            c.after_step(step, applied)

    def on_step_end(self, step):
        for c in self.items:
            c.on_step_end(step)

    def on_validate(self, metrics, step) -> Verdict:
        out = Verdict()
        for c in self.items:
            v = c.on_validate(metrics, step)
            if v is not None:
                out.stop |= v.stop
                out.fields.update(v.fields)
        return out

    @contextmanager
    def eval_weights(self):
        with ExitStack() as stack:
            for c in self.items:
                stack.enter_context(c.eval_weights())
            yield

    def scalars(self):
        return {k: v for c in self.items for k, v in c.scalars().items()}

    def record_fields(self):
        return {k: v for c in self.items for k, v in c.record_fields().items()}

    def on_staged(self, tag):
        for c in self.items:
            c.on_staged(tag)

    def states(self) -> dict[str, dict]:
        """Each named callback's state, by name (what a checkpoint keeps)."""
        return {c.name: c.state_dict() for c in self.items if c.name}

    def load_states(self, states: dict[str, dict]) -> None:
        for c in self.items:
            if c.name in states:
                c.load_state_dict(states[c.name])

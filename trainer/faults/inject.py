"""Faults injected on purpose, for the reliability tests and benchmarks.

``TRAINER_FAULTS`` holds ``kind@step:rank`` entries separated by commas, e.g. ``nan_loss@5:1`` (rank 1's
loss is NaN at optimizer step 5), ``sigkill@7:1`` (rank 1 kills itself with SIGKILL while computing step
7), ``sigkill_save@6:0`` (rank 0 kills itself with SIGKILL halfway through writing step 6's checkpoint: its
files staged, nothing published), ``error@0:1`` (rank 1 raises an ordinary exception during start-up) or
``stall_startup@0:1`` (rank 1 never finishes starting: where DeepSpeed builds its op, it freezes every thread of
its process, holding the GIL in native code with the signals the launcher sends blocked, as a rank stuck in a C
extension does; its heartbeat stops, its process lives on). Kinds: ``nan_loss``, ``inf_loss``, ``sigkill``,
``sigkill_save``, ``sigterm``, ``sigusr1``, ``sigusr2``, ``error``, ``stall_startup`` (step 0 only). A
fault fires once per process, at the step whose number (counted from 1; 0 is start-up, before the model is built)
it names, on the named rank. Unset, nothing is injected and the loop pays one attribute check per step (a save,
one environment lookup). Across hosts, pass it in ``~/.deepspeed_env``.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

from ..callbacks import Callback
from ..checkpoint.layout import STEP_TAG
from ..config import RecipeConfig
from ..distributed import DistContext
from ..errors import ConfigError

ENV = "TRAINER_FAULTS"
KINDS = ("nan_loss", "inf_loss", "sigkill", "sigkill_save", "sigterm", "sigusr1", "sigusr2", "error",
         "stall_startup")
_ENTRY = re.compile(r"^(?P<kind>[a-z0-9_]+)@(?P<step>\d+):(?P<rank>\d+)$")


@dataclass
class Fault:
    kind: str
    step: int
    rank: int
    fired: bool = False


class FaultPlan:
    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank == rank]

    @classmethod
    def from_env(cls, rank: int) -> "FaultPlan":
        text = os.environ.get(ENV, "").strip()
        faults = []
        for entry in filter(None, (e.strip() for e in text.split(","))):
            m = _ENTRY.match(entry)
            if not m or m["kind"] not in KINDS:
                raise ConfigError(f"{ENV} entry '{entry}' is not kind@step:rank with kind one of {', '.join(KINDS)}")
            if m["kind"] == "stall_startup" and m["step"] != "0":
                raise ConfigError(f"{ENV} entry '{entry}': stall_startup happens at start-up, step 0")
            faults.append(Fault(m["kind"], int(m["step"]), int(m["rank"])))
        return cls(faults, rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _due(self, step: int, kinds: tuple[str, ...]) -> Fault | None:
        for f in self.faults:
            if not f.fired and f.step == step and f.kind in kinds:
                f.fired = True
                return f
        return None

    def corrupt_loss(self, loss, step: int):
        f = self._due(step, ("nan_loss", "inf_loss"))
        return loss if f is None else loss * float("nan" if f.kind == "nan_loss" else "inf")

    def signal_self(self, step: int) -> None:
        f = self._due(step, ("sigkill", "sigterm", "sigusr1", "sigusr2"))
        if f is not None:
            os.kill(os.getpid(), getattr(signal, f.kind.upper()))

    def kill_in_save(self, step: int) -> None:
        if self._due(step, ("sigkill_save",)) is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def raise_error(self, step: int) -> None:
        f = self._due(step, ("error",))
        if f is not None:
            where = "during start-up" if step == 0 else f"at step {step}"
            raise InjectedFault(f"fault injected on rank {f.rank} {where} (TRAINER_FAULTS)")

    def stall_startup(self) -> None:
        """Freeze this process for good, as native code that holds the GIL and never returns does (DeepSpeed's
        shared-memory set-up waiting for a rank that never comes): libc's ``sleep`` called with the GIL held, the
        launcher's signals blocked in this thread, so that no thread of this process runs Python again: no
        heartbeat, no signal handler. Only SIGKILL ends it."""
        if self._due(0, ("stall_startup",)) is None:
            return
        import ctypes

        held = ctypes.PyDLL(None)  # PyDLL: functions called without releasing the GIL
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2})
        while True:
            held.sleep(3600)


class FaultInjection(Callback):
    """The plan's faults at the loop's points: before a step (signals, errors), on its loss (nan / inf) and in
    the save protocol, between a checkpoint's files being written and its publication (``sigkill_save``)."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan

    @classmethod
    def from_env(cls, cfg: RecipeConfig, ctx: DistContext) -> FaultInjection | None:
        """None unless ``TRAINER_FAULTS`` names faults for this rank; a start-up error fires here, as the run's
        first act, before anything is built."""
        plan = FaultPlan.from_env(ctx.rank)
        if not plan:
            return None
        plan.raise_error(0)
        return cls(plan)

    def before_step(self, step: int) -> None:
        self.plan.signal_self(step)
        self.plan.raise_error(step)

    def on_loss(self, loss, step: int):
        return self.plan.corrupt_loss(loss, step)

    def on_staged(self, tag: str) -> None:
        m = STEP_TAG.match(tag)
        if m:
            self.plan.kill_in_save(int(m[1]))


class InjectedFault(RuntimeError):
    """An ordinary exception, as a bug in a recipe would raise."""

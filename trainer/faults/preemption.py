"""SIGTERM / SIGUSR1 / SIGUSR2 (what Slurm, submitit and the DeepSpeed launcher send) turned into a request the
loop acts on: SIGTERM when a job is preempted or requeued, SIGUSR1 or SIGUSR2 (submitit's default) as the
warning ``--signal`` sends before a time limit.

The handler only records the signal: checkpointing inside a signal handler would run in the middle of a
collective. The loop reads the request after each optimizer step and all ranks agree on it in the step's
flag all-reduce, so every rank saves the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("trainer")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_last: list[str] = []  # every signal that preempted this process's training, in order: its own, or the job's
_early: list[str] = []  # signals that arrived after catch_early() and before training began


def last_signal() -> str | None:
    """The signal that last preempted this process's training (e.g. ``SIGUSR2``), if any: the job's, as the
    ranks agreed on it, even when it reached another rank first. A Slurm job decides from it whether to
    requeue itself."""
    return _last[-1] if _last else None


def record_agreed(name: str) -> None:
    """The signal the ranks agreed to stop for (see ``step_guard.agree_on_step``)."""
    _last.append(name)


def catch_early() -> None:
    """Record these signals from now on, for the training loop to act on at its first step: a job warned during
    its start-up still checkpoints and requeues as it would later. (Under the deepspeed launcher a signal
    during start-up keeps its default: it ends the rank at once, which is what the launcher means by it.)"""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, _frame: _early.append(signal.Signals(signum).name))


class PreemptionSignals:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        if _early:
            self._handle(getattr(signal, _early.pop(0)), None)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. an in-process test)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            _last.append(self.received)
            log.warning("received %s: checkpointing after the current step, then exiting", self.received)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

"""SIGTERM / SIGUSR1 (what Slurm and the DeepSpeed launcher send) turned into a request the loop acts on.

The handler only records the signal: checkpointing inside a signal handler would run in the middle of a
collective. The loop reads the request after each optimizer step and all ranks agree on it in the step's
flag all-reduce, so every rank saves the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("trainer")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. an in-process test)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: checkpointing after the current step, then exiting", self.received)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

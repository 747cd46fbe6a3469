"""Where results go: TensorBoard (through DeepSpeed's monitor), ``metrics.jsonl`` and the console.

Only rank 0 writes; every other rank's calls are no-ops, so callers need no rank checks.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from .distributed import DistContext
from .rundir import RunDir

log = logging.getLogger("trainer")


def setup_console_logging(ctx: DistContext) -> None:
    level = logging.INFO if ctx.is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fmt(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e9):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"


class Monitor:
    def __init__(self, run_dir: RunDir, ctx: DistContext, tb=None):
        """``tb`` is DeepSpeed's MonitorMaster (``engine.monitor``) or None for no TensorBoard."""
        self.run_dir = run_dir
        self.ctx = ctx
        self.tb = tb
        self._start = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.ctx.is_main and self.tb is not None and values:
            self.tb.write_events([(tag, float(v), step) for tag, v in values.items()])

    def record(self, split: str, step: int, epoch: float, metrics: dict[str, float], extra: dict | None = None,
               tensorboard: bool = True) -> None:
        """One ``metrics.jsonl`` line and ``<split>/<metric>`` TensorBoard scalars."""
        if not self.ctx.is_main:
            return
        rec = {"step": step, "epoch": round(epoch, 4), "split": split, **metrics, **(extra or {}),
               "time": round(time.time() - self._start, 2)}
        self.run_dir.append_metrics(rec)
        if tensorboard:
            self.scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})

    def console(self, prefix: str, values: dict[str, float]) -> None:
        if self.ctx.is_main:
            log.info("%s | %s", prefix, " | ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

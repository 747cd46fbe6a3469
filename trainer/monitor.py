"""Where results go: TensorBoard (DeepSpeed's TensorBoard monitor, written by the loop itself), ``metrics.jsonl``
and the console.

Only rank 0 writes; every other rank's calls are no-ops, so callers need no rank checks. Scalars written between
records (the schedules' rates, every step) are flushed with the next record, on the logging cadence, not each on
its own: a flush per step is a file write per step. DeepSpeed's engine gets no monitor of its own, so TensorBoard
has one learning-rate series, ``train/lr`` on the step axis, not a second one on a samples axis.
"""

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
    def __init__(self, run_dir: RunDir, ctx: DistContext, tensorboard: bool = False):
        """``tensorboard``: write event files into ``<run>/tensorboard/`` (needs DeepSpeed's communication up)."""
        self.run_dir = run_dir
        self.ctx = ctx
        self.tb = _tensorboard(run_dir) if tensorboard and ctx.is_main else None
        self._start = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars, written now and flushed with the next record (or :meth:`flush`)."""
        if self.tb is not None and values:
            self.tb.write_events([(tag, float(v), step) for tag, v in values.items()], flush=False)

    def record(self, split: str, step: int, epoch: float, metrics: dict[str, float], extra: dict | None = None,
               tensorboard: bool = True) -> None:
        """One ``metrics.jsonl`` line and ``<split>/<metric>`` TensorBoard scalars; flushes TensorBoard."""
        if not self.ctx.is_main:
            return
        rec = {"step": step, "epoch": round(epoch, 4), "split": split, **metrics, **(extra or {}),
               "time": round(time.time() - self._start, 2)}
        self.run_dir.append_metrics(rec)
        if tensorboard:
            self.scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})
        self.flush()

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def console(self, prefix: str, values: dict[str, float]) -> None:
        if self.ctx.is_main:
            log.info("%s | %s", prefix, " | ".join(f"{k} {_fmt(v)}" for k, v in values.items()))


def _tensorboard(run_dir: RunDir):
    """DeepSpeed's TensorBoard monitor on ``<run>/tensorboard/``."""
    from deepspeed.monitor.config import TensorBoardConfig
    from deepspeed.monitor.tensorboard import TensorBoardMonitor

    return TensorBoardMonitor(TensorBoardConfig(enabled=True, output_path=str(run_dir.path), job_name="tensorboard"))

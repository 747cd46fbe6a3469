"""The run directory: resolved config, metrics log, TensorBoard events and checkpoints in one place."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import to_yaml
from .errors import ConfigError
from .run_lock import RunLock

if TYPE_CHECKING:  # torch is imported by a run's ranks, not by the argument and config checks before them
    from pydantic import BaseModel

    from .distributed import DistContext


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, cfg: BaseModel) -> None:
        """The run's resolved config (``config.yaml``), what a resume and launch/evaluate.py read back."""
        self.config.write_text(to_yaml(cfg))

    def lock(self) -> RunLock:
        """This job's hold on the directory (created if missing), refused in one line while another job holds it."""
        return RunLock.acquire(self.path)

    def has_checkpoint(self) -> bool:
        from .checkpoint.layout import has_checkpoints

        return has_checkpoints(self.checkpoints)

    def holds_a_run(self) -> bool:
        """Checkpoints or logged metrics: results a new run must not overwrite (a lone config.yaml is not)."""
        return self.has_checkpoint() or (self.metrics.exists() and self.metrics.stat().st_size > 0)

    def append_metrics(self, record: dict) -> None:
        """One JSON line; a nan or inf value is written as null (JSON has neither)."""
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.metrics.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def resolve_run_dir(arg: str | None, recipe: str, resume: bool, ctx: DistContext) -> RunDir:
    """Pick the run directory on rank 0 and share it, so every rank agrees on a timestamped name."""
    if resume:
        if not arg:
            raise ConfigError("--resume needs --run-dir DIR naming the run to continue")
        run = RunDir(arg)
        if not run.has_checkpoint():
            raise ConfigError(f"nothing to resume in {run.path}: it has no checkpoints; start a new run in another --run-dir")
        return run
    if arg:
        run = RunDir(arg)
        if run.holds_a_run():
            raise ConfigError(
                f"{run.path} already holds a run; pass --resume to continue it or choose another --run-dir"
            )
        return run
    from .distributed import broadcast_object

    name = broadcast_object(f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}" if ctx.is_main else None, ctx)
    return RunDir(name)

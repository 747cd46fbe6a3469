"""Reading what a run wrote: its metrics.jsonl (whole lines only, while it is being appended to), its TensorBoard
scalars, and waiting for it to log a step."""

from __future__ import annotations

import json
import time
from pathlib import Path

WALL_CLOCK = ("tokens_per_s", "samples_per_s", "time")  # the only logged values a resume may change


def metrics_lines(run_dir: Path) -> list[str]:
    """The complete lines of ``metrics.jsonl``; one being appended right now is left for the next read."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [line for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in metrics_lines(run_dir)]
    return [r for r in rows if split is None or r.get("split") == split]


def rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without its wall-clock values: what two runs of the same training log alike."""
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar of the run, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def train_steps(lines: list[str], trained: bool = True) -> list[int]:
    """Steps of the train lines; ``trained``: only those with a loss (a skipped step's line has none)."""
    rows = (json.loads(line) for line in lines)
    return [r["step"] for r in rows if r.get("split") == "train" and ("loss" in r or not trained)]


def logged_steps(run_dir: Path) -> list[int]:
    return train_steps(metrics_lines(run_dir))


def wait_for_step(run_dir: Path, step: int, alive, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = logged_steps(run_dir)
        if done and done[-1] >= step:
            return done[-1]
        if not alive():
            raise RuntimeError(f"the run in {run_dir} ended before step {step}")
        time.sleep(0.05)
    raise RuntimeError(f"no step {step} in {run_dir} within {timeout} s")

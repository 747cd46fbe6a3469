"""Timed training runs for the benchmarks: ``launch/train.py`` started in the background (1 rank: plain ``python``;
N ranks: the ``deepspeed`` launcher), so the numbers are those of the engine users run, not of a re-implementation.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .launching import free_port
from .metrics import read_metrics
from .paths import BIN, REPO

SMALL = {"model.emsize": 200, "model.nhid": 400}
PAPER: dict = {}  # the recipe defaults are the paper's PTB shape


def overrides(*layers: dict) -> list[str]:
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


def train_command(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
                  recipe: str = "awd_ptb") -> tuple[list[str], dict]:
    """The command line and environment of one run.

    With ``threads=None`` OMP_NUM_THREADS is dropped so the engine's own CPU-thread split
    (cores / local ranks) applies whatever the caller's shell exports; an int pins it.
    """
    port = free_port()
    env = run_env(threads)
    args = ["launch/train.py", "--recipe", recipe, "--run-dir", str(run_dir), "--set", *sets]
    if ranks == 1:
        env["MASTER_PORT"] = str(port)
        return [sys.executable, *args], env
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), *args], env


def run_env(threads: int | None = None) -> dict:
    """The environment of a launched process (a run, or a benchmark's own helper process), so both get the same
    CPU threads: ``threads=None`` drops OMP_NUM_THREADS, an int pins it."""
    from trainer.launch_env import interpreter_path  # the same ninja as every other run (or the op rebuilds)

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PATH"] = interpreter_path(env.get("PATH"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shell_line(cmd: list[str]) -> str:
    """The command as a reader would type it from the repo root with the venv active."""
    parts = list(cmd)
    parts[0] = Path(parts[0]).name
    return " ".join(parts)


@dataclass
class Run:
    ranks: int
    run_dir: Path
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path
    t0: float
    cpu0: float
    wall_s: float = float("nan")
    cores_used: float = float("nan")  # CPU seconds of the run / wall seconds: < its thread count = contention
    load_avg: float = float("nan")  # 1-minute load average when it ended

    def wait(self, poll_s: float | None = None, report=None) -> "Run":
        """Block until the run ends; with ``poll_s``, call ``report(self)`` between polls."""
        while True:
            try:
                self.proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                if report:
                    report(self)
        self.wall_s = time.perf_counter() - self.t0
        self.cores_used = (_children_cpu_s() - self.cpu0) / self.wall_s
        self.load_avg = os.getloadavg()[0]
        if self.proc.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"run failed (rc {self.proc.returncode}): {shell_line(self.cmd)}\n{tail}")
        return self

    def metrics(self, split: str | None = None) -> list[dict]:
        return read_metrics(self.run_dir, split)


def start_run(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
              recipe: str = "awd_ptb") -> Run:
    """Start a training run in the background; its console output goes to ``run_dir``.log."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd, env = train_command(ranks, run_dir, sets, threads, recipe)
    log_path = run_dir.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Run(ranks, run_dir, cmd, proc, log_path, time.perf_counter(), _children_cpu_s())


def _children_cpu_s() -> float:
    """CPU time of reaped child processes; runs are sequential, so a delta is one run's (all ranks)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_training(ranks: int, run_dir: Path, sets: list[str], threads: int | None = None,
                 recipe: str = "awd_ptb") -> Run:
    return start_run(ranks, run_dir, sets, threads, recipe).wait()

#!/usr/bin/env python
"""Faults injected into real 2-rank ``awd_ptb`` runs, each followed by ``--resume``: what was lost, what was
shown, how long the job took to end.

For every scenario: start a small run (checkpoint every 5 steps, a log line every step), inject the fault once
it has logged step 7 or so, wait for every process of the job to exit, then resume it for two more steps.
Reported per scenario:

  exit s          from the fault to the last process of the job gone
  exit code       of the rank-0 side (the launcher or, for two nodes, node 0's launcher)
  steps lost      steps finished before the fault minus the step the resume started from
  tracebacks      "Traceback" anywhere in the output of the faulty run and of its resume
  data lost       metrics.jsonl lines written before the fault missing afterwards, plus checkpoints that
                  verified before the fault and no longer do
  resumed         the resume ran to its end and continued at the step after its checkpoint

    python bench/faults.py [--only NAME,...] [--lost-rank-timeout 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (BIN, cleanup, free_port, machine_line, markdown_table, read_metrics, scratch_dir,  # noqa
                          short_eval_data)
from bench.two_nodes import TwoNodes  # noqa: E402
from trainer.checkpoint import step_tags, verify  # noqa: E402
from trainer.distributed import launcher_env  # noqa: E402

FAULT_STEP = 7


def base_sets(data_root: Path, timeout_s: float) -> list[str]:
    return [f"data.root={data_root}", "data.verify=false", "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1",
            "train.epochs=1", "train.max_steps=100000", "train.checkpoint_every=5", "train.eval_every=100000",
            "train.test_at_end=false", "train.progress=false", "train.keep_last=10",
            f"train.lost_rank_timeout_s={timeout_s}"]


def _env(extra: dict | None = None) -> dict:
    """No OMP_NUM_THREADS: the engine's own split of the cores applies, as in the other benchmarks."""
    return {k: v for k, v in launcher_env().items() if k != "OMP_NUM_THREADS"} | (extra or {})


@dataclass
class Job:
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, args: list[str], log: Path, env: dict | None = None, port: int | None = None) -> "Job":
        """2 ranks under the deepspeed launcher in a session of their own, as a Slurm job step is: a signal to the
        process group reaches the runner, the launcher and every rank, as Slurm delivers it."""
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port or free_port()), "launch/train.py",
               *args]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return cls(proc, log)

    def gone(self) -> bool:
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
            return False
        except ProcessLookupError:
            return True

    def wait_gone(self, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while not self.gone():
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise RuntimeError(f"job still running after {timeout} s; see {self.log}")
            time.sleep(0.05)
        return time.monotonic()


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir, "train") if "loss" in r]


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


def snapshot(run_dir: Path) -> tuple[list[str], list[str]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    ckpt = run_dir / "checkpoints"
    return lines, [t for t in step_tags(ckpt) if verify(ckpt, t) is None]


def data_lost(before: tuple[list[str], list[str]], run_dir: Path) -> int:
    lines, good = before
    now_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    ckpt = run_dir / "checkpoints"
    missing_lines = sum(1 for line in lines if line not in now_lines)
    broken = sum(1 for t in good if (ckpt / t).is_dir() and verify(ckpt, t) is not None)
    return missing_lines + broken


def resume(run_dir: Path, log: Path, after: int) -> tuple[int, bool]:
    """Resume two steps past where the fault left the run; returns (resumed-from step, continued correctly)."""
    job = Job.start(["--run-dir", str(run_dir), "--resume", "--set", f"train.max_steps={after + 2}"], log)
    job.wait_gone()
    text = log.read_text()
    marker = "resumed from step_"
    start = int(text.split(marker, 1)[1][:8]) if marker in text else -1
    steps = logged_steps(run_dir)
    return start, job.proc.returncode == 0 and steps[-2:] == [after + 1, after + 2] and start >= 0


# ------------------------------------------------------------------------------------------------ scenarios
def signal_group(sig):
    def inject(job: Job, run_dir: Path) -> tuple[float, int]:
        done = wait_for_step(run_dir, FAULT_STEP, lambda: not job.gone())
        os.killpg(job.proc.pid, sig)
        return time.monotonic(), done
    return inject


def sigkill_rank1(job: Job, run_dir: Path) -> tuple[float, int]:
    done = wait_for_step(run_dir, FAULT_STEP, lambda: not job.gone())
    victims = [p for p in psutil.Process(job.proc.pid).children(recursive=True)
               if "--local_rank=1" in p.cmdline()]
    victims[0].kill()
    return time.monotonic(), done


def env_fault(spec: str):
    """A fault the run injects into itself (TRAINER_FAULTS); the fault time is when the run ends."""
    def inject(job: Job, run_dir: Path) -> tuple[float | None, int]:
        job.wait_gone()
        return None, int(spec.split("@")[1].split(":")[0]) - 1
    return inject


SCENARIOS = {
    # name: (description, injector, extra --set, TRAINER_FAULTS)
    "sigterm": ("SIGTERM to the job's process group (Slurm preemption)", signal_group(signal.SIGTERM), [], None),
    "sigusr1": ("SIGUSR1 to the job's process group (Slurm --signal)", signal_group(signal.SIGUSR1), [], None),
    "sigkill_rank": ("SIGKILL to rank 1", sigkill_rank1, [], None),
    "nan_stop": (f"NaN loss on rank 1 at step {FAULT_STEP + 1}, on_nonfinite=stop",
                 env_fault(f"nan_loss@{FAULT_STEP + 1}:1"), [], f"nan_loss@{FAULT_STEP + 1}:1"),
    "error_rank": (f"an exception on rank 1 at step {FAULT_STEP + 1} (a bug)", env_fault(f"error@{FAULT_STEP + 1}:1"),
                   [], f"error@{FAULT_STEP + 1}:1"),
    "nan_skip": (f"NaN loss on rank 1 at step {FAULT_STEP + 1}, on_nonfinite=skip", None,
                 ["train.on_nonfinite=skip", f"train.max_steps={FAULT_STEP + 3}"], f"nan_loss@{FAULT_STEP + 1}:1"),
}


def run_scenario(name: str, root: Path, data_root: Path, timeout_s: float) -> list:
    what, inject, extra, faults = SCENARIOS[name]
    run_dir, log = root / name, root / f"{name}.log"
    job = Job.start(["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *base_sets(data_root, timeout_s),
                     *extra], log, {"TRAINER_FAULTS": faults} if faults else None)
    if inject is None:  # the run goes on past the fault and ends by itself
        job.wait_gone()
        text = log.read_text()
        skipped = [r for r in read_metrics(run_dir, "train") if r.get("skipped_steps")]
        ok = job.proc.returncode == 0 and bool(skipped)
        return [name, what, "-", job.proc.returncode, 0, text.count("Traceback"), 0, "not needed" if ok else "FAILED"]
    t_fault, done = inject(job, run_dir)
    t_end = job.wait_gone()
    before = snapshot(run_dir)
    start, ok = resume(run_dir, root / f"{name}-resume.log", max(done, logged_steps(run_dir)[-1]))
    tracebacks = log.read_text().count("Traceback") + (root / f"{name}-resume.log").read_text().count("Traceback")
    exit_s = "-" if t_fault is None else t_end - t_fault  # a self-inflicted fault has no outside start time
    return [name, what, exit_s, job.proc.returncode, max(0, done - start), tracebacks, data_lost(before, run_dir),
            "yes" if ok else "FAILED"]


def run_truncated_latest(root: Path, data_root: Path, timeout_s: float) -> list:
    run_dir, log = root / "truncated", root / "truncated.log"
    sets = [*base_sets(data_root, timeout_s), f"train.max_steps={2 * 5}"]
    job = Job.start(["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *sets], log)
    job.wait_gone()
    states = run_dir / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    before = snapshot(run_dir)
    start, ok = resume(run_dir, root / "truncated-resume.log", 10)
    tracebacks = log.read_text().count("Traceback") + (root / "truncated-resume.log").read_text().count("Traceback")
    return ["truncated_checkpoint", "latest checkpoint cut to half its size", "-", 0, 10 - start, tracebacks,
            data_lost(before, run_dir), "yes" if ok else "FAILED"]


def run_lost_node(root: Path, data_root: Path, timeout_s: float) -> list:
    run_dir = root / "lost_node"
    nodes = TwoNodes(root / "nodes", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set",
                                      *base_sets(data_root, timeout_s)])
    try:
        done = wait_for_step(run_dir, FAULT_STEP, lambda: nodes.proc.poll() is None)
        nodes.kill_node1()
        t_fault = time.monotonic()
        code = nodes.wait(timeout=timeout_s + 300)
        exit_s = time.monotonic() - t_fault
    finally:
        nodes.close()
    before = snapshot(run_dir)
    start, ok = resume(run_dir, root / "lost_node-resume.log", max(done, logged_steps(run_dir)[-1]))
    tracebacks = nodes.log(0).count("Traceback") + (root / "lost_node-resume.log").read_text().count("Traceback")
    return ["lost_node", f"node 1 of 2 (launcher + rank) killed, hosts in {nodes.mode}: heartbeat timeout", exit_s, code,
            max(0, done - start), tracebacks, data_lost(before, run_dir), "yes" if ok else "FAILED"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--lost-rank-timeout", type=float, default=60.0, help="train.lost_rank_timeout_s")
    args = ap.parse_args()
    names = [*SCENARIOS, "truncated_checkpoint", "lost_node"]
    chosen = [n for n in names if not args.only or n in args.only.split(",")]
    print(machine_line(), f"| awd_ptb 32/48, 2 ranks, lost_rank_timeout_s={args.lost_rank_timeout:g}", flush=True)
    root = scratch_dir("faults-")
    data_root = short_eval_data()
    rows = []
    try:
        for name in chosen:
            if name == "truncated_checkpoint":
                row = run_truncated_latest(root, data_root, args.lost_rank_timeout)
            elif name == "lost_node":
                row = run_lost_node(root, data_root, args.lost_rank_timeout)
            else:
                row = run_scenario(name, root, data_root, args.lost_rank_timeout)
            print(" | ".join(str(c) for c in row), flush=True)
            rows.append(row)
    finally:
        if os.environ.get("KEEP"):
            print("kept", root)
        else:
            cleanup(root)
        cleanup(data_root.parent)
    print()
    print(markdown_table(["scenario", "fault", "exit s", "exit code", "steps lost", "tracebacks", "data lost",
                          "resumed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

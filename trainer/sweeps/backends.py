"""Where a sweep's points run: one after another here (``local``, ``hostfile``) or as slurm jobs (submitit)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from ..errors import ConfigError
from ..launch_env import free_port, launcher_env
from ..rundir import RunDir
from . import jobs
from .changes import FLAG, Change, aside_path, keys_text, move_aside
from .points import Point
from .spec import SweepSpec
from .status import FINISHED, point_status

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"


@dataclass(frozen=True)
class Step:
    point: Point
    status: str  # finished | partial | missing
    action: str  # skip | resume | start | wait (its job is still queued or running) | restart | changed
    job: str = ""  # the live job of a point that waits
    change: Change | None = None  # how a point's config differs from its run's (restart, changed)


def plan(points: list[Point], spec: SweepSpec | None = None, changes: dict[str, Change] | None = None,
         restart: bool = False) -> list[Step]:
    """Skip finished points and those whose Slurm job is still queued or running (``jobs.json``), resume the
    ones with a checkpoint, start the rest. A point whose config changed since its run (``changes``) is
    restarted afresh with ``restart`` (refused while a job of its old config is still queued or running),
    else only reported (the sweep stops before running anything)."""
    changes = changes or {}
    records = jobs.load(spec) if spec is not None else {}
    slurm = {p.name: records[p.name]["job"] for p in points if records.get(p.name, {}).get("backend") == "slurm"}
    live = jobs.slurm_states(list(slurm.values()))
    steps, busy = [], []
    for p in points:
        status = point_status(p.run_dir)
        job = live.get(slurm.get(p.name, ""))
        change = changes.get(p.name)
        if change is not None:
            if restart and job is not None and job.state in ("queued", "running"):
                busy.append(f"{p.name} (job {slurm[p.name]} is {job.state}: scancel {slurm[p.name]})")
            elif restart and records.get(p.name, {}).get("backend") == "local" \
                    and (mine := jobs.local_state(records[p.name])).state == "running":
                busy.append(f"{p.name} ({mine.detail} still runs it: let it end or stop it)")
            steps.append(Step(p, status, "restart" if restart else "changed", change=change))
        elif status == FINISHED:
            steps.append(Step(p, status, "skip"))
        elif job is not None and job.state in ("queued", "running"):
            steps.append(Step(p, status, "wait", slurm[p.name]))
        else:
            steps.append(Step(p, status, "resume" if RunDir(p.run_dir).has_checkpoint() else "start"))
    if busy:
        raise ConfigError(f"{len(busy)} changed point(s) are still being trained with their old config, so "
                          f"{FLAG} cannot move their run directories aside: {'; '.join(busy)}; then rerun")
    return steps


def train_args(recipe: str, point: Point, resume: bool) -> list[str]:
    args = ["--recipe", recipe, "--run-dir", str(point.run_dir)]
    if resume:
        args.append("--resume")
    return args + (["--set", *point.overrides] if point.overrides else [])


def set_aside(run_dir: Path) -> Path | None:
    """A run with metrics but no checkpoint cannot resume and blocks a fresh start; keep it, out of the way."""
    if not RunDir(run_dir).holds_a_run():
        return None
    target = run_dir.parent / ".stale" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(target))
    return target


def to_run(steps: list[Step]):
    """(progress label, step) for each point that is not finished; finished ones are reported as skipped."""
    for i, st in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {st.point.name}"
        if st.action == "skip":
            print(f"{head}: skipped (finished) {st.point.run_dir}", flush=True)
            continue
        if st.action == "wait":
            print(f"{head}: skipped (job {st.job} is still queued or running) {st.point.run_dir}", flush=True)
            continue
        if st.action == "changed":
            print(f"{head}: changed since its run ({keys_text(st.change)}): stops the sweep; {FLAG} would move "
                  f"{st.point.run_dir} aside and start it afresh", flush=True)
            continue
        yield head, st


def restart_changed(head: str, st: Step, dry_run: bool) -> str:
    """Move a changed point's old run directory aside (one line says where); the action it then takes."""
    if st.action != "restart":
        return st.action
    run, why = st.point.run_dir, f"{head}: changed since its run ({keys_text(st.change)})"
    if dry_run:
        print(f"{why}: would move {run} to {aside_path(run)} and start it afresh", flush=True)
        return "start"
    try:
        moved = move_aside(run)
    except OSError as e:
        raise ConfigError(f"cannot move {run} aside to restart point {st.point.name}: {e.strerror}; "
                          "move it yourself and rerun") from None
    print(f"{why}: its old run directory was moved to {moved}; it starts afresh", flush=True)
    return "start"


# ------------------------------------------------------------------ local and hostfile
def _deepspeed() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")


def launcher(spec: SweepSpec, backend: str, port: int) -> list[str]:
    if backend == "hostfile":
        return [_deepspeed(), "--hostfile", str(spec.hostfile), "--master_port", str(port), str(TRAIN_SCRIPT)]
    if spec.ranks == 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    return [_deepspeed(), "--num_gpus", str(spec.ranks), "--master_port", str(port), str(TRAIN_SCRIPT)]


HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # the rule of DeepSpeed's launcher (launcher/runner.py)


def check_hostfile(path: str | None) -> None:
    """DeepSpeed's launcher refuses a bad hostfile with a traceback, once for every point: check it once, first.

    (A missing one it ignores, training on this machine alone, which is never what a hostfile sweep means.)"""
    fix = "one line '<host> slots=<GPUs>' per node, as in hostfile.example"
    if not path:
        raise ConfigError(f"--backend hostfile needs 'hostfile: FILE' in the sweep file; the file holds {fix}")
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"hostfile {path} does not exist; create it with {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"hostfile {path} cannot be read ({getattr(e, 'strerror', None) or e}); "
                          f"it must be text with {fix}") from None
    hosts = set()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = HOSTFILE_LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"hostfile {path} line {n} '{line}' is not '<host> slots=<N>' with N >= 1; write {fix}")
        if m.group(1) in hosts:
            raise ConfigError(f"hostfile {path} line {n} names {m.group(1)} a second time; give each node one line")
        hosts.add(m.group(1))
    if not hosts:
        raise ConfigError(f"hostfile {path} names no node; write {fix}")


def run_sequential(spec: SweepSpec, steps: list[Step], backend: str, dry_run: bool) -> list[str]:
    """Run the points one after another; returns the names of those that failed."""
    if backend == "hostfile":
        check_hostfile(spec.hostfile)
    failed = []
    for head, st in to_run(steps):
        action = restart_changed(head, st, dry_run)
        cmd = launcher(spec, backend, free_port()) + train_args(spec.recipe, st.point, action == "resume")
        print(f"{head}: {action} {st.point.run_dir}\n  {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        if action == "start":
            moved = set_aside(st.point.run_dir)
            if moved:
                print(f"  an earlier attempt without a checkpoint was moved to {moved}", flush=True)
        jobs.record(spec, st.point.name, jobs.local_entry())
        rc = subprocess.run(cmd, env=launcher_env()).returncode
        jobs.record(spec, st.point.name, jobs.local_entry(rc))
        if rc != 0:
            print(f"{head}: failed (exit {rc})", flush=True)
            failed.append(st.point.name)
    return failed


# ------------------------------------------------------------------ slurm
def _port_for(job_id: str) -> int:
    """Every task of a job derives the same port from the job id, which a requeued job keeps."""
    digits = re.sub(r"\D", "", job_id or "") or "0"
    return 20000 + int(digits) % 30000


def _set_dist_env() -> None:
    """torch.distributed's env:// variables from the slurm job, one task per GPU; outside submitit, one rank."""
    try:
        job = submitit.JobEnvironment()
    except RuntimeError:
        job = None
    if job is None:
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        return
    world = job.num_tasks
    os.environ.update(
        RANK=str(job.global_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(max(1, world // max(1, job.num_nodes))),
        MASTER_ADDR=job.hostnames[0] if world > 1 else "127.0.0.1",
        MASTER_PORT=os.environ.get("SWEEP_MASTER_PORT", str(_port_for(str(job.job_id)))),
    )


class PointFailed(RuntimeError):
    """The point's training ended with an error (its one-line message is in the job's log above)."""


class TrainPoint(submitit.helpers.Checkpointable):
    """One point as a slurm job: every task trains in-process, as one rank of the point's run.

    Whether to resume is decided when the job starts, not when it was submitted, so a requeued job continues
    from the checkpoint its previous attempt left. A time-limit warning (``--signal``: submitit's SIGUSR2, or
    SIGUSR1) is handled by the training loop like any preemption: the ranks agree on a step and checkpoint it,
    then rank 0 requeues the job (at most ``max_requeue`` times) and every rank returns. A SIGTERM is Slurm's
    own preemption or requeue, which requeues the job itself (or a cancel, which must not): the ranks only
    checkpoint.
    """

    def __init__(self, recipe: str, point: Point, cwd: str, max_requeue: int = 3):
        self.recipe = recipe
        self.point = point
        self.cwd = cwd
        self.max_requeue = max_requeue

    def __call__(self) -> str:
        os.chdir(self.cwd)  # relative data.root and friends mean what they meant at submission
        run = self.point.run_dir
        if point_status(run) == FINISHED:
            return str(run)
        from ..faults import preemption

        preemption.catch_early()
        _set_dist_env()
        resume = RunDir(run).has_checkpoint()

        from ..cli import guarded, train_parser
        from ..commands import train

        try:
            code = guarded(train, train_parser(), train_args(self.recipe, self.point, resume))
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        if code != 0:
            raise PointFailed(f"point {self.point.name} stopped with exit status {code}; its error is above")
        if preemption.last_signal() in ("SIGUSR1", "SIGUSR2") and os.environ.get("RANK") == "0":
            self._requeue(preemption.last_signal())
        return str(run)

    def _requeue(self, why: str) -> None:
        job, done = os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if done >= self.max_requeue:
            print(f"{self.point.name}: stopped by {why} and not requeued: it was requeued {done} time(s), "
                  f"slurm.max_requeue is {self.max_requeue}; rerun the sweep to resume it", flush=True)
            return
        subprocess.run(["scontrol", "requeue", job], check=True)
        print(f"{self.point.name}: stopped by {why}; job {job} requeued ({done + 1} of {self.max_requeue}), it "
              "resumes from the checkpoint", flush=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm_parameters(spec: SweepSpec, name: str) -> dict:
    s = spec.slurm
    params = {
        "name": name, "nodes": s.nodes, "gpus_per_node": s.gpus_per_node or None, "tasks_per_node": s.tasks,
        "cpus_per_task": s.cpus_per_task, "timeout_min": s.time_min, "mem_gb": s.mem_gb,
        "slurm_partition": s.partition, "slurm_account": s.account, "slurm_constraint": s.constraint,
        "slurm_signal_delay_s": s.signal_delay_s, "slurm_additional_parameters": dict(s.extra) or None,
        "slurm_setup": list(s.setup) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def submit_slurm(spec: SweepSpec, steps: list[Step], dry_run: bool) -> list[str]:
    """Submit one job per unfinished point whose job is not queued or running; with ``dry_run`` print them."""
    folder = Path(spec.sweep_dir) / ".submitit" / "%j"  # one folder of logs per job
    executor = None
    if not dry_run and any(st.action in ("start", "resume", "restart") for st in steps):
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=spec.slurm.max_requeue)
        except RuntimeError as e:
            raise ConfigError(f"cannot submit to slurm here: {e}") from None
    submitted = []
    for head, st in to_run(steps):
        action = restart_changed(head, st, dry_run)
        params = slurm_parameters(spec, f"{spec.recipe}-{st.point.name}")
        cmd = ["python", str(TRAIN_SCRIPT), *train_args(spec.recipe, st.point, action == "resume")]
        shown = " ".join(f"{k}={v}" for k, v in params.items())
        print(f"{head}: {'would submit' if dry_run else 'submit'} ({action}) {st.point.run_dir}\n"
              f"  slurm: {shown} max_requeue={spec.slurm.max_requeue}\n"
              f"  each task (in-process): {shlex.join(cmd)}", flush=True)
        if executor is None:
            continue
        if action == "start":
            set_aside(st.point.run_dir)  # here, not in the job, where ranks on other nodes could race it
        executor.update_parameters(**params)
        job = executor.submit(TrainPoint(spec.recipe, st.point, os.getcwd(), spec.slurm.max_requeue))
        jobs.record(spec, st.point.name, {"backend": "slurm", "job": str(job.job_id)})
        print(f"  job {job.job_id}", flush=True)
        submitted.append(job.job_id)
    return submitted

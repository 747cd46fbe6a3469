"""Which job ran or runs each point, and what the scheduler says of it: ``sweep_dir/jobs.json``.

A Slurm point records its job id when it is submitted; a point run here records the sweep process (host, pid)
and, once it ends, its exit status. ``--status`` and a rerun of the sweep read it back, so a point whose job is
still queued or running is never submitted twice. Only the process that runs or submits the sweep writes it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from .spec import SweepSpec

FILE = "jobs.json"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _path(spec: SweepSpec) -> Path:
    return Path(spec.sweep_dir) / FILE


def load(spec: SweepSpec) -> dict[str, dict]:
    try:
        return json.loads(_path(spec).read_text())
    except (OSError, ValueError):
        return {}


def record(spec: SweepSpec, point: str, entry: dict) -> None:
    """Set ``point``'s entry; the file is replaced whole, so a reader never sees half of it."""
    records = load(spec)
    records[point] = entry
    path = _path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    os.replace(tmp, path)


def local_entry(exit_code: int | None = None) -> dict:
    return {"backend": "local", "host": socket.gethostname(), "pid": os.getpid(), "exit": exit_code}


@dataclass(frozen=True)
class JobState:
    state: str  # queued | running | ended | failed | unknown
    requeues: int = 0
    detail: str = ""  # the scheduler's own word for it


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_states(job_ids: list[str]) -> dict[str, JobState]:
    """What Slurm says of each job: squeue for live jobs, sacct (its records, one per attempt) for requeue counts
    and for jobs that ended."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    live = dict(line.split() for line in _run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i %T"]).splitlines()
                if len(line.split()) == 2)
    attempts: dict[str, list[str]] = {}
    for line in _run(["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", ids]).splitlines():
        job, _, state = line.partition("|")
        attempts.setdefault(job, []).append(state.split()[0] if state else "")
    out = {}
    for job in job_ids:
        history = attempts.get(job, [])
        requeues = sum(1 for s in history if s == "REQUEUED")
        now = live.get(job) or (history[-1] if history else "")
        if now in QUEUED:
            out[job] = JobState("queued", requeues, now)
        elif now in RUNNING:
            out[job] = JobState("running", requeues, now)
        elif now == "COMPLETED":
            out[job] = JobState("ended", requeues, now)
        elif now:
            out[job] = JobState("failed", requeues, now)
        else:
            out[job] = JobState("unknown", requeues, "not known to squeue or sacct")
    return out


def local_state(entry: dict) -> JobState:
    """A point run by a sweep process: running while that process lives (on this host), else by its exit."""
    if entry.get("exit") is None:
        if entry.get("host") != socket.gethostname():
            return JobState("unknown", 0, f"run by sweep process {entry.get('pid')} on {entry.get('host')}")
        if psutil.pid_exists(int(entry.get("pid", -1))):
            return JobState("running", 0, f"sweep process {entry['pid']}")
        return JobState("failed", 0, "its sweep process ended before it did")
    return JobState("ended" if entry["exit"] == 0 else "failed", 0, f"exit {entry['exit']}")

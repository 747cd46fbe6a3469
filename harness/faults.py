"""The fault scenarios: each starts a small 2-rank ``awd_ptb`` run (checkpoint every 5 steps, a log line every step),
snapshots its data (``metrics.jsonl`` lines, every file of every checkpoint that verifies, with its SHA-256),
injects its fault, waits for every process of the job to exit, resumes it for two more steps and compares the data
with the snapshot. bench/faults.py reports them; the fault tests start and watch jobs with ``Job`` and
``wait_for_step``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from trainer.checkpoint import BEST, MODEL_STATES, read_latest_tag, step_tags, verify
from trainer.launch_env import launcher_env

from .launching import free_port
from .metrics import logged_steps, metrics_lines, train_steps, wait_for_step
from .paths import BIN, REPO
from .two_nodes import TwoNodes

FAULT_STEP = 7  # faults from outside come once the run has logged this step
# faults the run injects into itself (TRAINER_FAULTS) come at this step: their snapshot (see own_fault) reaches
# step OWN_STEP - 3, a step past the checkpoint of step 5: a step's time to take in that checkpoint
OWN_STEP = FAULT_STEP + 2


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


# ------------------------------------------------------------------------------------------------ what a run wrote
def tag_files(tag_dir: Path) -> dict[str, tuple[int, str]]:
    """Every file of a checkpoint: size and SHA-256 (none when the directory is gone)."""
    out = {}
    for p in sorted(tag_dir.rglob("*")) if tag_dir.is_dir() else []:
        if p.is_file():
            with p.open("rb") as f:
                out[str(p.relative_to(tag_dir))] = (p.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest())
    return out


@dataclass
class Snapshot:
    """A run's data at one moment: the complete metrics lines and the checkpoints that verify. A save in progress
    is a ``.partial`` directory, not yet a tag, so a run that is checkpointing meanwhile adds nothing half-written."""
    lines: list[str]
    ckpts: dict[str, dict[str, tuple[int, str]]]

    @classmethod
    def take(cls, run_dir: Path) -> "Snapshot":
        lines, ckpt = metrics_lines(run_dir), run_dir / "checkpoints"
        tags = [t for t in [*step_tags(ckpt), BEST] if (ckpt / t).is_dir() and verify(ckpt, t) is None]
        return cls(lines, {t: tag_files(ckpt / t) for t in tags})

    def describe(self) -> str:
        steps = train_steps(self.lines, trained=False)
        return f"metrics to step {steps[-1] if steps else 0}, checkpoints {', '.join(self.ckpts) or 'none'}"

    def lost(self, run_dir: Path, exempt) -> list[str]:
        """What this snapshot held and ``run_dir`` no longer holds as it was: metrics lines gone or changed,
        checkpoints gone or with a file changed (``best`` only if gone or failing verification: a better
        validation replaces it by design). Tags in ``exempt`` (damaged by the fault itself) are left out."""
        gone = Counter(self.lines) - Counter(metrics_lines(run_dir))
        out = [f"metrics line of {r['split']} step {r['step']}" for r in map(json.loads, gone.elements())]
        ckpt = run_dir / "checkpoints"
        for tag, files in self.ckpts.items():
            if tag in exempt:
                continue
            if tag == BEST:
                problem = verify(ckpt, tag) if (ckpt / tag).is_dir() else "gone"
                out += [f"{tag} ({problem})"] if problem else []
                continue
            now = tag_files(ckpt / tag)
            changed = [name for name, entry in files.items() if now.get(name) != entry]
            if changed:
                out.append(f"{tag} ({'gone' if not now else ', '.join(changed) + ' changed'})")
        return out


# ------------------------------------------------------------------------------------------------ faults
# An injector gets the started job and returns (snapshot before the fault, when the fault struck or None when no
# job was running then, {checkpoint tag the fault itself damaged: how}).
def outside(act):
    """A fault from outside, once the run has logged step FAULT_STEP: the snapshot, then at once the fault."""
    def inject(job: Job, run_dir: Path):
        wait_for_step(run_dir, FAULT_STEP, lambda: not job.gone())
        before = Snapshot.take(run_dir)
        act(job)
        return before, time.monotonic(), {}
    return inject


def kill_rank1(job: Job) -> None:
    victims = [p for p in psutil.Process(job.proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
    victims[0].kill()


def own_fault(job: Job, run_dir: Path):
    """A fault rank 1 injects into itself at step OWN_STEP. The snapshot kept is the newest one after which rank 0
    had still not logged step OWN_STEP - 2: rank 1 begins step OWN_STEP only after the collectives of step
    OWN_STEP - 1, which rank 0 joins after logging step OWN_STEP - 2, so that snapshot surely precedes the fault
    (a later one might not). The fault struck when the run's first ``error:`` line is seen (None: it went on)."""
    before, seen = None, None
    while not job.gone():
        path = run_dir / "metrics.jsonl"
        state = (path.stat().st_size if path.exists() else 0, step_tags(run_dir / "checkpoints"))
        if state != seen:
            seen, snap = state, Snapshot.take(run_dir)
            if max(train_steps(metrics_lines(run_dir), trained=False), default=0) >= OWN_STEP - 2:
                break
            before = snap
        time.sleep(0.02)
    if before is None:
        raise RuntimeError(f"no snapshot of {run_dir} before step {OWN_STEP - 2}; see {job.log}")
    while not job.gone():
        if error_shown(job):
            return before, time.monotonic(), {}
        time.sleep(0.02)
    if error_shown(job):
        raise RuntimeError(f"the job ended before its error line was seen; see {job.log}")
    return before, None, {}


def error_shown(job: Job) -> bool:
    return any(line.startswith("error: ") for line in job.log.read_text(errors="replace").splitlines())


def rebuilt_op(job: Job, run_dir: Path):
    """The run was started (just now) with an empty extensions folder (SCENARIO_ENV), so DeepSpeed builds its CPU
    op while the ranks start: there is no data to lose yet; the run must train on to its end. Notes what was built
    and how long the start took."""
    started = time.monotonic()
    first = None
    while not job.gone():
        if first is None and logged_steps(run_dir):
            first = time.monotonic() - started
        time.sleep(0.05)
    folder = Path(SCENARIO_ENV["op_rebuild"](run_dir.parent)["TORCH_EXTENSIONS_DIR"])
    built = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.so"))
    notes = [f"built into the empty extensions folder while the ranks started: {', '.join(built) or 'nothing'}",
             "first step logged " + (f"{first:.0f} s after the start" if first is not None else "never")]
    return Snapshot([], {}), None, {}, notes


def truncate_latest(job: Job, run_dir: Path):
    """After the run's end, the latest checkpoint's model states cut to half their size (a copy cut short)."""
    job.wait_gone()
    before, ckpt = Snapshot.take(run_dir), run_dir / "checkpoints"
    tag = read_latest_tag(ckpt)
    states = ckpt / tag / MODEL_STATES
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[: size // 2])
    return before, None, {tag: f"{MODEL_STATES} cut from {size} to {size // 2} bytes"}


SCENARIOS = {
    # name: (description, injector, extra --set, TRAINER_FAULTS, resume after it)
    "sigterm": ("SIGTERM to the job's process group (Slurm preemption)",
                outside(lambda job: os.killpg(job.proc.pid, signal.SIGTERM)), [], None, True),
    "sigusr1": ("SIGUSR1 to the job's process group (Slurm --signal)",
                outside(lambda job: os.killpg(job.proc.pid, signal.SIGUSR1)), [], None, True),
    "sigkill_rank": ("SIGKILL to rank 1", outside(kill_rank1), [], None, True),
    "nan_stop": (f"NaN loss on rank 1 at step {OWN_STEP}, on_nonfinite=stop", own_fault, [],
                 f"nan_loss@{OWN_STEP}:1", True),
    "error_rank": (f"an exception on rank 1 at step {OWN_STEP} (a bug)", own_fault, [], f"error@{OWN_STEP}:1", True),
    "nan_skip": (f"NaN loss on rank 1 at step {OWN_STEP}, on_nonfinite=skip", own_fault,
                 ["train.on_nonfinite=skip", f"train.max_steps={OWN_STEP + 2}"], f"nan_loss@{OWN_STEP}:1", False),
    "truncated_checkpoint": ("latest checkpoint cut to half its size, after the run", truncate_latest,
                             ["train.max_steps=10"], None, True),
    "op_rebuild": ("2 ranks start on an empty extensions folder: DeepSpeed's CPU op (deepspeed_shm_comm) is built "
                   "while they start, longer than lost_rank_timeout_s=5", rebuilt_op,
                   [f"train.max_steps={FAULT_STEP + 2}", "train.lost_rank_timeout_s=5"], None, False),
}
# Environment a scenario's run starts with, given the scratch root: op_rebuild's extensions folder is a new, empty
# one (the environment's own folder cleared, without touching the one other jobs on this machine use).
SCENARIO_ENV = {"op_rebuild": lambda root: {"TORCH_EXTENSIONS_DIR": str(root / "extensions-op_rebuild")}}


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Faulty:
    """What the run the fault struck did, and the snapshot of its data taken before the fault."""
    before: Snapshot
    t_fault: float | None
    t_end: float
    code: int
    output: str
    damaged: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the injector saw, for the scenario's note


def measure(name: str, what: str, run_dir: Path, root: Path, f: Faulty, resume: bool) -> tuple[list, str, bool]:
    """Resume (or, for a run that went on past the fault, read it) and compare with the snapshot: the table row,
    the scenario's note and whether it went as it should (the run or its resume continued correctly)."""
    lines = metrics_lines(run_dir)
    done = max(train_steps(lines), default=0)
    notes = [f"before the fault: {f.before.describe()}", f"the run logged to step {done}"]
    notes += [f"the fault itself damaged {tag} ({how})" for tag, how in f.damaged.items()]
    notes += f.notes
    output = f.output
    if resume:
        latest = read_latest_tag(run_dir / "checkpoints")
        log = root / f"{name}-resume.log"
        job = Job.start(["--run-dir", str(run_dir), "--resume", "--set", f"train.max_steps={done + 2}"], log)
        job.wait_gone()
        text = log.read_text()
        output += text
        m = re.search(r"resumed from (\S+) at step (\d+)", text)
        new = train_steps(metrics_lines(run_dir)[len(lines):])
        ok = job.proc.returncode == 0 and m is not None and new == list(range(int(m[2]) + 1, done + 3))
        lost_steps = done - int(m[2]) if m else "?"
        start = "no 'resumed from' line" if m is None else f"resumed from {m[1]}" + (
            f" (fell back: latest was {latest})" if m[1] != latest else "")
        notes.append(f"{start}, logged steps {new or 'none'}, exit code {job.proc.returncode}")
        resumed = "yes" if ok else "FAILED"
    else:
        logged = train_steps(lines, trained=False)
        untrained = sorted(set(range(1, max(logged, default=0) + 1)) - set(train_steps(lines)))
        ok = f.code == 0 and bool(logged) and logged[-1] > max(untrained, default=0)
        lost_steps = len(untrained)
        notes.append(f"went on without a resume; steps without a loss (update skipped): {untrained or 'none'}")
        resumed = "not needed" if ok else "FAILED"
    lost = f.before.lost(run_dir, f.damaged)
    notes.append(f"data lost: {'; '.join(lost) if lost else 'none'}")
    exit_s = "-" if f.t_fault is None else f.t_end - f.t_fault
    row = [name, what, exit_s, f.code, lost_steps, output.count("Traceback"), len(lost), resumed]
    return row, f"{name}: " + "; ".join(notes), ok


def run_scenario(name: str, root: Path, data_root: Path, timeout_s: float) -> tuple[list, str, bool]:
    what, inject, extra, faults, resume = SCENARIOS[name]
    run_dir, log = root / name, root / f"{name}.log"
    env = ({"TRAINER_FAULTS": faults} if faults else {}) | (SCENARIO_ENV[name](root) if name in SCENARIO_ENV else {})
    for folder in (v for k, v in env.items() if k == "TORCH_EXTENSIONS_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    job = Job.start(["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *base_sets(data_root, timeout_s),
                     *extra], log, env or None)
    before, t_fault, damaged, *seen = inject(job, run_dir)
    t_end = job.wait_gone()
    return measure(name, what, run_dir, root, Faulty(before, t_fault, t_end, job.proc.returncode, log.read_text(),
                                                     damaged, seen[0] if seen else []), resume)


def run_lost_node(root: Path, data_root: Path, timeout_s: float) -> tuple[list, str, bool]:
    run_dir = root / "lost_node"
    nodes = TwoNodes(root / "nodes", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set",
                                      *base_sets(data_root, timeout_s)])
    try:
        wait_for_step(run_dir, FAULT_STEP, lambda: nodes.proc.poll() is None)
        before = Snapshot.take(run_dir)
        nodes.kill_node1()
        t_fault = time.monotonic()
        code = nodes.wait(timeout=timeout_s + 300)
        t_end = time.monotonic()
    finally:
        nodes.close()
    what = f"node 1 of 2 (launcher + rank) killed, hosts in {nodes.mode}: heartbeat timeout"
    return measure("lost_node", what, run_dir, root, Faulty(before, t_fault, t_end, code, nodes.log(0) + nodes.log(1)),
                   True)

#!/usr/bin/env python
"""The multi-host paths on the test cluster (tests/cluster: two hosts in network namespaces with sshd, and a
Slurm cluster on them), as root.

1. Throughput: awd_ptb (small shape) on 2 ranks, either both on one host (``deepspeed --num_gpus 2``) or one
   on each host (``deepspeed --hostfile``, ranks reached over ssh/pdsh, gloo over the hosts' link), rounds
   interleaved. The hosts share this machine's cores, so the ratio is the cost of the multi-host path itself
   (gloo over TCP instead of shared memory, the per-step agreement across hosts), not of a network.
2. Requeue: a one-point Slurm sweep (a 2-task job on both nodes); once it has trained 20 steps, ``scontrol
   requeue``; timed: until the checkpoint of the agreed step is written, until the job runs again, until its
   first step after the resume.

Verdicts: the 2-host run keeps at least half the one-host rate, and the resumed job's first step comes within
60 s of the requeue (the cluster's KillWait is 30 s and its requeue hold, AuthInfo=cred_expire, 5 s).

    .venv/bin/python bench/cluster.py [--rounds 2] [--steps 240] [--requeues 2]    # as root
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.corpora import short_eval_data
from harness.hosts import Hosts
from harness.jobs import StreamedJob
from harness.metrics import read_metrics
from harness.paths import BIN, DATA_ROOT, REPO
from harness.reporting import machine_line, markdown_table
from harness.runs import SMALL, overrides
from harness.slurm import KILL_WAIT_S, REQUEUE_DELAY_S, SlurmCluster
from harness.timing import median
from trainer.launch_env import launcher_env

TINY = {"model.emsize": 32, "model.nhid": 48, "data.bptt": 20, "train.log_every": 1}


def run_on_node1(hosts: Hosts, argv: list[str], log: Path) -> StreamedJob:
    return StreamedJob(hosts["node1"].cmd(argv, REPO), log, REPO, launcher_env())


def throughput(hosts: Hosts, work: Path, rounds: int, steps: int, data: Path) -> dict[str, list[float]]:
    hostfile = work / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    sets = overrides(SMALL, {"data.root": data, "data.verify": False, "train.max_steps": steps,
                             "train.log_every": steps // 8, "train.eval_every": 0, "train.checkpoint_every": 0,
                             "train.test_at_end": False, "train.progress": False})
    launchers = {"2 ranks, one host": [str(BIN / "deepspeed"), "--num_gpus", "2"],
                 "2 ranks, two hosts": [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "node1"]}
    rates: dict[str, list[float]] = {k: [] for k in launchers}
    for r in range(rounds):
        for label, launcher in (launchers.items() if r % 2 == 0 else reversed(launchers.items())):
            run = work / f"tp-{r}-{label.replace(' ', '').replace(',', '-')}"
            job = run_on_node1(hosts, [*launcher, "launch/train.py", "--recipe", "awd_ptb", "--run-dir", str(run),
                                       "--set", *sets], run.with_suffix(".log"))
            if job.wait(timeout=1800) != 0:
                raise SystemExit(f"{label} run failed:\n{job.output[-3000:]}")
            windows = [row["tokens_per_s"] for row in read_metrics(run, "train")][1:]  # the first: start-up
            rates[label] += windows
            print(f"round {r + 1} {label}: tokens/s per window {', '.join(f'{w:.0f}' for w in windows)}", flush=True)
    return rates


def requeue_times(hosts: Hosts, slurm: SlurmCluster, work: Path, n: int) -> list[tuple[float, float, float]]:
    """(checkpoint written, job running again, first resumed step), seconds after ``scontrol requeue``."""
    out = []
    base = {**TINY, "data.root": str(REPO / DATA_ROOT), "train.max_steps": 100000, "train.checkpoint_every": 100000,
            "train.eval_every": 100000, "train.test_at_end": False, "train.progress": False}
    for i in range(n):
        sweep_dir = work / f"requeue-{i}"
        spec = {"recipe": "awd_ptb", "sweep_dir": str(sweep_dir), "base": base, "grid": {"seed": [i]}, "slurm": {"nodes": 2, "gpus_per_node": 0, "tasks_per_node": 1,
                                                 "cpus_per_task": 1, "partition": "debug", "time_min": 30}}
        path = work / f"requeue-{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        submit = run_on_node1(hosts, [sys.executable, "launch/sweep.py", str(path), "--backend", "slurm"],
                              work / f"submit-{i}.log")
        if submit.wait(timeout=300) != 0:
            raise SystemExit(submit.output[-3000:])
        job = json.loads((sweep_dir / "jobs.json").read_text())[f"seed-{i}"]["job"]
        run = sweep_dir / f"seed-{i}"
        while not [r for r in read_metrics(run, "train") if r["step"] >= 20]:
            time.sleep(0.1)
        t0 = time.monotonic()
        slurm.run(["scontrol", "requeue", job])
        latest = run / "checkpoints" / "latest"
        while not latest.is_file():
            time.sleep(0.05)
        saved = time.monotonic() - t0
        step = int(latest.read_text().split("_")[1])
        while slurm.job_field(job, "JobState") != "PENDING":
            time.sleep(0.1)
        while slurm.job_field(job, "JobState") != "RUNNING":
            time.sleep(0.1)
        running = time.monotonic() - t0
        while not [r for r in read_metrics(run, "train") if r["step"] > step]:
            time.sleep(0.05)
        first = time.monotonic() - t0
        slurm.run(["scancel", job])
        slurm.wait_for_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
        print(f"requeue {i + 1}: checkpoint step_{step:08d} after {saved:.1f} s, running again after "
              f"{running:.1f} s, first resumed step after {first:.1f} s", flush=True)
        out.append((saved, running, first))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--requeues", type=int, default=2)
    args = ap.parse_args()
    print(machine_line(), flush=True)
    (REPO / "runs").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=REPO / "runs"))
    data = short_eval_data()
    hosts = Hosts(work / "hosts").up()
    slurm = None
    try:
        rates = throughput(hosts, work, args.rounds, args.steps, data)
        slurm = SlurmCluster(hosts, work / "slurm").up()
        times = requeue_times(hosts, slurm, work, args.requeues)
    finally:
        if slurm is not None:
            slurm.down()
        hosts.down()

    one, two = median(rates["2 ranks, one host"]), median(rates["2 ranks, two hosts"])
    print(f"\nawd_ptb small shape, {args.steps} steps, {args.rounds} round(s), median of "
          f"{len(rates['2 ranks, one host'])} windows each")
    print(markdown_table(["launch", "tokens/s (median)", "ratio to one host"],
                         [["2 ranks, one host", one, "1.00"], ["2 ranks, two hosts", two, f"{two / one:.2f}"]]))
    print(f"\nscontrol requeue of a 2-node Slurm point (KillWait {KILL_WAIT_S} s, requeue hold {REQUEUE_DELAY_S} s)")
    print(markdown_table(["requeue", "checkpoint written (s)", "running again (s)", "first resumed step (s)"],
                         [[i + 1, *(f"{x:.1f}" for x in t)] for i, t in enumerate(times)]))
    ok_rate, ok_requeue = two / one >= 0.5, max(t[2] for t in times) <= 60
    print(f"\nverdict: two hosts keep {two / one:.2f} of the one-host rate (budget >= 0.5): "
          f"{'pass' if ok_rate else 'FAIL'}; first resumed step at most {max(t[2] for t in times):.1f} s after "
          f"the requeue (budget <= 60 s): {'pass' if ok_requeue else 'FAIL'}")
    return 0 if ok_rate and ok_requeue else 1


if __name__ == "__main__":
    sys.exit(main())

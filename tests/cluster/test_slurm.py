"""Sweeps on a real Slurm cluster (slurm.py: slurmctld, slurmdbd, two slurmd, munge, MariaDB on the test hosts):
``launch/sweep.py --backend slurm`` submits with sbatch through submitit, each point a 2-task job across both
nodes; ``--status`` follows the jobs; ``scontrol requeue`` and a time limit checkpoint, requeue and resume."""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml

from harness.hosts import HostsUnavailable
from harness.images import make_image_folder
from harness.launching import free_port
from harness.metrics import read_metrics
from harness.paths import BIN, REPO as ROOT
from harness.slurm import SlurmCluster
from trainer.launch_env import launcher_env

from .conftest import SHIPPED, TINY_AWD, TINY_VIT, on_node1

CPU_JOB = {"nodes": 2, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "partition": "debug",
           "time_min": 10, "mem_gb": None}


@pytest.fixture(scope="module")
def slurm(hosts):
    cluster = SlurmCluster(hosts, hosts.work / "slurm")
    try:
        cluster.up()
    except HostsUnavailable as e:
        pytest.fail(f"cannot bring up the Slurm cluster: {e}")
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "imagenet")


def sweep_on_node1(hosts, path, *flags, log):
    job = on_node1(hosts, [sys.executable, "launch/sweep.py", str(path), *flags], log)
    assert job.wait(timeout=300) == 0, job.output[-4000:]
    return job.output


def status_lines(hosts, path, log) -> dict[str, str]:
    out = sweep_on_node1(hosts, path, "--status", log=log)
    return {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}


def recorded_jobs(sweep_dir) -> dict[str, str]:
    return {name: r["job"] for name, r in json.loads((sweep_dir / "jobs.json").read_text()).items()}


def test_slurm_sweep_runs_each_point_as_a_two_node_job(hosts, slurm, images, tmp_path):
    """A small copy of the shipped ViT-T early-dropout sweep: two points, each 2 tasks on 2 nodes."""
    spec = yaml.safe_load(SHIPPED.read_text())
    spec.update(sweep_dir=str(tmp_path / "sweep"), slurm=CPU_JOB,
                grid={"drop.mode": ["standard", "early"], "drop.dropout": [0.1]})
    spec["base"].update({"data.root": str(images), **TINY_VIT})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    root = tmp_path / "sweep"

    with slurm.held():
        out = sweep_on_node1(hosts, path, "--backend", "slurm", log=tmp_path / "submit.log")
        assert out.count("  job ") == 2, out
        submitted = recorded_jobs(root)
        again = sweep_on_node1(hosts, path, "--backend", "slurm", log=tmp_path / "again.log")
        assert again.count("is still queued or running") == 2 and "  job " not in again, again
        assert recorded_jobs(root) == submitted and len(slurm.jobs()) == 2  # nothing submitted twice
        states = status_lines(hosts, path, tmp_path / "status1.log")
        assert [line.split()[1] for line in states.values()] == ["queued", "queued"], states

    for job in submitted.values():
        assert slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED"
    states = status_lines(hosts, path, tmp_path / "status2.log")
    for name, job in submitted.items():
        assert states[name].split()[1:4] == ["done", "requeued", "0"], states[name]
        assert f"job {job}" in states[name] and str(root / name) in states[name]
        logs = "".join(p.read_text() for p in (root / ".submitit" / job).glob("*_log.*"))
        assert "on 2 rank(s)" in logs and "hostname=node1" in logs and "hostname=node2" in logs, logs[-3000:]
        assert [r["step"] for r in read_metrics(root / name, "train")] == list(range(1, 7))
    summary = sweep_on_node1(hosts, path, "--summarize", log=tmp_path / "summary.log")
    assert "summary: 2 finished" in summary and (root / "summary.csv").is_file()


def awd_point(tmp_path, max_steps: int, **slurm_changes) -> tuple:
    """A one-point AWD sweep whose point runs long enough to be interrupted (a checkpoint only when stopped)."""
    spec = {"recipe": "awd_ptb", "sweep_dir": str(tmp_path / "sweep"),
            "base": {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in TINY_AWD)}
            | {"train.max_steps": max_steps, "train.checkpoint_every": 100000, "train.eval_every": 100000},
            "grid": {"seed": [5]}, "slurm": {**CPU_JOB, **slurm_changes}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, tmp_path / "sweep" / "seed-5"


def wait_for_steps(run, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not [r for r in read_metrics(run, "train") if r["step"] >= step]:
        assert time.monotonic() < deadline, f"no step {step} in {run} within {timeout} s"
        time.sleep(0.2)


def test_scontrol_requeue_checkpoints_an_agreed_step_and_resumes_bit_for_bit(hosts, slurm, tmp_path,
                                                                             shared_data):
    path, run = awd_point(tmp_path, max_steps=100)
    sweep_on_node1(hosts, path, "--backend", "slurm", log=tmp_path / "submit.log")
    (job,) = recorded_jobs(tmp_path / "sweep").values()
    wait_for_steps(run, 20, timeout=300)
    slurm.run(["scontrol", "requeue", job])
    assert slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600) == "COMPLETED"
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / job).glob("*_log.*"))
    assert "preempted (SIGTERM) at step" in logs and "Traceback" not in logs
    tag = logs.split("preempted (SIGTERM) at step ")[1].split(":")[0]
    assert f"resumed from step_{int(tag):08d} at step {tag}" in logs, logs[-3000:]
    assert slurm.job_field(job, "Restarts") == "1"
    assert status_lines(hosts, path, tmp_path / "status.log")["seed-5"].split()[1:4] == ["done", "requeued",
                                                                                             "1"]
    # the same point without interruption, 2 ranks on one host: every step's loss is the same, bit for bit
    ref = tmp_path / "ref"
    sets = [f"{k}={v}" for k, v in yaml.safe_load(path.read_text())["base"].items()] + ["seed=5"]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--recipe", "awd_ptb", "--run-dir", str(ref), "--set", *sets]
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    assert steps == {r["step"]: r["loss"] for r in read_metrics(ref, "train")}


def test_time_limit_warning_checkpoints_requeues_and_resumes(hosts, slurm, tmp_path, shared_data):
    """A 2-minute limit with the warning 60 s before it (Slurm's 30-second timer sends it up to 30 s late): the
    job is warned by submitit's SIGUSR2 while training, checkpoints the step its ranks agree on, rank 0 requeues
    it, and it resumes from that checkpoint when it starts again."""
    path, run = awd_point(tmp_path, max_steps=100000, time_min=2, signal_delay_s=60, max_requeue=3)
    sweep_on_node1(hosts, path, "--backend", "slurm", log=tmp_path / "submit.log")
    (job,) = recorded_jobs(tmp_path / "sweep").values()
    logs = tmp_path / "sweep" / ".submitit" / job
    deadline = time.monotonic() + 400
    while "resumed from" not in (text := "".join(p.read_text() for p in sorted(logs.glob("*_log.*")))):
        assert time.monotonic() < deadline and slurm.job_field(job, "JobState") not in ("FAILED", "TIMEOUT"), text
        time.sleep(1)
    stop = int(text.split("preempted (SIGUSR2) at step ")[1].split(":")[0])
    assert f"job {job} requeued (1 of 3)" in text and f"resumed from step_{stop:08d} at step {stop}" in text, text
    assert "Traceback" not in text and slurm.job_field(job, "Restarts") == "1"
    wait_for_steps(run, stop + 1, timeout=120)  # the resumed attempt trains on
    slurm.run(["scancel", job])
    slurm.wait_for_state(job, {"CANCELLED"}, timeout=120)
    line = status_lines(hosts, path, tmp_path / "status.log")["seed-5"]
    assert line.split()[1:4] == ["failed", "requeued", "1"] and "rerun the sweep to resume" in line, line


def test_requeue_stops_at_max_requeue(tmp_path, monkeypatch, capsys):
    """The last allowed requeue spent, a warned job is not requeued again (no scontrol is called)."""
    from trainer.sweeps.backends import TrainPoint
    from trainer.sweeps.points import Point

    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: calling it would fail the test
    TrainPoint("awd_ptb", Point("p", {}, [], tmp_path / "p"), str(tmp_path), max_requeue=3)._requeue("SIGUSR2")
    assert "stopped by SIGUSR2 and not requeued: it was requeued 3 time(s), slurm.max_requeue is 3" in capsys.readouterr().out

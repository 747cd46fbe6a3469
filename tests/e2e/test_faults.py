"""Faults during a 2-rank run: preemption signals, a rank killed with SIGKILL, a non-finite loss on one rank."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from harness.faults import Job
from harness.jobs import StreamedJob
from harness.launching import check, error_lines, free_port, launch, output
from harness.metrics import read_metrics, wait_for_step
from harness.paths import BIN, REPO as ROOT
from harness.shapes import TINY, TINY_VIT
from trainer.checkpoint import read_callback_states
from trainer.launch_env import launcher_env
from trainer.errors import ConfigError
from trainer.faults import EXIT_LOST_RANK
from trainer.faults.inject import ENV, FaultPlan

FAMILIES = {"awd_ptb": TINY, "vit_t_early_dropout": TINY_VIT}


def latest(run_dir):
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def faults_env(spec):
    return {"TRAINER_FAULTS": spec}


# ---------------------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("recipe, sig", [("awd_ptb", signal.SIGTERM), ("vit_t_early_dropout", signal.SIGUSR1)])
def test_preemption_signal_checkpoints_every_rank_and_resume_continues(tmp_path, shared_data, recipe, sig):
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    job = Job.start(["--recipe", recipe, "--run-dir", str(run_dir), "--set", *FAMILIES[recipe],
                     "train.max_steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000"],
                    log_path, port=free_port())
    wait_for_step(run_dir, 3, lambda: not job.gone())
    os.killpg(job.proc.pid, sig)
    job.wait_gone(timeout=120)
    out = log_path.read_text()
    tag = latest(run_dir)
    step = int(tag.split("_")[1])
    assert f"preempted ({sig.name}) at step {step}: checkpoint {tag} written" in out, out[-3000:]
    assert "Traceback" not in out
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("rank_*.pt")) == ["rank_00000.pt",
                                                                                          "rank_00001.pt"]
    assert [r["step"] for r in read_metrics(run_dir, "train")][-1] == step  # every finished step logged, none after

    resumed = check(launch("train.py", ["--run-dir", str(run_dir), "--resume", "--set",
                                        f"train.max_steps={step + 2}", "train.eval_every=0"], ranks=2))
    assert f"resumed from {tag} at step {step}" in resumed
    assert [r["step"] for r in read_metrics(run_dir, "train")][-3:] == [step, step + 1, step + 2]


def test_preempted_single_process_exits_zero(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", "awd_ptb", "--run-dir",
                             str(run_dir), "--set", *TINY, "train.max_steps=100000",
                             "train.checkpoint_every=100000", "train.eval_every=100000"],
                            cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 2, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"checkpoint {latest(run_dir)} written" in out


# ---------------------------------------------------------------------------------------------- a lost rank
def streamed(tmp_path, run_dir, sets, fault):
    """A 2-rank awd_ptb job with ``fault`` injected, its output timestamped line by line."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY, *sets]
    return StreamedJob(cmd, tmp_path / "job.log", ROOT, launcher_env(faults_env(fault)))


def gone_at(job, local_rank: int, timeout: float = 240) -> float:
    """When the job's rank ``local_rank`` process died (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    proc = None
    while time.monotonic() < deadline and job.proc.poll() is None:
        if proc is None:
            found = [p for p in psutil.Process(job.proc.pid).children(recursive=True)
                     if f"--local_rank={local_rank}" in p.cmdline()]
            proc = found[0] if found else None
        elif not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"rank {local_rank} did not die:\n{job.output[-3000:]}")


def test_killed_rank_ends_the_job_naming_it_and_resume_continues(tmp_path, shared_data):
    """Rank 1 SIGKILLs itself at step 7. Rank 0's watchdog sees the dead process on its node within a check
    interval (1 s at the 10 s timeout set here), names it and exits with EXIT_LOST_RANK. The deepspeed launcher
    polls its ranks each second (in a set's order), SIGTERMs the rest at the first nonzero exit it meets and passes
    that status on: rank 1's -9, 247 to the shell, or, when both were gone by its poll and it met rank 0 first, 3.
    Its log line cannot tell which: it prints the command of the last rank it spawned, whichever failed. On one
    host the heartbeat timeout plays no part (a 60 s default ends as fast)."""
    run_dir = tmp_path / "run"
    job = streamed(tmp_path, run_dir, ["train.max_steps=12", "train.checkpoint_every=2", "train.eval_every=100000",
                                       "train.lost_rank_timeout_s=10"], "sigkill@7:1")
    killed = gone_at(job, local_rank=1)
    code = job.wait(timeout=240)
    ended = time.monotonic()
    out = job.output
    passed_on = re.search(r"\] exits with return code = (-?\d+)", out)
    assert passed_on, out[-3000:]
    assert int(passed_on[1]) in (-signal.SIGKILL, EXIT_LOST_RANK), passed_on[0]
    assert code == int(passed_on[1]) & 0xFF  # 247 or 3
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: [rank 0] lost rank 1 (process ") and \
        f"--resume --run-dir {run_dir}" in errors[0], out[-3000:]
    assert "Traceback" not in out
    assert latest(run_dir) == "step_00000006"
    said = job.first("lost rank 1")
    assert said - killed < 5, f"rank 1 was named {said - killed:.1f} s after it died"  # not the 10 s heartbeat
    assert ended - killed < 20, f"the job took {ended - killed:.1f} s to end after the kill"

    resumed = check(launch("train.py", ["--run-dir", str(run_dir), "--resume"], ranks=2))
    assert "resumed from step_00000006 at step 6" in resumed
    assert [r["step"] for r in read_metrics(run_dir, "train")][-6:] == [7, 8, 9, 10, 11, 12]


# ---------------------------------------------------------------------------------------------- a rank's own error
@pytest.mark.parametrize("fault, failing", [("error@4:1", 1), ("error@4:0", 0), ("error@0:1", 1)])
def test_an_error_on_one_rank_ends_the_other_within_seconds(tmp_path, shared_data, fault, failing):
    """An ordinary exception (not a kill) on one rank, in training or at start-up: its line names it, and the
    other rank ends within seconds, not at the 10-minute collective timeout, with a line naming the failed rank
    and its error (also when the launcher's SIGTERM, sent once it saw the failed rank exit, reaches it first).
    When rank 0 fails, it stays until rank 1 has read why from the store rank 0 hosts."""
    run_dir = tmp_path / "run"
    job = streamed(tmp_path, run_dir, ["train.max_steps=100000", "train.eval_every=100000"], fault)
    assert job.wait(timeout=300) == 1
    out = job.output
    where = "during start-up" if fault.startswith("error@0") else "at step 4"
    failed = job.first(f"error: [rank {failing}] unexpected InjectedFault: fault injected on rank {failing} {where}")
    assert failed is not None and "Traceback" not in out, out[-3000:]
    assert time.monotonic() - failed < 15, f"the job took {time.monotonic() - failed:.1f} s to end after the error"
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    other = 1 - failing
    assert len(errors) == 2 and errors[1].startswith(
        f"error: [rank {other}] rank {failing} failed (unexpected InjectedFault: fault injected on rank {failing}"), out


# ---------------------------------------------------------------------------------------------- non-finite loss
def test_nan_on_one_rank_stops_every_rank_keeping_the_last_good_checkpoint(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY,
                               "train.max_steps=10", "train.checkpoint_every=2", "train.eval_every=100000"],
                  ranks=2, env=faults_env("nan_loss@5:1"))
    assert proc.returncode == 2, output(proc)[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "nan or inf at step 5 (rank 1)" in errors[0] and "step_00000004" in errors[0]
    assert "Traceback" not in output(proc)
    assert latest(run_dir) == "step_00000004"
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3, 4]  # nothing non-finite was logged


def _module_state(run_dir, tag):
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


def _zero_partition(run_dir, tag, rank):
    path = run_dir / "checkpoints" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def test_skipped_nonfinite_steps_leave_weights_and_optimizer_state_untouched(tmp_path, shared_data):
    """ZeRO 2 with NT-ASGD averaging on: a skipped step changes neither the weights nor the optimizer's
    partitions, training goes on after it, and too many skips in a row stop the run."""
    run_dir = tmp_path / "run"
    proc = launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY,
                               "train.max_steps=12", "train.checkpoint_every=1", "train.keep_last=20",
                               "train.eval_every=100000", "train.zero_stage=2", "train.on_nonfinite=skip",
                               "train.max_consecutive_skips=2", "optim.t0=1"],
                  ranks=2, env=faults_env("nan_loss@3:1,inf_loss@4:0,nan_loss@7:0,nan_loss@8:1,nan_loss@9:1"))
    out = output(proc)
    assert "step 3: loss is nan or inf (rank 1): update skipped" in out
    assert "step 4: loss is nan or inf (rank 0): update skipped, 2 skipped so far" in out
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
    assert "3 steps in a row up to step 9" in errors[0]
    records = {r["step"]: r for r in read_metrics(run_dir, "train")}
    assert "loss" not in records[3] and "loss" not in records[4] and records[4]["skipped_steps"] == 2
    assert all(torch.isfinite(torch.tensor(records[s]["loss"])) for s in (1, 2, 5, 6))

    tags = {s: f"step_{s:08d}" for s in range(2, 7)}
    for a, b in ((2, 3), (3, 4)):
        for name, t in _module_state(run_dir, tags[a]).items():
            assert torch.equal(t, _module_state(run_dir, tags[b])[name]), name
        for rank in (0, 1):
            before, after = _zero_partition(run_dir, tags[a], rank), _zero_partition(run_dir, tags[b], rank)
            for x, y in zip(before["single_partition_of_fp32_groups"], after["single_partition_of_fp32_groups"]):
                assert torch.equal(x, y)
    changed = _module_state(run_dir, tags[5])
    assert any(not torch.equal(t, changed[n]) for n, t in _module_state(run_dir, tags[4]).items())
    average = {s: read_callback_states(run_dir / "checkpoints", tags[s])["nt_asgd"] for s in tags}  # on since step 1
    assert [average[s]["count"] for s in tags] == [2, 2, 2, 3, 4]
    assert torch.equal(average[2]["average"], average[3]["average"])
    assert torch.equal(average[3]["average"], average[4]["average"])
    assert not torch.equal(average[4]["average"], average[5]["average"])
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"  # nothing saved by the stop


def _adam_state(run_dir, tag):
    """AdamW's per-parameter state as ZeRO 0 saves it: step counts, exp_avg, exp_avg_sq."""
    path = run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer"]["state"]
    return {k: [torch.as_tensor(state[i][k]) for i in sorted(state)] for k in ("step", "exp_avg", "exp_avg_sq")}


def test_a_skipped_step_leaves_adamw_moments_untouched(tmp_path):
    """ImageNet's AdamW under ZeRO 0, the recipe's default and the path where the engine's veto is all that stops
    the update (under ZeRO 2 DeepSpeed also drops a step whose gradient norm is not finite), a NaN on rank 1 at
    step 3: the moments and step counts after the skipped step are those before it; a normal step moves them."""
    run_dir = tmp_path / "run"
    proc = launch("train.py", ["--recipe", "vit_t_early_dropout", "--run-dir", str(run_dir), "--set", *TINY_VIT,
                               "data.train_size=1000", "train.max_steps=4", "train.checkpoint_every=1",
                               "train.keep_last=20",
                               "train.eval_every=100000", "train.on_nonfinite=skip"],
                  ranks=2, env=faults_env("nan_loss@3:1"))
    out = check(proc)
    assert "step 3: loss is nan or inf (rank 1): update skipped" in out
    before, skipped, after = (_adam_state(run_dir, f"step_{s:08d}") for s in (2, 3, 4))
    assert len(before["step"]) > 10 and all(float(n) == 2 for n in before["step"])
    for key in before:
        assert all(torch.equal(x, y) for x, y in zip(before[key], skipped[key])), key
    assert all(float(n) == 3 for n in after["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert not any(torch.equal(x, y) for x, y in zip(skipped[key], after[key])), key
    weights = [_module_state(run_dir, f"step_{s:08d}") for s in (2, 3)]
    assert all(torch.equal(t, weights[1][n]) for n, t in weights[0].items())


def test_fault_plan_fires_once_on_its_rank_and_step(monkeypatch):
    monkeypatch.setenv(ENV, "nan_loss@5:1, inf_loss@6:1,sigterm@2:0")
    plan = FaultPlan.from_env(rank=1)
    one = torch.tensor(1.0)
    assert plan.corrupt_loss(one, 4) is one
    assert torch.isnan(plan.corrupt_loss(one, 5)) and plan.corrupt_loss(one, 5) is one  # once only
    assert torch.isinf(plan.corrupt_loss(one, 6))
    assert not FaultPlan.from_env(rank=2)
    assert FaultPlan.from_env(rank=0).faults[0].kind == "sigterm"
    monkeypatch.setenv(ENV, "error@0:1,sigusr2@3:1")
    plan = FaultPlan.from_env(rank=1)
    plan.raise_error(1)  # not due
    with pytest.raises(RuntimeError, match="fault injected on rank 1 during start-up"):
        plan.raise_error(0)
    plan.raise_error(0)  # once only
    for bad in ("nan@x", "nan_loss@5", "explode@1:0"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ConfigError, match=ENV):
            FaultPlan.from_env(rank=0)

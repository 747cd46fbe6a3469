"""``deepspeed --hostfile`` over ssh and pdsh across two hosts (network namespaces with sshd, see hosts.py): the
unmodified user command trains, checkpoints, survives a lost host and resumes; a misconfigured cluster (loopback
addresses, a run directory that is not shared) stops at start with one line."""

from __future__ import annotations

import json
import re
import signal
import sys
import time

import psutil
import yaml

from harness.images import make_image_folder
from harness.metrics import read_metrics
from trainer.checkpoint import MANIFEST, step_tags, verify

from .conftest import SHIPPED, TINY_AWD, TINY_VIT, hostfile_train, on_node1

LOST_RANK_TIMEOUT = 10  # the test's train.lost_rank_timeout_s; the default (60) could not meet the bound below


def rank_process(host) -> psutil.Process:
    """The training rank on ``host``: the launcher's child running train.py."""
    for p in host.processes():
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if any(c.endswith("launch/train.py") for c in cmd) and "deepspeed.launcher.launch" not in " ".join(cmd):
            return p
    raise AssertionError(f"no training rank on {host.name}")


def launcher_status(out: str, node: str) -> int | None:
    """The exit status the deepspeed launcher on ``node`` reported for its rank."""
    m = re.search(rf"^{node}: .*exits with return code = (-?\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def test_two_hosts_train_checkpoint_and_log_once(hosts, hostfile, home, tmp_path, shared_data):
    run = tmp_path / "run"
    job = on_node1(hosts, hostfile_train(hostfile, [
        "--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD, "train.zero_stage=1",
        "train.max_steps=40", "train.checkpoint_every=20", "train.eval_every=20"]), tmp_path / "job.log", home)
    assert job.wait(timeout=300) == 0, job.output[-4000:]
    out = job.output
    assert "on 2 rank(s)" in out and "Traceback" not in out
    assert "node2: " in out  # the second rank ran on node2, reached through pdsh

    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 41))  # each step logged once: rank 0 alone writes
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)

    ckpt = run / "checkpoints"
    assert step_tags(ckpt) == ["step_00000020", "step_00000040"]
    assert (ckpt / "latest").read_text() == "step_00000040"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["best", "step_00000020", "step_00000040"]
    for tag in ("step_00000020", "step_00000040", "best"):
        assert verify(ckpt, tag) is None, tag
        manifest = json.loads((ckpt / tag / MANIFEST).read_text())
        writers = {name: entry["rank"] for name, entry in manifest.items()}
        # each rank hashed the files it wrote itself: node2's are listed even if node1 could not see them yet
        assert writers["rank_00000.pt"] == 0 and writers["rank_00001.pt"] == 1, writers
        assert writers["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1, writers
        assert writers["mp_rank_00_model_states.pt"] == 0, writers
    import torch

    digests = {torch.load(ckpt / "step_00000040" / f"rank_{r:05d}.pt", weights_only=False)["param_digest"]
               for r in (0, 1)}
    assert len(digests) == 1  # both ranks end with the same parameters

    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and ".node1." in events[0].name, events  # rank 0's, on node1


def test_lost_host_ends_the_other_within_the_timeout_and_resume_finishes(hosts, hostfile, home, tmp_path,
                                                                          shared_data):
    run = tmp_path / "run"
    job = on_node1(hosts, hostfile_train(hostfile, [
        "--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD, "train.max_steps=100000",
        "train.checkpoint_every=2", "train.eval_every=100000", f"train.lost_rank_timeout_s={LOST_RANK_TIMEOUT}"]),
        tmp_path / "job.log", home)
    deadline = time.monotonic() + 300
    while not [r for r in read_metrics(run, "train") if r["step"] >= 6]:
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.2)
    survivor = rank_process(hosts["node1"])
    rank_process(hosts["node2"]).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    psutil.wait_procs([survivor], timeout=LOST_RANK_TIMEOUT + 60)
    ended = time.monotonic() - killed
    job.wait(timeout=60)
    out = job.output
    lost = [line for line in out.splitlines() if line.startswith("node1: error: ") and "lost rank 1" in line]
    assert lost and "--resume" in lost[0], out[-4000:]
    assert launcher_status(out, "node1") == 3, out[-4000:]
    assert ended < LOST_RANK_TIMEOUT + 15, f"node1's rank took {ended:.1f} s to end"
    assert "Traceback" not in out
    print(f"node1's rank ended {ended:.1f} s after node2's was killed")

    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    again = on_node1(hosts, hostfile_train(hostfile, ["--run-dir", str(run), "--resume", "--set",
                                                      f"train.max_steps={step + 4}"]), tmp_path / "resume.log", home)
    assert again.wait(timeout=300) == 0, again.output[-4000:]
    assert f"resumed from {tag} at step {step}" in again.output
    assert [r["step"] for r in read_metrics(run, "train")][-4:] == [step + 1, step + 2, step + 3, step + 4]


def test_an_error_on_one_host_ends_the_other_within_seconds(hosts, hostfile, home, tmp_path, shared_data):
    (home / ".deepspeed_env").write_text("TRAINER_FAULTS=error@5:1\n")  # how a variable reaches every host
    run = tmp_path / "run"
    job = on_node1(hosts, hostfile_train(hostfile, [
        "--recipe", "awd_ptb", "--run-dir", str(run), "--set", *TINY_AWD, "train.max_steps=100000",
        "train.eval_every=100000"]), tmp_path / "job.log", home)
    assert job.wait(timeout=300) != 0
    out = job.output
    failed = job.first("fault injected on rank 1 at step 5")
    ended = job.first("node1: error: [rank 0] rank 1 failed (unexpected InjectedFault: fault injected on rank 1")
    assert failed is not None and ended is not None, out[-4000:]
    assert ended - failed < 10, f"node1's rank took {ended - failed:.1f} s to end"
    assert launcher_status(out, "node1") == 1 and "Traceback" not in out, out[-4000:]
    assert len([line for line in out.splitlines() if "error: " in line]) == 2  # one line per host


def test_run_directory_not_shared_with_every_host_is_refused_before_training(hosts, hostfile, home, tmp_path,
                                                                            shared_data):
    runs = tmp_path / "runs"
    runs.mkdir()
    hosts["node2"].run(["mount", "-t", "tmpfs", "tmpfs", str(runs)])  # node2 sees its own, empty, runs/
    try:
        job = on_node1(hosts, hostfile_train(hostfile, ["--recipe", "awd_ptb", "--run-dir", str(runs / "run"),
                                                        "--set", *TINY_AWD, "train.max_steps=5"]),
                       tmp_path / "job.log", home)
        assert job.wait(timeout=300) != 0
    finally:
        hosts["node2"].run(["umount", str(runs)])
    out = job.output
    errors = [line for line in out.splitlines() if "error: " in line]
    assert len(errors) == 1 and f"the run directory {runs / 'run'} is not shared: rank 1 on node2" in errors[0], out
    assert "step 1 " not in out and "Traceback" not in out
    assert not (runs / "run").exists()  # nothing written, not even the directory


def test_loopback_addresses_stop_at_once_and_the_interface_setting_fixes_it(hosts, hostfile, home, tmp_path,
                                                                           shared_data):
    """As on a Debian host whose /etc/hosts maps its own name to 127.0.1.1: gloo would advertise that address."""
    for host in hosts:
        host.write_hosts({h.name: "127.0.1.1" if h is host else h.addr for h in hosts})
    try:
        job = on_node1(hosts, hostfile_train(hostfile, ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "a"),
                                                        "--set", *TINY_AWD, "train.max_steps=3"]),
                       tmp_path / "a.log", home)
        assert job.wait(timeout=120) != 0
        out = job.output
        errors = [line for line in out.splitlines() if "error: " in line]
        assert len(errors) == 1, out[-4000:]
        assert "would advertise 127.0.1.1" in errors[0] and "GLOO_SOCKET_IFNAME" in errors[0]
        assert ".deepspeed_env" in errors[0] and "Traceback" not in out and "connectFullMesh" not in out

        (home / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth1\n")
        fixed = on_node1(hosts, hostfile_train(hostfile, ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "b"),
                                                          "--set", *TINY_AWD, "train.max_steps=3"]),
                         tmp_path / "b.log", home)
        assert fixed.wait(timeout=300) == 0, fixed.output[-4000:]
        assert [r["step"] for r in read_metrics(tmp_path / "b", "train")] == [1, 2, 3]
    finally:
        for host in hosts:
            host.write_hosts({h.name: h.addr for h in hosts})


def test_hostfile_sweep_runs_its_points_across_both_hosts(hosts, hostfile, home, tmp_path):
    """A small copy of the shipped ViT-T sweep over this hostfile: each point is one 2-host deepspeed job."""
    images = make_image_folder(tmp_path / "imagenet")
    spec = yaml.safe_load(SHIPPED.read_text())
    spec.update(sweep_dir=str(tmp_path / "sweep"), hostfile=str(hostfile),
                grid={"drop.mode": ["standard", "early"], "drop.dropout": [0.1]})
    spec["base"].update({"data.root": str(images), **TINY_VIT})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    job = on_node1(hosts, [sys.executable, "launch/sweep.py", str(path), "--backend", "hostfile"],
                   tmp_path / "sweep.log", home)
    assert job.wait(timeout=600) == 0, job.output[-4000:]
    out = job.output
    assert out.count("on 2 rank(s)") == 2 and out.count("node2: ") > 2, out[-4000:]
    assert "summary: 2 finished, 0 partial, 0 missing" in out
    summary = on_node1(hosts, [sys.executable, "launch/sweep.py", str(path), "--summarize", "--status"],
                       tmp_path / "summary.log", home)
    assert summary.wait(timeout=120) == 0
    assert "summary: 2 finished" in summary.output and summary.output.count(" done ") == 2, summary.output
    for name in ("mode-standard_dropout-0.1", "mode-early_dropout-0.1"):
        assert [r["step"] for r in read_metrics(tmp_path / "sweep" / name, "train")] == list(range(1, 7))

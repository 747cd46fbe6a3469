"""A run directory's safety (issue 22), end to end: bench/bad_inputs.py's run-directory cases (one job per directory,
a resume checked before it writes, nothing diverged saved as best, values a library would refuse refused first, the
filesystem's refusals in plain words), and the run-directory lock itself: it names its holder, a killed holder does
not leave it stuck, a refused job leaves the directory as it found it, an allowed resume rewrites config.yaml."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from harness.bad_inputs import RUN_CASES, check_case, train_shared
from harness.launching import check, launch, launch_command, launcher_env
from harness.paths import REPO as ROOT
from harness.shapes import SMALL_AWD
from trainer.errors import ConfigError
from trainer.run_lock import LOCK_FILE, RunLock

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (read-only, or full) as a real filesystem")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return train_shared(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_root) if "mnt" in "".join(c.expect) else c
                                  for c in RUN_CASES], ids=[c.name for c in RUN_CASES])
def test_run_directory_case(case, tmp_path, request):
    check_case(case, tmp_path, request.getfixturevalue("shared") if case.needs_shared else None)


def test_the_lock_names_its_holder_and_a_refused_job_leaves_no_trace(tmp_path):
    run = tmp_path / "run"
    first = RunLock.acquire(run)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=rf"is in use by another job: .* \(pid {os.getpid()} on "):
        RunLock.acquire(run)  # another open file description: refused even within one process
    first.release()
    holder = (run / LOCK_FILE).read_bytes()
    second = RunLock.acquire(run)  # free once released
    second.abandon()  # refused later (a resume that could not load): the earlier record is back
    assert (run / LOCK_FILE).read_bytes() == holder
    fresh = RunLock.acquire(tmp_path / "new" / "run")
    fresh.abandon()  # and what it created is gone
    assert not (tmp_path / "new" / "run").exists()


def test_a_killed_job_does_not_leave_the_run_directory_locked(ptb_slice, tmp_path):
    """SIGKILL mid-run: the kernel drops the lock with the process, and --resume takes the directory over."""
    run = tmp_path / "run"
    sets = [*SMALL_AWD, f"data.root={ptb_slice.parent}", "data.verify=false", "data.download=false",
            "train.checkpoint_every=2", "train.max_steps=100000", "train.epochs=100"]
    job = subprocess.Popen(launch_command("train.py", ["--recipe", "awd_ptb", "--run-dir", str(run), "--set", *sets]),
                           cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "latest").is_file():
        assert job.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint"
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == job.pid  # the dead holder's record is still there
    out = check(launch("train.py", ["--run-dir", str(run), "--resume", "--set", "train.max_steps=3"]))
    assert "resumed from step_" in out
    assert json.loads((run / LOCK_FILE).read_text())["pid"] != job.pid


def test_an_allowed_resume_rewrites_config_yaml_once_resumed(tmp_path, shared):
    run = tmp_path / "run"
    shutil.copytree(shared.awd_run, run)
    check(launch("train.py", ["--run-dir", str(run), "--resume", "--set", "train.max_steps=3", "train.log_every=1"]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["log_every"] == 1

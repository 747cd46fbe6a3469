"""Start-up is not a lost rank: a 2-rank job whose DeepSpeed op is built while it starts trains, each environment
builds its ops in a folder of its own, a rank that never finishes starting is named against the start-up bound, and
once a rank has ended the job every rank is gone within the bound README.md states."""

import os
import sys
import time
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as dist

from harness.jobs import StreamedJob
from harness.launching import free_port, launcher_env
from harness.paths import BIN, REPO as ROOT
from harness.shapes import TINY
from trainer.distributed import DistContext
from trainer.errors import ConfigError
from trainer.faults import EXIT_LOST_RANK, watchdog
from trainer.faults.inject import ENV, FaultPlan
from trainer.faults.watchdog import PeerWatchdog
from trainer.launch_env import extensions_dir
from trainer.startup import startup_timeout


def two_ranks(tmp_path, sets, env):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set", *TINY, "train.eval_every=100000",
           *sets]
    return StreamedJob(cmd, tmp_path / "job.log", ROOT, launcher_env(env))


def rank_processes(job) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(job.proc.pid).children(recursive=True):
        try:
            if any(a.startswith("--local_rank=") for a in p.cmdline()):
                found.append(p)
        except psutil.Error:  # a short-lived process, gone already
            pass
    return found


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_extensions_folder_is_per_environment(monkeypatch):
    one, other = extensions_dir("/srv/a/.venv"), extensions_dir("/srv/b/.venv")
    assert one != other and one.parent == other.parent == extensions_dir().parent
    assert one.parent.name == "torch_extensions" and one.name.startswith("venv-")
    assert extensions_dir("/srv/a/.venv") == one  # the same environment always gets the same folder
    assert os.environ.get("TORCH_EXTENSIONS_DIR")  # conftest set it (when the user had not): for mp.spawn ranks
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert launcher_env()["TORCH_EXTENSIONS_DIR"] == str(extensions_dir(sys.prefix))  # for launched ranks
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/chosen")
    assert launcher_env()["TORCH_EXTENSIONS_DIR"] == "/somewhere/chosen"  # the user's choice is kept


def test_two_ranks_train_while_deepspeed_builds_its_op(tmp_path, shared_data):
    """An empty extensions folder for this job only, so each rank builds or loads DeepSpeed's CPU op while it
    starts, with a compiler slowed to 2 s a call (a loaded machine: the rank that waits for the other's build also
    checks the compiler, twice) and a lost-rank timeout of 2 s, far shorter than the build. DeepSpeed's set-up of
    the op spins holding the GIL until both ranks get there, which froze the early rank's heartbeat and ended the
    job as a lost rank; now the ranks wait for each other first and the job trains to its end. The launched ranks
    built the op in the folder their launcher chose."""
    folder = tmp_path / "extensions"
    folder.mkdir()
    slow = tmp_path / "slow-c++"
    slow.write_text('#!/bin/sh\nsleep 2\nexec c++ "$@"\n')
    slow.chmod(0o755)
    job = two_ranks(tmp_path, ["train.max_steps=30", "train.lost_rank_timeout_s=2"],
                    {"TORCH_EXTENSIONS_DIR": str(folder), "CXX": str(slow)})
    code = job.wait(timeout=900)
    out = job.output
    assert code == 0 and "done: 30 steps" in out, out[-4000:]
    assert not [line for line in out.splitlines() if line.startswith("error: ")], out[-4000:]
    assert list(folder.glob("deepspeed_shm_comm/*.so")), sorted(p.name for p in folder.rglob("*"))


def test_a_rank_that_never_finishes_starting_is_named_and_every_rank_is_gone_within_the_bound(tmp_path,
                                                                                               shared_data):
    """Rank 1 freezes at start-up (every thread, holding the GIL in native code, the launcher's signals blocked:
    TRAINER_FAULTS stall_startup). Rank 0 waits for it, names it against the start-up bound (10 x the 1 s
    lost-rank timeout), not as a lost heartbeat, and ends the job; rank 1, which would heed neither the verdict nor
    the launcher's SIGTERM (the launcher's SIGKILL comes 30 s later), is killed by rank 0: every rank is gone
    within the bound README.md states (3 checks + grace + 2 s: 3.6 s here), not 30 s later."""
    job = two_ranks(tmp_path, ["train.max_steps=100000", "train.lost_rank_timeout_s=1"],
                    {"TRAINER_FAULTS": "stall_startup@0:1"})
    ranks = []
    while len(ranks) < 2 and job.proc.poll() is None:
        ranks = rank_processes(job)
        time.sleep(0.05)
    said = job.wait_for("lost rank 1", timeout=600)
    while any(running(p) for p in ranks):
        assert time.monotonic() - said < 30, "a rank still runs 30 s after the job ended"
        time.sleep(0.02)
    gone = time.monotonic() - said
    code = job.wait(timeout=60)
    out = job.output
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: [rank 0] lost rank 1 (did not finish starting within 10 s (10 times train.lost_rank_timeout_s) "
        "and sent no heartbeat in that time"), out[-3000:]
    assert "Traceback" not in out
    assert gone < 3.6 + 2, f"the last rank was gone {gone:.1f} s after the line"
    assert code in (EXIT_LOST_RANK, 256 - 9), out[-3000:]  # rank 0's status or its killed peer's, as the launcher polls


def test_silence_is_judged_against_the_start_up_bound_until_every_rank_started(monkeypatch):
    """Rank 0's judgement, on a store of its own (no thread runs it here): rank 1 silent is not lost before the
    start-up bound while ranks are starting, is lost after the lost-rank timeout once both have started, and time
    rank 0 itself was frozen (a long gap between its checks) is not counted as rank 1's silence."""
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # noqa: F841 - serves
                           timeout=timedelta(seconds=10))
    ctx = DistContext(rank=0, world=2, local_rank=0, device=torch.device("cpu"))
    dog = PeerWatchdog(ctx, 5.0, interval_s=1.0, startup_timeout_s=startup_timeout(5.0),
                       startup_name="10 times train.lost_rank_timeout_s")
    dog._stop.set()  # its threads end: the judgement is driven by hand, on a clock of the test's
    dog._thread.join(timeout=10)
    now = [time.monotonic()]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: now[0])

    def judge(after: float) -> str | None:
        for _ in range(int(after)):  # one check a second, as the thread makes them
            now[0] += 1
            verdict = dog._stale_heartbeat()
            if verdict:
                return verdict
        return None

    dog._judged = now[0]
    assert judge(1) is None  # rank 1's counter seen (0)
    assert judge(49) is None  # silent for 49 s while starting: the bound is 50 s
    assert judge(2) == ("rank 1 (did not finish starting within 50 s (10 times train.lost_rank_timeout_s) and sent "
                        "no heartbeat in that time: its node is gone, unreachable or stuck)")
    dog.mark_started()
    dog.store.set("started/1", "1")
    assert judge(5) is None  # every rank started: silence counts from here, against the 5 s timeout
    assert judge(2).startswith("rank 1 (no heartbeat for 6 s: its node is gone or unreachable)")
    dog.store.add("hb/1", 1)
    assert judge(1) is None
    now[0] += 30  # rank 0 itself frozen for 30 s (its threads did not run): not rank 1's silence
    assert judge(1) is None
    assert judge(4).startswith("rank 1 (no heartbeat for 6 s")


def test_stall_startup_is_a_start_up_fault(monkeypatch):
    monkeypatch.setenv(ENV, "stall_startup@0:1")
    assert [f.kind for f in FaultPlan.from_env(rank=1).faults] == ["stall_startup"]
    FaultPlan.from_env(rank=0).stall_startup()  # not this rank's: returns at once
    monkeypatch.setenv(ENV, "stall_startup@3:1")
    with pytest.raises(ConfigError, match="stall_startup happens at start-up, step 0"):
        FaultPlan.from_env(rank=1)

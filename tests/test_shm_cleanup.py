"""DeepSpeed's CPU shared-memory all-reduce must not leave its 66 MB buffers in /dev/shm after a run."""

import time
from pathlib import Path

from conftest import SMALL_AWD, check, launch


def test_two_rank_run_leaves_no_shared_memory_buffers(tmp_path):
    started = time.time() - 1
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set", *SMALL_AWD,
                              "model.emsize=32", "model.nhid=48", "train.max_steps=4", "train.log_every=2"],
                 ranks=2))
    left = [p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if p.stat().st_mtime >= started]
    assert left == []

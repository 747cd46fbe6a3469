"""DeepSpeed's CPU shared-memory all-reduce must not leave its 66 MB buffers in /dev/shm after a run."""

import subprocess
import time
from pathlib import Path

from harness.launching import free_port, launch_command, launcher_env
from harness.paths import REPO as ROOT
from harness.shapes import SMALL_AWD



def test_two_rank_run_leaves_no_shared_memory_buffers(tmp_path):
    port = free_port()
    # the buffers are named deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
    pattern = f"deepspeed_allreduce_buffer_*_{port}_*"
    cmd = launch_command("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set", *SMALL_AWD,
                                      "model.emsize=32", "model.nhid=48", "train.max_steps=20", "train.log_every=2"],
                         ranks=2, port=port)
    log = tmp_path / "out.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(None), stdout=sink, stderr=subprocess.STDOUT)
    seen = set()
    while proc.poll() is None:  # while it trains, the buffers are there: the check below is not vacuous
        seen.update(p.name for p in Path("/dev/shm").glob(pattern))
        time.sleep(0.05)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert len(seen) >= 2, f"never saw the ranks' {pattern} buffers during the run: {sorted(seen)}"
    assert list(Path("/dev/shm").glob(pattern)) == []

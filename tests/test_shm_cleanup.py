"""DeepSpeed's CPU shared-memory all-reduce must not leave its 66 MB buffers in /dev/shm after a run."""

from pathlib import Path

from conftest import SMALL_AWD, check, free_port, launch


def test_two_rank_run_leaves_no_shared_memory_buffers(tmp_path):
    port = free_port()
    check(launch("train.py", ["--recipe", "awd_ptb", "--run-dir", str(tmp_path / "run"), "--set", *SMALL_AWD,
                              "model.emsize=32", "model.nhid=48", "train.max_steps=4", "train.log_every=2"],
                 ranks=2, port=port))
    # the buffers are named deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []

"""Two nodes on one machine, launched by hand (``deepspeed --hostfile H --no_ssh --node_rank K``), each a test
host in network namespaces of its own (see ``bench/two_nodes.py``). The nodes train together, the loss of one
(its launcher and rank killed with SIGKILL) ends the other within the watchdog's bound, naming the lost rank,
and ``--resume`` on two nodes continues the run."""

import time

from bench.common import read_metrics
from bench.two_nodes import TwoNodes
from conftest import SMALL_AWD

TINY = [*SMALL_AWD, "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1", "train.epochs=1",
        "train.lost_rank_timeout_s=10"]


def test_two_nodes_train_together_survive_losing_one_and_resume(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    nodes = TwoNodes(tmp_path / "first", ["--recipe", "awd_ptb", "--run-dir", str(run_dir), "--set", *TINY,
                                          "train.max_steps=100000", "train.checkpoint_every=2",
                                          "train.eval_every=100000"])
    try:
        assert nodes.mode == "netns" and nodes.addr == "10.91.0.1"  # a real link between two hosts
        deadline = time.monotonic() + 300
        while not [r for r in read_metrics(run_dir, "train") if r["step"] >= 5]:
            assert time.monotonic() < deadline and nodes.proc.poll() is None, nodes.log(0)[-3000:] + nodes.log(1)[-3000:]
            time.sleep(0.2)
        assert "on 2 rank(s)" in nodes.log(0)
        nodes.kill_node1()
        killed = time.monotonic()
        code = nodes.wait(timeout=180)
        ended = time.monotonic() - killed
    finally:
        nodes.close()
    out = nodes.log(0)
    assert code == 3
    lost = [line for line in out.splitlines() if line.startswith("error: ") and "lost rank 1" in line]
    assert lost and "--resume" in lost[0], out[-3000:]
    assert "Traceback" not in out
    assert ended < 10 + 15, f"node 0 took {ended:.0f} s to end"  # train.lost_rank_timeout_s is 10 s here
    print(f"node 0 ended {ended:.1f} s after node 1 was killed ({nodes.addr})")
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert step >= 4

    again = TwoNodes(tmp_path / "second", ["--run-dir", str(run_dir), "--resume", "--set",
                                           f"train.max_steps={step + 3}"])
    try:
        assert again.wait(timeout=300) == 0, again.log(0)[-3000:] + again.log(1)[-3000:]
    finally:
        again.close()
    assert f"resumed from {tag} at step {step}" in again.log(0)
    assert [r["step"] for r in read_metrics(run_dir, "train")][-3:] == [step + 1, step + 2, step + 3]


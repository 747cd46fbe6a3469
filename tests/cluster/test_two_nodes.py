"""Two nodes on one machine, launched by hand (``deepspeed --hostfile H --no_ssh --node_rank K``), each a test
host in network namespaces of its own (see ``bench/two_nodes.py``). The nodes train together, the loss of one
(its launcher and rank killed with SIGKILL) ends the other within the watchdog's bound, naming the lost rank,
and ``--resume`` on two nodes continues the run. The hosts are isolated as claimed, and their teardown stops
what the harness started, however it was left behind, and nothing else."""

import os
import subprocess
import time
from pathlib import Path

import psutil

from harness.hosts import Hosts
from harness.metrics import read_metrics
from harness.shapes import SMALL_AWD
from harness.two_nodes import TwoNodes


TINY = [*SMALL_AWD, "model.emsize=32", "model.nhid=48", "data.bptt=20", "train.log_every=1", "train.epochs=1",
        "train.lost_rank_timeout_s=10"]


def assert_isolated(hosts: Hosts) -> None:
    """What mode "netns" stands for, fact by fact: every process the harness started on a host is in that host's
    network namespace, not the test's and not another host's, and each host name resolves, on every host, to an
    address configured in that name's namespace and not in the test's."""
    layout = hosts.layout()
    own = os.readlink("/proc/self/ns/net")
    assert layout.own_netns == own
    for name, spaces in layout.netns.items():
        assert spaces == {hosts[name].netns} != {own}, (name, spaces, own)
    assert len({h.netns for h in hosts}) == len(hosts.hosts), layout.netns
    for on, names in layout.resolved.items():
        for name, addr in names.items():
            assert addr == hosts[name].addr and addr in layout.addrs[name], (on, name, addr)
            assert addr not in layout.own_addrs, (on, name, addr)
    assert layout.mode == hosts.mode == "netns"


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
        assert_isolated(nodes.hosts)  # the launchers and ranks included
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


def wait_for(ok, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_teardown_stops_what_the_harness_started_and_nothing_else(tmp_path):
    """Left behind on node1: a background job of an ssh session that has ended, and a process whose parent (a
    command the harness started) has exited. Both were adopted by what the harness started, and down() stops them;
    a process the test put in node1's namespace itself is not the harness's, and survives."""
    hosts = Hosts(tmp_path / "hosts", ["node0", "node1"]).up()
    node1, pids = hosts["node1"], tmp_path / "pids"
    stranger = subprocess.Popen(["nsenter", "-t", str(node1.pid), "-n", "sleep", "600"])
    left: list[psutil.Process] = []
    try:
        hosts["node0"].run(["ssh", "node1", f"sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {pids}.ssh"])
        command = node1.popen(["sh", "-c", f"(sleep 600 & echo $! > {pids}.orphan); exec sleep 600"])
        orphan_file = Path(f"{pids}.orphan")
        wait_for(lambda: orphan_file.is_file() and orphan_file.read_text().endswith("\n")
                 and os.readlink(f"/proc/{stranger.pid}/ns/net") == node1.netns,
                 "the orphan's pid and the stranger in node1's namespace")
        assert_isolated(hosts)
        left = [psutil.Process(int(Path(f"{pids}.{k}").read_text())) for k in ("ssh", "orphan")]
        session, orphan = left
        sshd = node1.started[0]
        assert (session.ppid(), orphan.ppid()) == (sshd.pid, command.pid)  # adopted, not re-parented to init
        started = hosts.processes()
        assert {session.pid, orphan.pid, sshd.pid, command.pid, node1.pid} <= {p.pid for p in started}
        assert stranger.pid not in {p.pid for p in started}
        hosts.down()
        assert stranger.poll() is None  # in node1's namespace, not started by the harness: left alone
        assert [p for p in started if p.is_running()] == []  # is_running: the same process, not a reused pid
    finally:
        hosts.down()
        for p in left:  # what a failed check left running
            if p.is_running():
                p.kill()
        stranger.kill()
        stranger.wait()

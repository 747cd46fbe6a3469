"""Two DeepSpeed "nodes" on one machine, launched by hand as on a cluster without ssh: ``deepspeed --hostfile H
--no_ssh --node_rank K`` on each. The nodes are test hosts (``harness/hosts.py``: network namespaces of their
own, each with its address and hostname, joined by a bridge), so the ranks talk over a real link. Needs root.
Used by ``tests/cluster/test_two_nodes.py`` and ``bench/faults.py``; ``close()`` stops what it started on the two hosts (with
their descendants) and nothing else. ``mode`` is measured once the launchers run: "netns" if every process started
is in its host's own network namespace and each host's name resolves to an address of that host's alone
(``Layout.mode``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil

from trainer.launch_env import launcher_env

from .hosts import Hosts
from .paths import BIN, REPO


class TwoNodes:
    def __init__(self, work: Path, train_args: list[str], port: int = 29500):
        self.dir = work
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = Hosts(self.dir / "hosts", ["node0", "node1"]).up()
        self.addr = self.hosts["node0"].addr
        hostfile = self.dir / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        self.procs = []
        for rank, host in enumerate(self.hosts):
            cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", "node0", "--master_port", str(port), str(REPO / "launch" / "train.py"),
                   *train_args]
            with (self.dir / f"node{rank}.log").open("w") as log:
                self.procs.append(host.popen(cmd, cwd=REPO, env=launcher_env(), stdout=log,
                                             stderr=subprocess.STDOUT))
        self.proc = self.procs[0]  # node 0's launcher: its exit status is the job's
        self.mode = self.hosts.mode

    def log(self, node: int) -> str:
        path = self.dir / f"node{node}.log"
        return path.read_text() if path.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            for p in self.procs:
                p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the two nodes were still running after {timeout} s:\n{self.log(0)[-3000:]}")
        return self.proc.returncode

    def kill_node1(self) -> None:
        """Node 1 goes away: its launcher and rank die of SIGKILL (its link stays up, as a crashed node's)."""
        launcher = psutil.Process(self.procs[1].pid)
        for p in [*launcher.children(recursive=True), launcher]:
            p.kill()

    def close(self) -> None:
        self.hosts.down()

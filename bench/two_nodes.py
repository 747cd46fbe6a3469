"""Two DeepSpeed "nodes" on one machine, launched by hand as on a cluster without ssh: ``deepspeed --hostfile H
--no_ssh --node_rank K``. Where unprivileged namespaces are allowed, each node gets a network namespace and an
address of its own (10.77.0.1 and 10.77.0.2 on a veth pair), so they talk over a real link; elsewhere both use
127.0.0.1. Used by ``tests/test_two_nodes.py`` and ``bench/faults.py``."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from trainer.distributed import free_port, launcher_env  # noqa: E402

# Node 0 keeps the namespace the script starts in; node 1 runs in a nested one, joined by a veth pair. A
# holder process keeps node 1's namespace (and so the link) alive when node 1's processes are killed, as a
# crashed node's network stays up; without it, v0 and its address would vanish with them.
NETNS_SCRIPT = r"""
set -e
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.77.0.1/24 dev v0
ip link set v0 up
unshare -n --fork sleep 100000 &
holder=$!
while [ "$(readlink /proc/$holder/ns/net)" = "$(readlink /proc/$$/ns/net)" ]; do sleep 0.05; done
ip link set v1 netns $holder
nsenter --net=/proc/$holder/ns/net sh -c 'ip addr add 10.77.0.2/24 dev v1; ip link set v1 up; ip link set lo up
  echo $$ > "$DIR/node1.pid"; export GLOO_SOCKET_IFNAME=v1; exec $NODE1 > "$DIR/node1.log" 2>&1' &
node1=$!
echo $$ > "$DIR/node0.pid"
set +e
GLOO_SOCKET_IFNAME=v0 $NODE0 > "$DIR/node0.log" 2>&1
echo $? > "$DIR/node0.exit"
wait $node1
kill $holder
"""

LOOPBACK_SCRIPT = r"""
sh -c 'echo $$ > "$DIR/node1.pid"; exec $NODE1 > "$DIR/node1.log" 2>&1' &
holder=$!
echo $$ > "$DIR/node0.pid"
$NODE0 > "$DIR/node0.log" 2>&1
echo $? > "$DIR/node0.exit"
wait $holder
"""


def namespaces_allowed() -> bool:
    try:
        return subprocess.run(["unshare", "-Urn", "ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class TwoNodes:
    def __init__(self, work: Path, train_args: list[str], port: int | None = None):
        self.dir = work
        self.dir.mkdir(parents=True, exist_ok=True)
        netns = namespaces_allowed()
        self.addr = "10.77.0.1" if netns else "127.0.0.1"
        hostfile = self.dir / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        port = port or free_port()

        def node(rank: int) -> str:
            cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", self.addr, "--master_port", str(port), str(REPO / "launch" / "train.py"),
                   *train_args]
            return shlex.join(cmd)

        env = launcher_env({"DIR": str(self.dir), "NODE0": node(0), "NODE1": node(1)})
        script = NETNS_SCRIPT if netns else LOOPBACK_SCRIPT
        prefix = ["unshare", "-Urn", "--fork"] if netns else []
        self.proc = subprocess.Popen([*prefix, "bash", "-c", script], cwd=REPO, env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self, node: int) -> str:
        path = self.dir / f"node{node}.log"
        return path.read_text() if path.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the two nodes were still running after {timeout} s:\n{self.log(0)[-3000:]}")
        return int((self.dir / "node0.exit").read_text())

    def kill_node1(self) -> None:
        holder = psutil.Process(int((self.dir / "node1.pid").read_text()))
        for p in [*holder.children(recursive=True), holder]:
            p.kill()



def kill_stray_nodes() -> None:
    for p in psutil.process_iter(["cmdline"]):
        if "--no_ssh" in (p.info["cmdline"] or []):
            p.kill()

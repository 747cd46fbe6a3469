"""Bring the test cluster up by hand: ``.venv/bin/python -m tests.cluster up [--no-slurm] [--dir DIR]`` (as root).

Prints how to enter each host, then waits; Ctrl-C (or SIGTERM) stops every process it started and the hosts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from harness.hosts import Hosts, HostsUnavailable
from harness.slurm import SlurmCluster


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster")
    p.add_argument("command", choices=["up"])
    p.add_argument("--dir", type=Path, default=None, help="where keys, configs and logs go (default: a new temp dir)")
    p.add_argument("--no-slurm", action="store_true", help="only the two hosts with sshd")
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="dsrecipes-cluster-"))
    hosts = Hosts(work / "hosts")
    slurm = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        hosts.up()
        if not args.no_slurm:
            slurm = SlurmCluster(hosts, work / "slurm").up()
        for h in hosts:
            print(f"{h.name} ({h.addr}): nsenter -t {h.pid} -n -u -m bash", flush=True)
        (work / "hostfile").write_text("".join(f"{h.name} slots=1\n" for h in hosts))
        print(f"hostfile: {work / 'hostfile'}" + ("; Slurm partition 'debug', 2 nodes of 1 CPU" if slurm else ""))
        print("Ctrl-C stops everything.", flush=True)
        signal.pause()
    except HostsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        if slurm is not None:
            slurm.down()
        hosts.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())

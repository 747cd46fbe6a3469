"""Ends the job within a bound when a rank dies, instead of leaving the others in a collective.

A rank killed with SIGKILL leaves its peers waiting in the next all-reduce until the process-group timeout
(DeepSpeed's default: 10 minutes; NCCL may wait longer). Each rank runs a daemon thread on its own client
connection to the rendezvous store (``MASTER_ADDR:MASTER_PORT``):

* every rank bumps its heartbeat counter each ``interval``; rank 0 declares a rank lost when its counter
  has not moved for ``timeout`` seconds (a dead node, a dead host: no clocks compared across machines);
* every rank checks the processes of its own node's ranks each ``interval`` and declares a dead one lost at
  once (a rank killed on this host is noticed in about ``interval``, not ``timeout``);
* ranks other than 0 treat a store that stops answering as the loss of rank 0, which hosts it;
* a verdict goes into the store (``lost``), every rank reads it within ``interval`` and exits with
  :data:`EXIT_LOST_RANK` after one line naming the lost rank.

A rank that ends normally or with an error marks itself done first, so its exit is never taken for a loss.
The thread holds no lock the training loop needs; the process exits from it with ``os._exit`` because the
main thread may be blocked inside a collective that will never return.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import psutil
import torch.distributed as dist

from ..distributed import DistContext

log = logging.getLogger("trainer")

EXIT_LOST_RANK = 3


def _node_id() -> str:
    """The launcher's node index where it sets one (two 'nodes' may share a host in tests), else the host."""
    for var in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(var):
            return f"node{os.environ[var]}"
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PeerWatchdog:
    def __init__(self, ctx: DistContext, timeout_s: float, hint: str = "", interval_s: float | None = None):
        self.ctx = ctx
        self.timeout = float(timeout_s)
        self.interval = interval_s or max(0.2, min(2.0, self.timeout / 10))
        self.hint = hint  # appended to the message: how to continue (the last checkpoint)
        self.verdict: str | None = None
        self._stop = threading.Event()
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self._where = f"{host}:{port}"
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(10.0, 5 * self.interval)),
                              wait_for_workers=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"trainer_watchdog/{attempt}/", store)
        node, local_world = _node_id(), int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        self.store.set(f"pid/{node}/{ctx.local_rank}", f"{ctx.rank}:{os.getpid()}")
        self._node, self._local_world = node, local_world
        self._local_peers: dict[int, int] | None = None  # rank -> pid of this node's other ranks
        self._beats = {r: (-1, time.monotonic()) for r in range(1, ctx.world)} if ctx.rank == 0 else {}
        self._store_failures = 0
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                lost = self._check()
                self._store_failures = 0
            except Exception as e:  # noqa: BLE001 - the store itself is what failed
                self._store_failures += 1
                if self._stop.is_set() or self._store_failures < 2 or self.ctx.rank == 0:
                    continue
                lost = f"rank 0 (the rendezvous store at {self._where} stopped answering: {type(e).__name__})"
            if lost and not self._stop.is_set():
                self._end(lost)

    def _check(self) -> str | None:
        if self.store.check(["lost"]):
            return self.store.get("lost").decode()
        self.store.add(f"hb/{self.ctx.rank}", 1)
        found = self._dead_local_peer() or (self._stale_heartbeat() if self.ctx.rank == 0 else None)
        if found:
            self.store.set("lost", found)
        return found

    def _dead_local_peer(self) -> str | None:
        if self._local_peers is None:
            keys = [f"pid/{self._node}/{i}" for i in range(self._local_world) if i != self.ctx.local_rank]
            if keys and not self.store.check(keys):
                return None  # not every local rank has registered yet
            self._local_peers = dict(tuple(map(int, self.store.get(k).decode().split(":"))) for k in keys)
        for rank, pid in self._local_peers.items():
            if not _alive(pid) and not self._done(rank):
                return f"rank {rank} (process {pid} on this node is gone: killed or crashed)"
        return None

    def _stale_heartbeat(self) -> str | None:
        now = time.monotonic()
        for rank, (count, since) in self._beats.items():
            current = self.store.add(f"hb/{rank}", 0)
            if current != count:
                self._beats[rank] = (current, now)
            elif now - since > self.timeout and not self._done(rank):
                return f"rank {rank} (no heartbeat for {now - since:.0f} s: its node is gone or unreachable)"
        return None

    def _done(self, rank: int) -> bool:
        return self.store.check([f"done/{rank}"])

    def _end(self, lost: str) -> None:
        self.verdict = lost
        lost_rank, first_here = int(lost.split()[1]), self.ctx.rank - self.ctx.local_rank
        if self.ctx.local_rank == 0 or (lost_rank == first_here and self.ctx.local_rank == 1):  # one line per node
            print(f"error: [rank {self.ctx.rank}] lost {lost}; ending the job{self.hint}", file=sys.stderr,
                  flush=True)
        sys.stdout.flush()
        os._exit(EXIT_LOST_RANK)

    # ------------------------------------------------------------------ the training loop's side
    def await_verdict(self) -> None:
        """After a collective failed: give the thread time to name a lost rank (it then ends the process);
        returns if none is found, so the caller re-raises the original error."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        while time.monotonic() < deadline and self._thread.is_alive():
            try:
                if self.store.check(["failed"]):
                    return  # a peer stopped on an error of its own and reported it: nothing was lost
            except Exception:  # noqa: BLE001 - the thread judges a failing store
                pass
            time.sleep(self.interval / 4)

    def stop(self, ok: bool = True) -> None:
        """Mark this rank done (its exit is not a loss) and end the thread."""
        try:
            self.store.set(f"done/{self.ctx.rank}", "ok" if ok else "error")
            if not ok:
                self.store.set("failed", str(self.ctx.rank))
        except Exception:  # noqa: BLE001 - the store may already be gone at the very end
            pass
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 10)

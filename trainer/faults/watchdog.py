"""Ends the job within a bound when a rank dies or fails, instead of leaving the others in a collective.

A rank killed with SIGKILL, or one that stops on an error of its own, leaves its peers waiting in the next
collective until the process-group timeout (DeepSpeed's default: 10 minutes; NCCL may wait longer). Each rank
runs a daemon thread on its own client connection to the rendezvous store (``MASTER_ADDR:MASTER_PORT``), from
the moment it joined the job (before the process group exists) to its end:

* every rank bumps its heartbeat counter each ``interval``; rank 0 declares a rank lost when its counter has not
  moved for ``timeout`` seconds (a dead node, a dead host: no clocks compared across machines);
* every rank checks the processes of its own node's ranks each ``interval`` and declares a dead one lost at
  once (a rank killed on this host is noticed in about ``interval``, not ``timeout``);
* ranks other than 0 treat a store that stops answering as the loss of rank 0, which hosts it;
* a rank that stops on an error records it (``failed``: rank, exit status, its one-line message) before it
  exits; the others end within ``interval`` plus a short grace, naming it, with its exit status;
* a verdict goes into the store (``lost``), every rank reads it within ``interval`` and exits with
  :data:`EXIT_LOST_RANK` after one line naming the lost rank.

A rank that ends normally or with an error marks itself done first, so its exit is never taken for a loss; rank
0, which hosts the store, waits (briefly) for the others to have read the outcome before it goes. The thread
holds no lock the training loop needs; it exits the process with ``os._exit`` because the main thread may be
blocked inside a collective that will never return.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
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
_ACTIVE: "PeerWatchdog | None" = None


def active() -> "PeerWatchdog | None":
    """The watchdog of this process's job, if it has one (a multi-rank job that got past joining)."""
    return _ACTIVE


def _close_at_exit() -> None:
    if _ACTIVE is not None:
        _ACTIVE.close(ok=True)


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


def looks_like_lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective or store call failing, as when a peer died mid-call."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return bool(re.search(r"gloo|nccl|connection|socket|peer|timed out|broken pipe", str(exc), re.IGNORECASE))


class PeerWatchdog:
    def __init__(self, ctx: DistContext, timeout_s: float, hint: str = "", interval_s: float | None = None):
        self.ctx = ctx
        self.timeout = float(timeout_s)
        self.interval = interval_s or max(0.2, min(2.0, self.timeout / 10))
        self.grace = max(1.0, self.interval)  # for this rank to reach its own error first (one shared by all)
        self.hint = hint  # appended to the message: how to continue (the last checkpoint)
        self.verdict: str | None = None
        self._stop = threading.Event()
        self._closing = threading.Event()  # this rank is ending on its own: a peer's failure is not news to it
        self._ending = threading.Lock()  # held by whichever thread ends the process
        self._previous_sigterm = None  # the handler _take_sigterm replaced
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
        self._tick = time.monotonic()  # the last check that completed
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
        self._thread.start()
        threading.Thread(target=self._supervise, name="peer-watchdog-supervisor", daemon=True).start()

    @classmethod
    def start(cls, ctx: DistContext, timeout_s: float) -> "PeerWatchdog":
        """The process's watchdog; a process that ends without closing it (a script using init_distributed
        directly) closes it at exit, as a normal end."""
        global _ACTIVE
        _ACTIVE = cls(ctx, timeout_s)
        atexit.register(_close_at_exit)
        _ACTIVE._take_sigterm()
        return _ACTIVE

    def _take_sigterm(self) -> None:
        """The DeepSpeed launcher SIGTERMs the other ranks as soon as it sees one exit. Where nothing else handles
        the signal (start-up, the end of a failed run), its default would end this rank without a word about
        the rank that failed or died: look first, and end naming the cause when there is one. (A handler already
        set, as a Slurm job's, is left alone; training's own handler takes over while it trains.)"""
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, _frame) -> None:
        try:
            outcome = self._outcome()
        except Exception:  # noqa: BLE001 - the store is gone: nothing more to learn
            outcome = None
        if outcome is not None:
            kind, what = outcome
            self._end(what) if kind == "lost" else self._end_for_failure(what, grace=False)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # nobody failed: the signal means what it says

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                outcome = self._check()
                self._store_failures = 0
                self._tick = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the store itself is what failed
                self._store_failures += 1
                if self._stop.is_set() or self._store_failures < 2 or self.ctx.rank == 0:
                    continue
                outcome = ("lost", f"rank 0 (the rendezvous store at {self._where} stopped answering: "
                                   f"{type(e).__name__})")
            if outcome and not self._stop.is_set():
                kind, what = outcome
                self._end(what) if kind == "lost" else self._end_for_failure(what)

    def _supervise(self) -> None:
        """A store call can block without end when its host vanished without closing the connection (a
        powered-off node); this thread does no I/O and ends the job when the checks stop completing."""
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._tick
            if silent > self.timeout + 2 * self.interval and not self._stop.is_set():
                who = "rank 0" if self.ctx.rank else "contact with the other ranks"
                self._end(f"{who} (the rendezvous store at {self._where} has not answered for {silent:.0f} s)")

    def _check(self) -> tuple[str, object] | None:
        outcome = self._outcome()
        if outcome is not None:
            return outcome
        self.store.add(f"hb/{self.ctx.rank}", 1)
        found = self._stale_heartbeat() if self.ctx.rank == 0 else None
        if found:
            self.store.set("lost", found)
            return "lost", found
        return None

    def _outcome(self) -> tuple[str, object] | None:
        """What is already known to have ended the job: a verdict, another rank's failure (unless this rank is
        ending on its own), a dead rank on this node."""
        if self.store.check(["lost"]):
            return "lost", self.store.get("lost").decode()
        failure = self._failure()
        if failure is not None and failure["rank"] != self.ctx.rank and not self._closing.is_set():
            return "failed", failure
        found = self._dead_local_peer()
        if found:
            self.store.set("lost", found)
            return "lost", found
        return None

    def _failure(self) -> dict | None:
        return json.loads(self.store.get("failed")) if self.store.check(["failed"]) else None

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

    def _say(self, text: str, about: int | None) -> None:
        """One line per node: its first rank says it (the second, when the first is the one it is about)."""
        first_here = self.ctx.rank - self.ctx.local_rank
        if self.ctx.local_rank == 0 or (about == first_here and self.ctx.local_rank == 1):
            print(f"error: [rank {self.ctx.rank}] {text}; ending the job{self.hint}", file=sys.stderr, flush=True)
        sys.stdout.flush()

    def _finish(self, text: str, about: int | None, code: int) -> None:
        """Say why (once per node), let the others read the outcome, exit; whichever thread gets here first."""
        if not self._ending.acquire(blocking=False):
            threading.Event().wait()  # the other thread is already ending the process
        self._say(text, about)
        self._mark_done("ended")
        if self.ctx.rank == 0:
            self._linger()
        os._exit(code)

    def _end(self, lost: str) -> None:
        self.verdict = lost
        words = lost.split()
        self._finish(f"lost {lost}", int(words[1]) if words[0] == "rank" else None, EXIT_LOST_RANK)

    def _end_for_failure(self, failure: dict, grace: bool = True) -> None:
        """Another rank stopped on an error: give this rank's main thread a moment to reach the same error (a
        config or data error every rank shares is said once, by the rank that got there first), then end."""
        if grace and self._closing.wait(self.grace):
            return
        self.verdict = f"rank {failure['rank']} failed"
        said = re.sub(r"^error: (\[rank \d+\] )?", "", failure["line"])
        self._finish(f"rank {failure['rank']} failed ({said})", failure["rank"], int(failure["code"]) or 1)

    # ------------------------------------------------------------------ the training loop's side
    def report_failure(self, code: int, line: str) -> bool:
        """Record this rank's error for the others, who end within seconds instead of waiting in a collective.
        True when it is the job's first failure, whose line is the one to show."""
        self._closing.set()
        record = json.dumps({"rank": self.ctx.rank, "code": code, "line": line})
        try:
            return self.store.compare_set("failed", "", record).decode() == record
        except Exception:  # noqa: BLE001 - the store is gone: nobody else to tell, so say it here
            return True

    def await_verdict(self, exc: BaseException) -> None:
        """After an unexpected error: when it looks like a peer vanished mid-collective, give the thread time to
        name the lost rank, or the peer's own error (it then ends the process as it ends the others). Returns
        otherwise, and the caller reports its own error.

        A launcher's SIGTERM (the DeepSpeed launcher sends one to the survivors of a rank it saw die, and kills
        them 30 s later) shortens the wait to what a check of this node's ranks needs, whether it came during
        training (the loop's handler recorded it) or comes now: a default SIGTERM here would end the process
        without a word."""
        from .preemption import last_signal

        short = 2 * self.interval + self.grace
        long = looks_like_lost_peer(exc) and last_signal() is None
        deadline = time.monotonic() + (self.timeout + 3 * self.interval if long else short)

        def hurry(_signum, _frame) -> None:
            nonlocal deadline
            deadline = min(deadline, time.monotonic() + short)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, hurry) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(self.interval / 4)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self, ok: bool = True) -> None:
        """Mark this rank done (its exit is not a loss) and end the thread; rank 0 first lets the others read
        the job's outcome from the store it hosts."""
        global _ACTIVE
        self._closing.set()
        self._mark_done("ok" if ok else "error")
        if self.ctx.rank == 0:
            self._linger()
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 10)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if _ACTIVE is self:
            _ACTIVE = None

    def _mark_done(self, how: str) -> None:
        try:
            self.store.set(f"done/{self.ctx.rank}", how)
        except Exception:  # noqa: BLE001 - the store may already be gone at the very end
            pass

    def _linger(self) -> None:
        deadline = time.monotonic() + 3 * self.interval + self.grace + 2
        while time.monotonic() < deadline:
            try:
                lost = self.store.get("lost").decode() if self.store.check(["lost"]) else ""
                if all(self._done(r) or lost.startswith(f"rank {r} ") for r in range(1, self.ctx.world)):
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(self.interval / 4)

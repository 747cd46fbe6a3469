"""Ends the job within a bound when a rank dies or fails, instead of leaving the others in a collective.

A rank killed with SIGKILL, or one that stops on an error of its own, leaves its peers waiting in the next
collective until the process-group timeout (DeepSpeed's default: 10 minutes; NCCL may wait longer). Each rank
runs a daemon thread on its own client connection to the rendezvous store (``MASTER_ADDR:MASTER_PORT``), from
the moment it joined the job (before the process group exists) to its end:

* every rank bumps its heartbeat counter each ``interval``; rank 0 declares a rank lost when its counter has not
  moved for ``timeout`` seconds (a dead node, a dead host: no clocks compared across machines), or, until every
  rank has recorded that it finished starting (``started``: process group, DeepSpeed's communication backend and
  the op it may have to build), for ``startup_timeout`` seconds, a bound of its own that the message names;
  time this process itself could not run (every thread frozen) is not counted as a peer's silence;
* every rank checks the processes of its own node's ranks each ``interval`` and declares a dead one lost at
  once (a rank killed on this host is noticed in about ``interval``, not ``timeout``);
* ranks other than 0 treat a store that stops answering as the loss of rank 0, which hosts it;
* a rank that stops on an error records it (``failed``: rank, exit status, its one-line message) before it
  exits; the others end within ``interval`` plus a short grace, naming it, with its exit status;
* a verdict goes into the store (``lost``), every rank reads it within ``interval`` and exits with
  :data:`EXIT_LOST_RANK` after one line naming the lost rank;
* a rank that ends the job (a verdict, a failure) waits at most :meth:`PeerWatchdog.wind_up_s` for the others to
  read it, then kills (SIGKILL) the ranks of its own node still running: one whose every thread is frozen in
  native code holding the GIL (or a stopped process) acts neither on the verdict nor on the launcher's SIGTERM,
  which the DeepSpeed launcher follows with SIGKILL only 30 s later.

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
from .preemption import last_signal

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


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already
        pass


def looks_like_lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective or store call failing, as when a peer died mid-call."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return bool(re.search(r"gloo|nccl|connection|socket|peer|timed out|broken pipe", str(exc), re.IGNORECASE))


class PeerWatchdog:
    def __init__(self, ctx: DistContext, timeout_s: float, hint: str = "", interval_s: float | None = None,
                 startup_timeout_s: float | None = None, startup_name: str = "the start-up bound"):
        self.ctx = ctx
        self.timeout = float(timeout_s)
        self.startup_timeout = max(self.timeout, float(startup_timeout_s or self.timeout))
        self.startup_name = startup_name  # what sets startup_timeout, for the message
        self.interval = interval_s or max(0.2, min(2.0, self.timeout / 10))
        self.grace = max(1.0, self.interval)  # for this rank to reach its own error first (one shared by all)
        self.hint = hint  # appended to the message: how to continue (the last checkpoint)
        self.verdict: str | None = None
        self._stop = threading.Event()
        self._closing = threading.Event()  # this rank is ending on its own: a peer's failure is not news to it
        self._ending = threading.Lock()  # held by whichever thread ends the process
        self._previous_sigterm = None  # the handler _take_sigterm replaced
        self._closed = False  # close() has run: the exit does not close it again
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
        self._all_started = False  # rank 0: every rank has recorded started/<rank>
        self._judged = time.monotonic()  # rank 0: the last heartbeat check
        self._store_failures = 0
        self._tick = time.monotonic()  # the last check that completed
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
        self._thread.start()
        threading.Thread(target=self._supervise, name="peer-watchdog-supervisor", daemon=True).start()

    @classmethod
    def start(cls, ctx: DistContext, timeout_s: float, **kwargs) -> "PeerWatchdog":
        """The process's watchdog; a process that ends without closing it (a script using
        ``trainer.startup.init_distributed``) closes it at exit, as a normal end."""
        dog = cls(ctx, timeout_s, **kwargs)
        atexit.register(dog._close_at_exit)
        dog._take_sigterm()
        return dog

    def _close_at_exit(self) -> None:
        if not self._closed:
            self.close(ok=True)

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
        powered-off node); this thread does no I/O and ends the job when the checks stop completing. When this
        thread itself woke late, the whole process was frozen (native code holding the GIL, a stopped process):
        the checks could not run either, so that time is not the store's silence."""
        woke = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            late, woke = now - woke - self.interval, now
            if late > self.interval:
                self._tick = min(now, self._tick + late)
            silent = now - self._tick
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

    def _local_pid_keys(self) -> list[str]:
        return [f"pid/{self._node}/{i}" for i in range(self._local_world) if i != self.ctx.local_rank]

    def _pids(self, keys: list[str]) -> dict[int, int]:
        """Rank -> pid of the registered ranks ``keys`` name."""
        return dict(tuple(map(int, self.store.get(k).decode().split(":"))) for k in keys)

    def _dead_local_peer(self) -> str | None:
        if self._local_peers is None:
            keys = self._local_pid_keys()
            if keys and not self.store.check(keys):
                return None  # not every local rank has registered yet
            self._local_peers = self._pids(keys)
        for rank, pid in self._local_peers.items():
            if not _alive(pid) and not self._done(rank):
                return f"rank {rank} (process {pid} on this node is gone: killed or crashed)"
        return None

    def _stale_heartbeat(self) -> str | None:
        """A rank whose heartbeat has not moved for the bound: ``timeout`` once every rank has started, the
        longer ``startup_timeout`` until then. Time this rank did not watch (it was itself frozen for more than
        an interval past its own) is not counted as a peer's silence."""
        now = time.monotonic()
        late, self._judged = max(0.0, now - self._judged - 2 * self.interval), now
        starting = not self._all_started
        if starting and self.store.check([f"started/{r}" for r in range(self.ctx.world)]):
            self._all_started = True  # each rank's silence counts from here against the shorter bound
            self._beats = {r: (count, now) for r, (count, _) in self._beats.items()}
        bound = self.startup_timeout if starting else self.timeout
        for rank, (count, since) in self._beats.items():
            current = self.store.add(f"hb/{rank}", 0)
            if current != count:
                self._beats[rank] = (current, now)
                continue
            since = min(now, since + late)
            self._beats[rank] = (count, since)
            if now - since > bound and not self._done(rank):
                return self._silence(rank, now - since, starting)
        return None

    def _silence(self, rank: int, silent: float, starting: bool) -> str:
        if not starting:
            return f"rank {rank} (no heartbeat for {silent:.0f} s: its node is gone or unreachable)"
        bound = f"{self.startup_timeout:.0f} s ({self.startup_name})"
        if not self.store.check([f"started/{rank}"]):
            return (f"rank {rank} (did not finish starting within {bound} and sent no heartbeat in that time: "
                    "its node is gone, unreachable or stuck)")
        return (f"rank {rank} (no heartbeat for {silent:.0f} s while the job was starting, the start-up bound "
                f"{bound}: its node is gone, unreachable or stuck)")

    def _done(self, rank: int) -> bool:
        return self.store.check([f"done/{rank}"])

    def _say(self, text: str, about: int | None) -> None:
        """One line per node: its first rank says it (the second, when the first is the one it is about)."""
        first_here = self.ctx.rank - self.ctx.local_rank
        if self.ctx.local_rank == 0 or (about == first_here and self.ctx.local_rank == 1):
            print(f"error: [rank {self.ctx.rank}] {text}; ending the job{self.hint}", file=sys.stderr, flush=True)
        sys.stdout.flush()

    def _finish(self, text: str, about: int | None, code: int, lost: int | None = None) -> None:
        """Say why (once per node), let the others read the outcome, end this node's frozen ranks, exit;
        whichever thread gets here first."""
        if not self._ending.acquire(blocking=False):
            threading.Event().wait()  # the other thread is already ending the process
        self._say(text, about)
        self._mark_done("ended")
        self._wind_up(lost)
        os._exit(code)

    def _end(self, lost: str) -> None:
        self.verdict = lost
        words = lost.split()
        about = int(words[1]) if words[0] == "rank" else None
        self._finish(f"lost {lost}", about, EXIT_LOST_RANK, lost=about)

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
        the job's outcome from the store it hosts. A rank that ends on an error has ended the job: it also
        sees that this node's other ranks go (:meth:`_wind_up`)."""
        self._closing.set()
        self._mark_done("ok" if ok else "error")
        if not ok:
            self._wind_up(None)
        elif self.ctx.rank == 0:  # the others read the outcome from the store it hosts
            self._await_outcome_read(list(range(1, self.ctx.world)), {})
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 10)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._closed = True

    def _mark_done(self, how: str) -> None:
        try:
            self.store.set(f"done/{self.ctx.rank}", how)
        except Exception:  # noqa: BLE001 - the store may already be gone at the very end
            pass

    def mark_started(self) -> None:
        """This rank has finished starting (process group, DeepSpeed's communication backend, its op): once every
        rank has, a silent rank is judged by ``timeout``, no longer by ``startup_timeout``."""
        self.store.set(f"started/{self.ctx.rank}", "1")

    def wind_up_s(self) -> float:
        """How long a rank that ends the job waits for the others before it exits (rank 0, which hosts the
        store, for every rank to have read the outcome; the others for their node's ranks to have gone):
        three checks, the grace and two seconds. Every rank of the job is gone within about that time of the
        line that ends it (10 s at the default ``lost_rank_timeout_s``)."""
        return 3 * self.interval + self.grace + 2

    def _local_pids(self) -> dict[int, int]:
        """This node's other ranks that registered: rank -> pid."""
        if self._local_peers is not None:
            return self._local_peers
        return self._pids([k for k in self._local_pid_keys() if self.store.check([k])])

    def _wind_up(self, lost: int | None) -> None:
        """Before this rank exits, having ended the job: wait (at most :meth:`wind_up_s`) until the others have
        read the outcome (marked done; rank 0 waits for every rank, the others for their node's) or, on this
        node, are gone; then kill this node's ranks still running. A rank frozen in native code that holds the
        GIL (DeepSpeed's shared-memory set-up, for one) or a stopped process acts neither on the outcome nor on
        the launcher's SIGTERM (the DeepSpeed launcher kills it 30 s later), and ``lost``, a lost rank whose
        process is still running on this node, is one: it is killed at once."""
        try:
            local = self._local_pids()
        except Exception:  # noqa: BLE001 - the store is gone: nothing to learn about the others
            return
        if lost in local and _alive(local[lost]) and not self._said_done(lost):
            _kill(local[lost])
        waiting = self._await_outcome_read([r for r in range(self.ctx.world) if r not in (self.ctx.rank, lost)
                                            and (self.ctx.rank == 0 or r in local)], local)
        for r in waiting:
            if r in local and _alive(local[r]):
                _kill(local[r])

    def _said_done(self, rank: int) -> bool:
        """Whether ``rank`` marked itself done (it is ending on its own); True when the store cannot tell."""
        try:
            return self._done(rank)
        except Exception:  # noqa: BLE001
            return True

    def _may_not_know(self, rank: int, local: dict[int, int]) -> bool:
        """Whether ``rank`` may still be running without having read the job's outcome: not done, not the lost
        rank, and (on this node) not gone."""
        if rank in local and not _alive(local[rank]):
            return False
        try:
            lost = self.store.get("lost").decode() if self.store.check(["lost"]) else ""
            return not (self._done(rank) or lost.startswith(f"rank {rank} "))
        except Exception:  # noqa: BLE001 - the store is gone (rank 0 exited): a local rank's exit is all there is
            return rank in local

    def _await_outcome_read(self, ranks: list[int], local: dict[int, int]) -> list[int]:
        """Wait, at most :meth:`wind_up_s`, until none of ``ranks`` may still be running without having read the
        job's outcome (:meth:`_may_not_know`; ``local``: this node's ranks, whose exit also counts); the ones
        that still may."""
        deadline = time.monotonic() + self.wind_up_s()
        while ranks and time.monotonic() < deadline:
            ranks = [r for r in ranks if self._may_not_know(r, local)]
            if ranks:
                time.sleep(self.interval / 4)
        return ranks

"""Process-group start-up that works the same under the deepspeed launcher, torchrun, Slurm and plain python.

The start-up owns the rendezvous store (rank 0 hosts it) so that the job's watchdog can run on it before the
process group exists: a rank that fails or vanishes at any point after it connected ends the others within
seconds, start-up included. It must not pick a device past what this task can see, nor let a multi-host job
start whose ranks would advertise addresses the other hosts cannot reach.

It sits above the collectives (``trainer.distributed``), the launcher's environment (``trainer.launch_env``),
the watchdog and the host checks, and hands its caller what it started (:class:`StartedRank`) rather than
keeping it in a global: the command line ends the watchdog it was given, whatever else this process started.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from .distributed import DistContext
from .errors import ConfigError, HostError
from .faults.inject import ENV as FAULTS_ENV
from .faults.inject import FaultPlan
from .faults.watchdog import PeerWatchdog
from .launch_env import interpreter_path, rank_device, single_process_env, use_own_extensions_dir
from .multihost import check_advertised_addresses


@dataclass(frozen=True)
class StartedRank:
    """This rank, started: its context, and the job's watchdog (a multi-rank job; None for one rank, or when the
    process group existed already). Whoever holds it closes the watchdog when the rank ends (``close(ok=...)``);
    a process that does not closes it at exit, as a normal end."""
    ctx: DistContext
    watchdog: PeerWatchdog | None = None


def join_timeout(lost_rank_timeout_s: float) -> float:
    """How long start-up waits for a rank to join (rank 0's store, every rank's host record): launchers start
    hosts a few seconds apart, so never less than a minute."""
    return max(60.0, lost_rank_timeout_s)


STARTUP_FACTOR = 10
STARTUP_BOUND_NAME = f"{STARTUP_FACTOR} times train.lost_rank_timeout_s"


def startup_timeout(lost_rank_timeout_s: float) -> float:
    """How long a rank may send no heartbeat before every rank has finished starting (its process group,
    DeepSpeed's communication backend and the op it builds): a rank that builds the op while its peers wait is
    slow, not lost. Ten times ``train.lost_rank_timeout_s`` (10 minutes at the default)."""
    return STARTUP_FACTOR * lost_rank_timeout_s


_STORE: list[dist.Store] = []  # kept for the process's life: rank 0's object is the server the others talk to


def _rendezvous_store(rank: int, world: int, join_s: float, timeout_s: float) -> dist.Store:
    """The job's key-value store at MASTER_ADDR:MASTER_PORT: rank 0 hosts it (torchrun's agent does when it set
    one up); every rank holds a client connection. The process group and the watchdog both use it."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    host_it = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = dist.TCPStore(host, port, world, is_master=host_it, timeout=timedelta(seconds=join_s),
                              wait_for_workers=False, multi_tenant=True)
    except RuntimeError as e:  # torch's DistNetworkError: rank 0 could not host the store, or no rank 0 to reach
        text = str(e).lower()
        if host_it and ("eaddrinuse" in text or "address already in use" in text):
            raise ConfigError(f"port {port} on {host} is already in use (MASTER_PORT); pass a free one with "
                              "--master_port") from None
        if not host_it and ("timed out" in text or "timeout" in text):
            raise HostError(f"rank {rank} could not reach rank 0's rendezvous store at {host}:{port} within "
                              f"{join_s:.0f} s: check that rank 0 started and that this host reaches {host} "
                              "(MASTER_ADDR)") from None
        raise
    store.set_timeout(timedelta(seconds=timeout_s))
    _STORE.append(store)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def start_rank(timeout_s: float = 600.0, lost_rank_timeout_s: float = 60.0,
               on_watchdog: Callable[[PeerWatchdog], None] | None = None) -> StartedRank:
    """Start this rank: device, rendezvous store, the watchdog (multi-rank jobs), host checks, process group,
    DeepSpeed's communication backend. ``lost_rank_timeout_s`` bounds how long a silent rank is waited for once
    every rank has started, :func:`startup_timeout` until then. ``on_watchdog`` gets the watchdog as soon as it
    runs, before the rest of start-up: an error there (a host check, the process group) is one the other ranks
    must hear of through it, and this function then returns nothing."""
    single_process_env()
    os.environ["PATH"] = interpreter_path(os.environ.get("PATH"))
    use_own_extensions_dir()  # before DeepSpeed builds or loads an op
    # DeepSpeed (seconds to import) only when a rank starts, after the environment it reads is set; not a cycle
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(acc, local_rank)
    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=device)
    if dist.is_initialized():
        return StartedRank(ctx)
    backend = acc.communication_backend_name()
    join_s = join_timeout(lost_rank_timeout_s)
    store = _rendezvous_store(rank, world, join_s, timeout_s)
    dog = None
    if world > 1:
        # from here on, a failing or vanished rank ends the others
        dog = PeerWatchdog.start(ctx, lost_rank_timeout_s, startup_timeout_s=startup_timeout(lost_rank_timeout_s),
                                 startup_name=STARTUP_BOUND_NAME)
        if on_watchdog is not None:
            on_watchdog(dog)
        check_advertised_addresses(store, ctx, backend, join_s)
    extra = {"device_id": device} if device.type == "cuda" and world > 1 else {}
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **extra)
    if world > 1:
        _stall_if_injected(rank)
        _load_comm_op_everywhere(store, ctx, timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))  # wraps the group
    if acc.device_name() == "cpu":
        _unlink_shm_allreduce_buffer()
    if dog is not None:
        dog.mark_started()  # this rank's heartbeat is now judged by lost_rank_timeout_s, once every rank's is
    return StartedRank(ctx, dog)


def init_distributed(timeout_s: float = 600.0, lost_rank_timeout_s: float = 60.0) -> DistContext:
    """:func:`start_rank` for a script that needs only the context (a probe, a benchmark): its watchdog, if any,
    closes at exit as a normal end, and an error it raises is not reported to the other ranks first."""
    return start_rank(timeout_s, lost_rank_timeout_s).ctx


def _stall_if_injected(rank: int) -> None:
    """``TRAINER_FAULTS=stall_startup@0:R``: rank R freezes here, where DeepSpeed's op build and load happen."""
    if os.environ.get(FAULTS_ENV):
        FaultPlan.from_env(rank).stall_startup()


def _load_comm_op_everywhere(store: dist.Store, ctx: DistContext, timeout_s: float) -> None:
    """Build (or load) DeepSpeed's CPU communication op on this rank, then wait until every rank has.

    ``deepspeed.init_distributed`` builds the op on each rank (JIT: minutes when it must be rebuilt, one rank
    after the other under torch's lock on the build folder) and at once calls its ``initialize``, which spins,
    holding the GIL, until every rank on the node has created its shared-memory buffer. A rank that got there
    first froze all its Python threads, its watchdog's heartbeat included, for as long as the slowest rank
    took to build: the others took it for lost. Here the op is loaded first (DeepSpeed keeps the module, so
    its own call does not build again) and the ranks wait for each other in the store, in short waits that
    hold no lock: heartbeats go on, signals are handled, a peer's failure ends this rank."""
    import deepspeed  # as in start_rank, which imported it already
    from deepspeed.accelerator import get_accelerator

    try:
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    except Exception:  # noqa: BLE001 - an accelerator without the op: DeepSpeed skips it too
        builder = None
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()  # what deepspeed.comm.torch.build_shm_op does, once
    store.set(f"trainer_startup/comm_op/{ctx.rank}", "1")
    keys = [f"trainer_startup/comm_op/{r}" for r in range(ctx.world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if time.monotonic() > deadline:
            late = [r for r, k in enumerate(keys) if not store.check([k])]
            raise HostError(f"rank(s) {', '.join(map(str, late))} did not build or load DeepSpeed's communication "
                            f"op within {timeout_s:.0f} s; see their output")
        time.sleep(0.05)


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 66 MB /dev/shm file per rank and run, never removed:
    a test suite or a sweep fills /dev/shm until the machine runs out of memory. Its init maps every rank's
    file, so once all ranks are past it (the barrier) each removes its own name; the mappings live on until
    the processes exit, however they exit."""
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    dist.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)

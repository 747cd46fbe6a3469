"""Process-group start-up that works the same under the deepspeed launcher, torchrun, Slurm and plain python.

The start-up owns the rendezvous store (rank 0 hosts it) so that the job's watchdog can run on it before the
process group exists: a rank that fails or vanishes at any point after it connected ends the others within
seconds, start-up included. It must not pick a device past what this task can see, nor let a multi-host job
start whose ranks would advertise addresses the other hosts cannot reach.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, HostError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def interpreter_path(path: str | None) -> str:
    """``path`` with this interpreter's ``bin/`` first: DeepSpeed builds its C++ ops with the first ``ninja`` on
    PATH, and a different ninja than last time rebuilds them (a minute per start). A rank started over ssh or by
    Slurm gets the remote shell's PATH, without the virtual environment."""
    first = str(Path(sys.executable).parent)
    rest = [p for p in (path or "").split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *rest])


EXTENSIONS_VAR = "TORCH_EXTENSIONS_DIR"


def extensions_dir(prefix: str | None = None) -> Path:
    """This environment's own folder for the C++ ops torch builds on the fly (DeepSpeed's CPU communication op):
    ``~/.cache/torch_extensions/<name>-<hash of sys.prefix>``. Torch's default folder is shared by every
    environment of one Python version, and each environment builds the op from its own copy of DeepSpeed, so
    two environments used in turn rebuild it every time (minutes on a loaded machine)."""
    prefix = os.path.abspath(prefix or sys.prefix)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(prefix).name.lstrip(".")) or "python"
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:10]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")  # where torch's own default lives
    return cache / "torch_extensions" / f"{name}-{digest}"


def use_own_extensions_dir(env: dict | None = None) -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` in ``env`` (default: this process's environment, so that DeepSpeed's op
    loader and every child started from here see it) at :func:`extensions_dir`, unless the user set one.
    The folder depends only on the environment's path, so ranks that start their own (over ssh, under Slurm)
    choose the same one. Returns the folder in use."""
    env = os.environ if env is None else env
    if not env.get(EXTENSIONS_VAR):
        env[EXTENSIONS_VAR] = str(extensions_dir())
    return env[EXTENSIONS_VAR]


def launcher_env(extra: dict | None = None) -> dict:
    """The environment for a child ``deepspeed`` / ``python launch/...`` process: the launcher sets the rank
    variables itself (stale ones from this shell would mislead it), output unbuffered, this interpreter's
    ``bin/`` first on PATH, and this environment's own extensions folder (:func:`use_own_extensions_dir`)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = interpreter_path(env.get("PATH"))
    use_own_extensions_dir(env)
    return env | (extra or {})


def _single_process_env() -> None:
    """Plain ``python``: give torch.distributed a one-rank world (DeepSpeed would otherwise try mpi4py)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def usable_cpus() -> int:
    """The CPUs this process may run on: Slurm's allocation per task where it says, else the affinity mask (a
    container or ``taskset`` limit), not the machine's count."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpus_per_rank() -> int:
    """The CPUs this rank may use: its Slurm task's (``SLURM_CPUS_PER_TASK``, else the affinity mask of a
    container or ``taskset``; never the machine's count) over the ranks that share them.

    A Slurm task started per rank (this project's sweeps) keeps its allocation; ranks a launcher started inside
    one task or on one host (deepspeed, torchrun) share it: ``WORLD_SIZE / SLURM_NTASKS`` ranks per task, or
    ``LOCAL_WORLD_SIZE`` outside Slurm.
    """
    cpus = usable_cpus()
    env = os.environ
    world = int(env.get("WORLD_SIZE") or 1)
    tasks = env.get("SLURM_NTASKS", "")
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit() and tasks.isdigit() and int(tasks) > 0:
        sharing = world // int(tasks)
    else:
        sharing = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    return max(1, cpus // max(1, sharing))


def _share_cpu_threads() -> None:
    """CPU ranks split the CPUs they may use (:func:`cpus_per_rank`) instead of each taking all of them."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpus_per_rank())


def device_index(local_rank: int, visible: int) -> int:
    """The accelerator a rank uses among the ``visible`` ones its task sees.

    A task bound to one GPU (Slurm ``--gpus-per-task=1``, ``--gpu-bind``) sees it as device 0 whatever its
    LOCAL_RANK; a task that sees its node's GPUs (the deepspeed launcher, torchrun) takes the LOCAL_RANK-th."""
    if visible < 1:
        raise ConfigError("this task sees no GPU (CUDA_VISIBLE_DEVICES is empty or the driver found none); "
                          "request GPUs for it or run on CPU")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    raise ConfigError(f"LOCAL_RANK is {local_rank} but this task sees only {visible} GPUs "
                      f"(CUDA_VISIBLE_DEVICES={shown}); bind one GPU per task (--gpus-per-task=1) or let every "
                      "task see all of its node's GPUs")


def deepspeed_args(ctx: DistContext) -> SimpleNamespace:
    """``deepspeed.initialize``'s ``args``: the device this rank chose (:func:`device_index`) as ``device_rank``.
    Without it DeepSpeed sets the device to LOCAL_RANK, which a task that sees one GPU does not have."""
    return SimpleNamespace(device_rank=0 if ctx.device.index is None else ctx.device.index)


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


def init_distributed(timeout_s: float = 600.0, lost_rank_timeout_s: float = 60.0) -> DistContext:
    """Start this rank: device, rendezvous store, the watchdog (multi-rank jobs), host checks, process group,
    DeepSpeed's communication backend. ``lost_rank_timeout_s`` bounds how long a silent rank is waited for once
    every rank has started, :func:`startup_timeout` until then."""
    _single_process_env()
    os.environ["PATH"] = interpreter_path(os.environ.get("PATH"))
    use_own_extensions_dir()  # before DeepSpeed builds or loads an op
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        _share_cpu_threads()
        device = torch.device("cpu")
    else:
        index = device_index(local_rank, acc.device_count())
        acc.set_device(index)
        device = torch.device(acc.device_name(index))
    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=device)
    if dist.is_initialized():
        return ctx
    backend = acc.communication_backend_name()
    join_s = join_timeout(lost_rank_timeout_s)
    store = _rendezvous_store(rank, world, join_s, timeout_s)
    if world > 1:
        from .faults.watchdog import PeerWatchdog
        from .multihost import check_advertised_addresses

        # from here on, a failing or vanished rank ends the others
        PeerWatchdog.start(ctx, lost_rank_timeout_s, startup_timeout_s=startup_timeout(lost_rank_timeout_s),
                           startup_name=STARTUP_BOUND_NAME)
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
    if world > 1:
        from .faults.watchdog import active

        active().mark_started()  # this rank's heartbeat is now judged by lost_rank_timeout_s, once every rank's is
    return ctx


def _stall_if_injected(rank: int) -> None:
    """``TRAINER_FAULTS=stall_startup@0:R``: rank R freezes here, where DeepSpeed's op build and load happen."""
    from .faults.inject import ENV, FaultPlan

    if os.environ.get(ENV):
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
    import deepspeed
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


def all_reduce_sums(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum float64 scalars over ranks; exact for the counts and sums evaluation needs."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()

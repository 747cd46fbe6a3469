"""What the launcher (deepspeed, torchrun, Slurm, plain python) tells a rank through the environment, and the
environment this project gives the processes it launches.

Reading it (the rank variables, the CPUs and devices a task may use) and writing it (PATH, the extensions folder,
a one-rank world for plain python) are kept apart from the start-up that acts on it (``trainer.startup``), so
that a launching process (the sweeps, the tests, the benchmarks) uses them without the start-up's watchdog and
host checks.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from pathlib import Path

import torch

from .errors import ConfigError


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


def single_process_env() -> None:
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


def rank_device(accelerator, local_rank: int) -> torch.device:
    """Take this rank's share of what its task may use: on CPU, its share of the CPUs (:func:`cpus_per_rank`, as
    threads); on an accelerator (DeepSpeed's ``get_accelerator()``), the device :func:`device_index` picks, made
    current. Returns the device."""
    if accelerator.device_name() == "cpu":
        _share_cpu_threads()
        return torch.device("cpu")
    index = device_index(local_rank, accelerator.device_count())
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))

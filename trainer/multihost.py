"""What a job whose ranks span several hosts checks before it trains: that every rank advertises an address the
other hosts can reach, and that every host sees the run directory at the same path.

Both mistakes otherwise surface late and far from their cause (a refused connection inside gloo's start-up on
one host while the other waits; checkpoints whose files are split over several disks). Each check ends the job
with one line naming the host and the fix; it must not change anything a later run depends on.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path

import psutil
import torch.distributed as dist

from .distributed import DistContext, broadcast_object
from .errors import ConfigError, HostError

IFNAME_VARS = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}
ENV_FILE_HINT = ("put the line in ~/.deepspeed_env on the host you launch from: the deepspeed launcher exports "
                 "its lines to every host")


def _interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses."""
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _bindable(addr: str, family: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def gloo_address() -> tuple[str, str]:
    """The address gloo will advertise to the other ranks, and where it comes from. Gloo's own rule
    (ProcessGroupGloo's default device): the interfaces in GLOO_SOCKET_IFNAME, else the first address this host's
    name resolves to that a socket can bind, else loopback."""
    ifnames = os.environ.get("GLOO_SOCKET_IFNAME", "").strip()
    if ifnames:
        name = ifnames.split(",")[0]
        found = _interfaces().get(name)
        if not found:
            raise HostError(f"GLOO_SOCKET_IFNAME={ifnames} names no interface with an IPv4 address on host "
                              f"{socket.gethostname()} (it has {_describe_interfaces()}); set it to the interface "
                              f"the hosts share, the same name on every host; {ENV_FILE_HINT}")
        return found[0], f"interface {name} (GLOO_SOCKET_IFNAME)"
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        infos = []
    for family, _, _, _, sockaddr in infos:
        if _bindable(sockaddr[0], family):
            return sockaddr[0], f"what its hostname {host} resolves to"
    return "127.0.0.1", f"loopback: its hostname {host} resolves to no usable address"


def _describe_interfaces() -> str:
    shown = [f"{name} {', '.join(addrs)}" for name, addrs in sorted(_interfaces().items()) if addrs]
    return "; ".join(shown) or "no IPv4 interface"


def check_advertised_addresses(store: dist.Store, ctx: DistContext, backend: str, join_s: float) -> None:
    """Every rank records its host and the address it would advertise; a rank on a multi-host job that would
    advertise loopback stops with the fix. NCCL picks a non-loopback interface itself, so only gloo is checked."""
    addr, source = gloo_address() if backend == "gloo" else ("", "")
    store.set(f"trainer_hosts/{ctx.rank}", json.dumps({"host": socket.gethostname(), "addr": addr}))
    keys = [f"trainer_hosts/{r}" for r in range(ctx.world)]
    try:
        store.wait(keys, timedelta(seconds=join_s))
    except RuntimeError:
        missing = [r for r in range(ctx.world) if not store.check([keys[r]])]
        raise ConfigError(f"rank(s) {', '.join(map(str, missing))} did not join within {join_s:.0f} s; see their "
                          "hosts' output for why they did not start") from None
    hosts = {json.loads(store.get(k))["host"] for k in keys}
    if backend == "gloo" and len(hosts) > 1 and _is_loopback(addr):
        var = IFNAME_VARS["gloo"]
        raise HostError(
            f"rank {ctx.rank} on host {socket.gethostname()} would advertise {addr} ({source}) to ranks on "
            f"{len(hosts) - 1} other host(s), which cannot reach a loopback address: set {var} (NCCL_SOCKET_IFNAME "
            f"for NCCL) to the interface the hosts share, e.g. {var}={_suggested_interface()}; {ENV_FILE_HINT}")


def _suggested_interface() -> str:
    for name, addrs in sorted(_interfaces().items()):
        if any(not _is_loopback(a) for a in addrs):
            return name
    return "eth0"


def check_shared_run_dir(path: Path, ctx: DistContext, wait_s: float = 10.0) -> None:
    """Rank 0 writes a token into the run directory; every rank must read it back there (a shared filesystem
    may take a moment to show another host's new file, hence ``wait_s``). A run directory that is not shared
    would split each checkpoint over several disks. Leaves nothing behind, not even a directory it created."""
    if ctx.world == 1:
        return
    created = False
    probe = path / f".shared-{broadcast_object(secrets.token_hex(8), ctx)}"
    if ctx.is_main:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("written by rank 0\n")
    dist.barrier()
    deadline = time.monotonic() + wait_s
    seen = probe.is_file()
    while not ctx.is_main and not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = probe.is_file()
    views = [None] * ctx.world
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if ctx.is_main:
        probe.unlink(missing_ok=True)
        if created:
            path.rmdir()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"the run directory {path} is not shared: {', '.join(blind)} cannot see what rank 0 on "
                          f"{views[0][1]} wrote there; put --run-dir on a filesystem every host mounts at the same "
                          "path (NFS, Lustre)")

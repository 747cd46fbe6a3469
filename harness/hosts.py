"""Hosts for the cluster tests: each a set of Linux namespaces (network, hostname, mounts) of this module's
making, with its own address, hostname, ``/etc/hosts``, ``/run`` and an OpenSSH server taking key-only root
logins, all joined by a bridge in a namespace of their own.

The hosts share this machine's filesystem, as cluster nodes share NFS or Lustre: the checkout, its virtual
environment and the run directories are at the same path everywhere. Their traffic never leaves the namespaces
(the bridge has no link to this machine's network). Everything runs as root (creating network namespaces and
moving links needs it). ``down()`` stops what this module started (the namespace holders, sshd, what ``popen``
started or ``track`` was given) and their descendants, found by pid, and nothing else: a process that merely
shares a host's namespace is left alone. Whether the hosts are isolated is measured (``layout()``), not assumed.

    hosts = Hosts(Path("/tmp/cluster"), ["node1", "node2"]).up()
    subprocess.run(hosts["node1"].cmd(["ssh", "node2", "hostname"]))   # -> node2
    hosts.down()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
NEEDS = {"sshd": SSHD, "ssh": "ssh", "ssh-keygen": "ssh-keygen", "pdsh": "pdsh", "ip": "ip", "unshare": "unshare",
         "nsenter": "nsenter"}
DEBIAN_PACKAGES = "openssh-server openssh-client pdsh iproute2 util-linux"
INTERFACE = "eth1"  # the same name on every host, as on a real cluster's fabric
# Every command on a host runs as a child subreaper (prctl PR_SET_CHILD_SUBREAPER, kept across exec): what its
# descendants leave behind (an ssh session's background job, slurmd's double-forked slurmstepd) is re-parented to
# it instead of to init, so it stays among the descendants down() stops. (A command that itself forks into the
# background and exits would escape: the daemons here all run in the foreground.)
SUBREAPER = [sys.executable, "-S", "-c", "import ctypes, os, sys; u = ctypes.c_ulong\n"
             "if ctypes.CDLL(None, use_errno=True).prctl(36, u(1), u(0), u(0), u(0)):\n"
             "    sys.exit('prctl(PR_SET_CHILD_SUBREAPER): ' + os.strerror(ctypes.get_errno()))\n"
             "os.execvp(sys.argv[1], sys.argv[1:])"]


class HostsUnavailable(RuntimeError):
    """This machine cannot host the test cluster; the message says what is missing."""


def missing_programs() -> list[str]:
    return [name for name, prog in NEEDS.items() if shutil.which(prog) is None and not Path(prog).is_file()]


def check_can_host() -> None:
    missing = missing_programs()
    if missing:
        raise HostsUnavailable(f"the cluster tests need {', '.join(missing)}: apt-get install {DEBIAN_PACKAGES}")
    if os.geteuid() != 0:
        raise HostsUnavailable("the cluster tests create network namespaces and must run as root")


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def addresses(host: Host | None = None) -> set[str]:
    """The IPv4 addresses configured in ``host``'s network namespace (None: in this process's)."""
    argv = ["ip", "-o", "-4", "addr", "show"]
    out = (host.run(argv) if host else subprocess.run(argv, capture_output=True, text=True, check=True)).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """``proc`` and its descendants, children first; nothing once it has been reaped (its pid may be reused)."""
    if proc.poll() is not None:
        return []
    try:
        top = psutil.Process(proc.pid)
        return [*top.children(recursive=True), top]
    except psutil.Error:
        return []


@dataclass
class Host:
    name: str
    addr: str
    holder: subprocess.Popen  # the process whose namespaces are this host's; every process of the host joins them
    etc: Path  # this host's own /etc/hosts lives here
    netns: str = ""  # the network namespace's identity, read from the holder
    started: list[subprocess.Popen] = field(default_factory=list)  # what popen started or track was given

    def __post_init__(self) -> None:
        self.netns = self.netns or _netns(self.holder.pid)

    @property
    def pid(self) -> int:
        return self.holder.pid

    def cmd(self, argv: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """``argv`` as run on this host: in its network, hostname and mount namespaces, as a subreaper."""
        return ["nsenter", "-t", str(self.pid), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", *SUBREAPER,
                *map(str, argv)]

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        proc = subprocess.run(self.cmd(argv, kw.pop("cwd", None)), **kw)
        if check and proc.returncode != 0:
            raise HostsUnavailable(f"{self.name}: {' '.join(map(str, argv))} failed ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout or '').strip()[-500:]}")
        return proc

    def popen(self, argv: list[str], cwd=None, **kw) -> subprocess.Popen:
        """In a session of its own unless told otherwise: a Ctrl-C meant for the caller does not reach it."""
        kw.setdefault("start_new_session", True)
        return self.track(subprocess.Popen(self.cmd(argv, cwd), **kw))

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        """``proc`` (started elsewhere from ``cmd()``) and its descendants are stopped by ``Hosts.down()``."""
        self.started.append(proc)
        return proc

    def write_hosts(self, lines: dict[str, str]) -> None:
        """Rewrite this host's /etc/hosts in place (it is bind-mounted: a new file would not be seen)."""
        text = "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in lines.items())
        with open(self.etc / "hosts", "r+") as f:
            f.truncate(0)
            f.write(text)

    def processes(self) -> list[psutil.Process]:
        """What this module started on this host, with its descendants, the holder last."""
        found = [p for proc in [*self.started, self.holder] for p in tree(proc)]
        return list({p.pid: p for p in found}.values())


@dataclass(frozen=True)
class Layout:
    """Where the hosts' processes and addresses are, read from ``/proc/<pid>/ns/net``, ``ip addr`` and name
    lookups on each host (its own /etc/hosts) at one moment."""

    own_netns: str  # this process's network namespace
    own_addrs: set[str]  # and the IPv4 addresses configured in it
    netns: dict[str, set[str]]  # host -> the namespaces of the processes started there (holder included)
    addrs: dict[str, set[str]]  # host -> the IPv4 addresses configured in its namespace
    resolved: dict[str, dict[str, str]]  # host -> {every host's name: the address it resolves to there}

    @property
    def mode(self) -> str:
        """"netns" when each host's processes are in one namespace, neither this process's nor another host's,
        and every name resolves, on every host, to an address of that name's host and not of this process's
        namespace; "shared" otherwise."""
        spaces = [ns for host in self.netns.values() for ns in host]
        isolated = (len(spaces) == len(set(spaces)) == len(self.netns) and self.own_netns not in spaces
                    and all(addr in self.addrs[name] and addr not in self.own_addrs
                            for names in self.resolved.values() for name, addr in names.items()))
        return "netns" if isolated else "shared"


@dataclass
class Hosts:
    """``names`` become hosts with addresses ``subnet.1``, ``subnet.2``, ... on one bridged link."""

    work: Path
    names: list[str] = field(default_factory=lambda: ["node1", "node2"])
    subnet: str = "10.91.0"
    hosts: dict[str, Host] = field(default_factory=dict)
    _switch: Host | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self):
        return iter(self.hosts.values())

    @property
    def ssh_dir(self) -> Path:
        return self.work / "ssh"

    def layout(self) -> Layout:
        def resolve(host: Host, name: str) -> str:
            return host.run(["getent", "ahostsv4", name]).stdout.split()[0]

        return Layout(_netns(os.getpid()), addresses(),
                      netns={h.name: {_netns(p.pid) for p in h.processes()} for h in self},
                      addrs={h.name: addresses(h) for h in self},
                      resolved={h.name: {n: resolve(h, n) for n in self.hosts} for h in self})

    @property
    def mode(self) -> str:
        """"netns" or "shared", measured now (``Layout.mode``)."""
        return self.layout().mode

    # ------------------------------------------------------------------ bring-up
    def up(self) -> "Hosts":
        check_can_host()
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._keys()
            holder = self._holder("switch", None)
            self._switch = Host("switch", "", holder, self.work)
            self._wait_ready(holder, "switch")
            self.hosts = {name: self._host(name, f"{self.subnet}.{i}") for i, name in enumerate(self.names, 1)}
            for host in self:
                self._link(host)
                host.write_hosts({h.name: h.addr for h in self})
                host.popen([SSHD, "-D", "-e", "-f", self.ssh_dir / "sshd_config"], stdout=subprocess.DEVNULL,
                           stderr=open(self.work / f"sshd-{host.name}.log", "w"))
            self._wait_for_ssh()
        except BaseException:
            self.down()
            raise
        return self

    def _keys(self) -> None:
        d = self.ssh_dir
        d.mkdir(exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            if not (d / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nListenAddress 0.0.0.0\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nMaxStartups 100\nLogLevel ERROR\n")
        # what every host's ssh client reads (bind-mounted over /etc/ssh/ssh_config on the hosts only)
        (d / "ssh_config").write_text(
            f"Host *\n  IdentityFile {d / 'id_ed25519'}\n  StrictHostKeyChecking no\n"
            f"  UserKnownHostsFile {d / 'known_hosts'}\n  BatchMode yes\n  ConnectTimeout 10\n  LogLevel ERROR\n")

    def _holder(self, name: str, etc: Path | None) -> subprocess.Popen:
        """A process in new namespaces; for a host it sets the hostname, a private /run, its own /etc/hosts and
        the test ssh client config, then waits. ``nsenter`` joins other processes to it."""
        ready = self.work / f"{name}.ready"
        ready.unlink(missing_ok=True)
        setup = "ip link set lo up"
        if etc is not None:
            setup += (f"; hostname {name}; mount -t tmpfs -o mode=755 tmpfs /run; mkdir -p /run/sshd /run/munge"
                      f"; mount --bind {etc / 'hosts'} /etc/hosts"
                      f"; mount --bind {self.ssh_dir / 'ssh_config'} /etc/ssh/ssh_config")
        script = f"set -e; {setup}; echo ok > {ready}; exec sleep infinity"
        return subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                                 script], stdout=subprocess.DEVNULL, stderr=open(self.work / f"{name}.log", "w"),
                                start_new_session=True)

    def _wait_ready(self, holder: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + 30
        while not (self.work / f"{name}.ready").exists():
            if holder.poll() is not None or time.monotonic() > deadline:
                raise HostsUnavailable(f"host {name} did not come up: "
                                       f"{(self.work / f'{name}.log').read_text().strip()[-500:]}")
            time.sleep(0.02)

    def _host(self, name: str, addr: str) -> Host:
        etc = self.work / "etc" / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        holder = self._holder(name, etc)
        self._wait_ready(holder, name)
        return Host(name, addr, holder, etc)

    def _link(self, host: Host) -> None:
        """A veth pair: ``eth1`` on the host, its peer a port of the switch's bridge."""
        port = f"p-{host.name}"[:15]
        sw = self._switch
        if sw.run(["ip", "link", "show", "br0"], check=False).returncode != 0:
            sw.run(["ip", "link", "add", "br0", "type", "bridge"])
            sw.run(["ip", "link", "set", "br0", "up"])
        sw.run(["ip", "link", "add", port, "type", "veth", "peer", "name", INTERFACE, "netns", str(host.pid)])
        sw.run(["ip", "link", "set", port, "master", "br0", "up"])
        host.run(["ip", "addr", "add", f"{host.addr}/24", "dev", INTERFACE])
        host.run(["ip", "link", "set", INTERFACE, "up"])

    def _wait_for_ssh(self) -> None:
        first = next(iter(self))
        deadline = time.monotonic() + 30
        for host in self:
            while True:
                probe = first.run(["ssh", host.name, "hostname"], check=False, timeout=20)
                if probe.returncode == 0 and probe.stdout.strip() == host.name:
                    break
                if time.monotonic() > deadline:
                    raise HostsUnavailable(f"sshd on {host.name} does not answer: {probe.stderr.strip()[-300:]} "
                                           f"{(self.work / f'sshd-{host.name}.log').read_text()[-300:]}")
                time.sleep(0.2)

    # ------------------------------------------------------------------ teardown
    def _all(self) -> list[Host]:
        return [*self.hosts.values(), *([self._switch] if self._switch else [])]

    def processes(self) -> list[psutil.Process]:
        """Every process this module started (the switch's holder included), with its descendants."""
        return [p for host in self._all() for p in host.processes()]

    def down(self) -> None:
        """Stop what this module started on the hosts (sshd, its sessions, daemons, commands, everything they
        started), then the hosts and the switch; reap them."""
        stop_processes(self.processes())
        for host in self._all():
            for proc in [*host.started, host.holder]:
                proc.wait()
        self.hosts, self._switch = {}, None


def stop_processes(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)

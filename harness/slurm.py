"""A Slurm cluster on the test hosts (hosts.py), from Debian's packages: munged on every host, MariaDB, slurmdbd
and slurmctld on the first, slurmd on each (one CPU per node). Accounting is real because submitit polls
``sacct``. Configuration lives in the cluster's own directory, bind-mounted over ``/etc/slurm`` on the hosts
only; every daemon is started here and stopped by its pid (with its descendants), jobs first.

``sbatch``, ``squeue``, ``sacct`` and ``scontrol`` work on the hosts as on a login node: run them with
``cluster.run(["squeue"])`` or from a process started on a host.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .hosts import Host, Hosts, HostsUnavailable, stop_processes, tree

DEBIAN_PACKAGES = "slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
DAEMONS = {"munged": "/usr/sbin/munged", "mariadbd": "/usr/sbin/mariadbd", "slurmdbd": "/usr/sbin/slurmdbd",
           "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLUSTER = "dsrtest"
REQUEUE_DELAY_S = 5  # AuthInfo=cred_expire: how long a requeued job waits before it may start again (Slurm: 120)
KILL_WAIT_S = 30  # SIGTERM to SIGKILL when a job is cancelled, requeued or out of time (Slurm's default)


def slurm_conf(d: Path, hosts: list[Host]) -> str:
    first = hosts[0]
    nodes = "".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=1 RealMemory=2000 State=UNKNOWN\n" for h in hosts)
    return f"""ClusterName={CLUSTER}
SlurmctldHost={first.name}({first.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire={REQUEUE_DELAY_S}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={first.name}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait={KILL_WAIT_S}
MinJobAge=3600
InactiveLimit=0
JobRequeue=1
SlurmctldDebug=info
SlurmdDebug=info
{nodes}PartitionName=debug Nodes={','.join(h.name for h in hosts)} Default=YES MaxTime=INFINITE State=UP
"""


def slurmdbd_conf(d: Path, host: Host, db_port: int) -> str:
    return f"""AuthType=auth/munge
DbdHost={host.name}
DbdPort=6819
SlurmUser=root
PidFile={d}/slurmdbd.pid
LogFile={d}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""


@dataclass
class SlurmCluster:
    hosts: Hosts
    work: Path
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def login(self) -> Host:
        return next(iter(self.hosts))

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm command on the first host, as typed on a login node."""
        return self.login.run(argv, check=check, **kw)

    # ------------------------------------------------------------------ bring-up
    def up(self) -> "SlurmCluster":
        missing = [name for name, path in DAEMONS.items() if not Path(path).is_file()]
        if missing:
            raise HostsUnavailable(f"the Slurm tests need {', '.join(missing)}: apt-get install {DEBIAN_PACKAGES}")
        d = self.work
        for sub in ("etc", "state", "log", "db", "munge", *(f"spool/{h.name}" for h in self.hosts)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        hosts = list(self.hosts)
        (d / "etc" / "slurm.conf").write_text(slurm_conf(d, hosts))
        (d / "etc" / "slurmdbd.conf").write_text(slurmdbd_conf(d, self.login, 3306))
        (d / "etc" / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable one (it holds a password)
        (d / "etc" / "plugstack.conf").write_text("")
        key = d / "munge" / "munge.key"
        key.write_bytes(Path("/dev/urandom").open("rb").read(1024))
        key.chmod(0o600)
        try:
            for h in hosts:
                h.run(["mount", "--bind", str(d / "etc"), "/etc/slurm"])
                self._daemon(h, "munged", ["/usr/sbin/munged", "-F", "-f", f"--key-file={key}",
                                           f"--log-file={d}/log/munged-{h.name}.log", f"--seed-file={d}/munge/seed-{h.name}",
                                           "--pid-file=/run/munge/munged.pid"])
            self._database()
            self._daemon(self.login, "slurmdbd", ["/usr/sbin/slurmdbd", "-D"])
            self._until(lambda: self.run(["sacctmgr", "-i", "add", "cluster", CLUSTER], check=False).returncode == 0
                        or self._cluster_known(), "slurmdbd to accept the cluster")
            self._daemon(self.login, "slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"])
            for h in hosts:
                self._daemon(h, "slurmd", ["/usr/sbin/slurmd", "-D"])
            self._until(self._nodes_idle, "both slurmd to register as idle")
        except BaseException:
            self.down()
            raise
        return self

    def _daemon(self, host: Host, name: str, argv: list[str]) -> None:
        log = open(self.work / "log" / f"{name}-{host.name}.out", "w")
        proc = host.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.daemons.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise HostsUnavailable(f"{name} on {host.name} exited at once: "
                                   f"{(self.work / 'log' / f'{name}-{host.name}.out').read_text()[-500:]}")

    def _database(self) -> None:
        d = self.work / "db"
        subprocess.run(["mariadb-install-db", f"--datadir={d / 'data'}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True)
        sock = d / "mysqld.sock"
        self._daemon(self.login, "mariadbd", [
            "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={d / 'data'}", f"--socket={sock}", "--port=3306",
            "--bind-address=127.0.0.1", "--user=root", f"--pid-file={d / 'mysqld.pid'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--skip-log-bin"])
        sql = ("CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' "
               "IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        self._until(lambda: subprocess.run(["mariadb", "-S", str(sock), "-e", sql], capture_output=True).returncode
                    == 0, "MariaDB to take the accounting database")

    def _cluster_known(self) -> bool:
        out = self.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], check=False).stdout
        return CLUSTER in out.split()

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(h.name) == "idle" for h in self.hosts)

    def _until(self, ok, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.daemons):
                logs = "; ".join(f"{p.name}: {p.read_text()[-300:]}" for p in sorted((self.work / "log").iterdir()))
                raise HostsUnavailable(f"waited {timeout:.0f} s for {what}: {logs}")
            time.sleep(0.3)

    # ------------------------------------------------------------------ jobs
    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job the controller knows."""
        out = self.run(["squeue", "-h", "-o", "%i %T"], check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job_field(self, job: str, name: str) -> str:
        text = self.run(["scontrol", "show", "job", job]).stdout
        m = re.search(rf"\b{name}=(\S*)", text)
        return m.group(1) if m else ""

    @contextlib.contextmanager
    def held(self, partition: str = "debug"):
        """Jobs submitted meanwhile stay queued (a DOWN partition takes jobs but starts none), so a test sees them
        queued however fast they would have run; they start when it ends."""
        self.run(["scontrol", "update", f"PartitionName={partition}", "State=DOWN"])
        try:
            yield
        finally:
            self.run(["scontrol", "update", f"PartitionName={partition}", "State=UP"], check=False)

    def wait_for_state(self, job: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.job_field(job, "JobState")) not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} is {state}, not {states}, after {timeout:.0f} s")
            time.sleep(0.5)
        return state

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        """Cancel every job and wait for its processes, then stop the daemons by their pids, slurmd first."""
        try:
            if self.jobs():
                self.run(["scancel", "--full", "--signal=KILL", "-u", "root"], check=False)
                deadline = time.monotonic() + 30
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        except (OSError, subprocess.SubprocessError, HostsUnavailable):
            pass
        for proc in reversed(self.daemons):
            stop_processes(tree(proc))  # with what it adopted (hosts.py: SUBREAPER), e.g. a slurmstepd left over
            proc.wait()
        self.daemons = []

"""One job per run directory: rank 0 holds an OS lock on ``<run>/.lock`` from before it writes anything there to the
end of training, and the file names the holder (host, pid, command, start), so a second job started on the same
directory names it and exits, having changed nothing.

The lock is ``flock``: the kernel drops it when the holder's process ends however it ends (SIGKILL included), so a
killed job never leaves it stuck, and on NFS (v4, or v3 with lockd) Linux carries it to the server, so a job on
another host sees it too. Where the filesystem has no locks at all (some Lustre mounts without ``-o flock``), the
file's content decides: a holder on this host whose process is gone is stale; one on another host cannot be checked
from here, and the message says how to clear it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil

from .errors import ConfigError

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Held while the object lives (or until :meth:`release`); see the module docstring."""

    def __init__(self, path: Path, fd: int, created: tuple[Path, ...], previous: bytes):
        self.path, self._fd, self._created, self._previous = path, fd, created, previous

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Create ``run_dir`` if needed and take its lock, or raise ConfigError naming the job that holds it."""
        created = tuple(p for p in (run_dir, run_dir / LOCK_FILE) if not p.exists())
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{run_dir} is in use by {_describe(_read(path))}; wait for that job to end (or stop "
                              "it), or choose another --run-dir") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            holder = _read(path)  # no locks on this filesystem: the recorded holder decides
            if holder and _may_be_alive(holder):
                os.close(fd)
                raise ConfigError(f"{run_dir} is in use by {_describe(holder)} (this filesystem has no locks: if "
                                  f"that job is gone, delete {path}); or choose another --run-dir") from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
        previous = path.read_bytes()  # an earlier job's record, put back if this one is refused (abandon)
        _rewrite(fd, (json.dumps(record) + "\n").encode())
        return cls(path, fd, created, previous)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def abandon(self) -> None:
        """Release, and undo what taking the lock did (the lock file created, or the earlier job's record put back;
        the directory removed if it was created and is still empty): a job refused before it wrote anything
        leaves the run directory as it found it."""
        if self._fd < 0:
            return
        if self.path not in self._created:
            _rewrite(self._fd, self._previous)
        for path in reversed(self._created):  # the file, then the directory
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass
        self.release()

    def __del__(self) -> None:
        self.release()


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another job (it has not recorded itself yet)"
    command = holder.get("command", "?")
    command = command if len(command) <= 100 else command[:97] + "..."
    return (f"another job: {command} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _may_be_alive(holder: dict) -> bool:
    """Whether a recorded holder could still be running: on this host, its process; elsewhere, unknowable."""
    if holder.get("host") != socket.gethostname():
        return True
    return isinstance(holder.get("pid"), int) and psutil.pid_exists(holder["pid"])

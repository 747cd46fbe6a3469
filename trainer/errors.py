"""Errors that reach the user as one line, never as a traceback."""

import errno


class UserError(Exception):
    """A problem the user can fix; its message names what is wrong and what to do."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class HostError(ConfigError):
    """A problem of the raising rank's own host (its network, its view of the files): said by that rank even
    before the job can tell the ranks' errors apart, since the others do not share it."""


# Filesystem errors while creating or writing a run or sweep directory, in plain words, with what to do
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another --run-dir / sweep_dir"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or choose another --run-dir / sweep_dir"),
    errno.EROFS: ("the file system is read-only", "choose a writable --run-dir / sweep_dir"),
    errno.EACCES: ("permission denied", "choose a directory you may write, or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a directory you may write, or fix its permissions"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter --run-dir / sweep name"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another --run-dir / sweep_dir"),
    errno.EISDIR: ("a directory is in the way of a file", "choose another --run-dir / sweep_dir"),
    errno.EIO: ("the device reported an input/output error", "check the disk, or choose another --run-dir"),
}


def describe_os_error(e: OSError, where: str | None = None) -> str | None:
    """``cannot write PATH: CAUSE; WHAT TO DO`` for a filesystem error (None for any other OSError, e.g. a lost
    connection). ``where`` names the place when the error itself names no path (a write into an open file)."""
    if isinstance(e, ConnectionError) or e.errno not in _OS_ERRORS:
        return None
    cause, advice = _OS_ERRORS[e.errno]
    path = e.filename or where or "the run directory"
    return f"cannot write {path}: {cause}; {advice} (files written before are kept)"

"""Errors that reach the user as one line, never as a traceback."""


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

"""Errors that reach the user as one line, never as a traceback."""


class UserError(Exception):
    """A problem the user can fix; its message names what is wrong and what to do."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass

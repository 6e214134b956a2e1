"""Errors for user input: each message names the file, row or option and what to do."""


class DiffmedError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(DiffmedError):
    pass


class DataError(DiffmedError):
    pass


class RunError(DiffmedError):
    pass

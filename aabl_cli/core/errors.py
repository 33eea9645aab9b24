"""Errors that reach the user as one line and an exit code, never as a traceback."""


class AablError(Exception):
    """Bad usage or bad input: the message says what is wrong and how to fix it (exit 2)."""

    exit_code = 2


class RuntimeFault(AablError):
    """The environment failed (disk full, permission denied, device missing): exit 1."""

    exit_code = 1


class GateFailed(Exception):
    """A CI gate of `split` tripped after every output was written (exit 3)."""

    exit_code = 3

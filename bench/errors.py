"""The errors the command line reports as one line: a problem the user can fix (exit status 2), or a
run that stopped itself (exit status 1). Each stage's own error derives from one of these."""


class UserError(Exception):
    """A bad input or a missing file, reported as ``error: ...`` on one line; exit status 2."""


class RunStopped(RuntimeError):
    """A run that stopped itself with its files written, reported on one line; exit status 1."""

"""The one exception type that means "the user gave us something wrong".

The CLI prints an ``EdgekitError`` as a single ``error: ...`` line and exits 1;
anything else is a bug and shows a traceback only with ``--debug``.
"""


class EdgekitError(Exception):
    """A failure the user can act on: bad input, a failed check, a missing tool."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name when empty)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """The last non-blank line: TVM and MetaSchedule print the cause after their traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__

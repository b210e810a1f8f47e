"""The one exception type that means "the user gave us something wrong".

The CLI prints an ``EdgekitError`` as a single ``error: ...`` line and exits 1;
anything else is a bug and shows a traceback only with ``--debug``.
"""


class EdgekitError(Exception):
    """A failure the user can act on: bad input, a failed check, a missing tool."""

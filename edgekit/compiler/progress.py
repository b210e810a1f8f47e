"""How the backend reports its steps: a callback taking one line (the CLI shows it as status)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def no_progress(_: str) -> None:
    pass

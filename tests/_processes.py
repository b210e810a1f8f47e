"""Waiting on the output of a real process the tests started (trackers, device servers)."""

from __future__ import annotations

import selectors
import subprocess
import time


def wait_line(proc: subprocess.Popen, word: str, seen: list[str] | None = None,
              timeout: float = 60.0) -> str:
    """The first stdout line of ``proc`` containing ``word``; the lines before it go to
    ``seen``. Fails on exit or timeout, with what it saw and, once the process has ended,
    the end of its stderr."""
    seen = [] if seen is None else seen
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if word in line:
                return line
            if not line:
                break
            seen.append(line)
    err = proc.stderr.read()[-500:] if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"{proc.args[-4:]} did not print {word!r} (saw {seen}): {err}")

"""One private temporary directory per edgekit command, removed when the command ends.

TVM and MetaSchedule make their temporary files through Python's ``tempfile`` and ``TMPDIR``
(object files while linking, the tuning workers' folders, the C compiler's own files). A
signal that lands while TVM builds one of its ``TempDirectory`` objects leaves the folder
behind (the half-built object cannot clean up), and SIGKILL leaves all of them. Pointing
``tempfile`` and ``TMPDIR`` at a folder of our own that a ``finally`` removes catches every
such file, whatever TVM was doing; the next command removes the folders of edgekit processes
that are gone (``kill -9``). Processes are matched by host name and pid, so a shared /tmp
between machines or containers never loses a live process's files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_PREFIX = "edgekit-run"
_NAME = re.compile(rf"^{_PREFIX}\.(?P<host>[^.]+)-(?P<pid>\d+)\.")


def host_name() -> str:
    """This machine's name as it appears in the names of edgekit's temporary folders."""
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(base: Path) -> list[Path]:
    """Remove the private temporary folders of edgekit processes on this host that are gone."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            m = _NAME.match(entry.name)
            if (m and m["host"] == host_name() and not process_alive(int(m["pid"]))
                    and entry.is_dir(follow_symlinks=False)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """Run the block with ``tempfile`` and ``TMPDIR`` pointing at a fresh private folder."""
    base = Path(tempfile.gettempdir())
    remove_stale(base)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}.{host_name()}-{os.getpid()}.", dir=base))
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)

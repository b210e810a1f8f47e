"""Write artifacts atomically: stage in a sibling temp directory, then rename into place.

Layout of ``NAME.edgekit/``: ``manifest.json``, ``model.so`` (the compiled library, for the
target's machine), ``model.onnx`` (exactly what was compiled, for baselines and rebuilds).
The manifest lists the sha256 of every other file; ``edgekit.runtime.load`` checks them.

A staging directory is named ``.NAME.HOST-PID.XXXX.staging`` so that the next compile into the
same folder can tell one whose process was killed (SIGKILL, a power cut) from one still being
written, and remove only the former. An existing artifact is replaced by exchanging the two
directories in one ``renameat2(RENAME_EXCHANGE)`` call, so its name never goes missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.manifest import LIBRARY, MANIFEST, SCHEMA_VERSION, sha256_file
from edgekit.scratch import host_name, process_alive

ONNX_FILE = "model.onnx"
_STAGING = re.compile(r"^\..+\.(?P<host>[^.]*)-(?P<pid>\d+)\.[^.]+(\.old)?\.staging$")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def versions() -> dict[str, str]:
    """Versions of the tools that made an artifact."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgekit", "apache-tvm", "onnx", "onnxruntime", "torch", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging directories in ``folder`` left by edgekit processes on this host that
    no longer run; returns what was removed. Others' (running, or another host's) stay."""
    removed = []
    host = host_name()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _STAGING.match(entry.name)
            if (m and m["host"] == host and not process_alive(int(m["pid"]))
                    and entry.is_dir(follow_symlinks=False)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``out``; it is removed unless ``publish`` moved it.
    Stale staging directories of killed runs in the same folder are removed first."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file():
        raise EdgekitError(f"{out} exists and is not an edgekit artifact; not overwriting it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{host_name()}-{os.getpid()}.",
                                    suffix=".staging", dir=out.parent))
    except OSError as exc:
        raise EdgekitError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2``); False where the C
    library or the file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: Path, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add digests and the manifest to the staged directory and move it to ``out``: an
    existing artifact is swapped out in one step (two renames only where the system cannot
    exchange), then deleted."""
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        **manifest,
        "files": {name: sha256_file(tmp / name) for name in files},
    }
    staged = tmp / f".{MANIFEST}.tmp"
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    staged.rename(tmp / MANIFEST)
    tmp.chmod(0o777 & ~_umask())  # mkdtemp made it 0700; an artifact is as readable as a file
    out = Path(out)
    if out.exists() or out.is_symlink():
        if _exchange(tmp, out):
            _remove(tmp)  # now the old artifact
            return manifest
        old = tmp.with_name(tmp.name[:-len(".staging")] + ".old.staging")
        out.rename(old)
        tmp.rename(out)
        _remove(old)
        return manifest
    tmp.rename(out)
    return manifest


__all__ = ["LIBRARY", "MANIFEST", "ONNX_FILE", "publish", "remove_stale_staging", "staging",
           "versions"]

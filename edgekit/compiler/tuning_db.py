"""Where tuning records live, how they are keyed, and reading and writing them safely.

One directory per target: ``<root>/<target key>/``, root ``$EDGEKIT_TUNING_DB`` or
``$XDG_CACHE_HOME/edgekit/tuning`` (default ``~/.cache/edgekit/tuning``); an explicit
``--tuning-db DIR`` is used as it is. The target key hashes the resolved TVM target (the CPU
LLVM detected, the core count) and the TVM version, since records are TIR traces. Inside, the
files of a MetaSchedule JSON database key each record by the structural hash of its kernel, so
any later compile for the same target whose model shares a kernel (same op, shapes, dtypes,
constants folded the same way) reuses the record.

Why edgekit reads and writes those files itself: the default database is shared by every
process of a user (two CI jobs, two terminals), and MetaSchedule's ``JSONDatabase`` assumes it
is alone. It appends without a lock, numbers workloads per process (a record names its kernel
by line number in the workload file), and refuses the whole database on one torn line
("Unexpected end of string"). So here:

- every write holds an exclusive ``fcntl`` lock on ``.edgekit.lock`` (readers a shared one);
- a line is appended with one ``write`` of the whole line, after a newline if the file ends
  in a torn fragment, so a record is whole or absent and never glued to a fragment;
- a record's workload index is looked up (or appended) in the file under that lock, so it
  means the same line for every process;
- the reader skips a torn or foreign line (and a record whose workload line is bad), reports
  each one, and keeps everything else; ``repair`` rewrites the files without them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target

_WORKLOADS = "database_workload.json"
_RECORDS = "database_tuning_record.json"
_LOCK = ".edgekit.lock"
_log = logging.getLogger("edgekit.tuning_db")


def default_root() -> Path:
    """``$EDGEKIT_TUNING_DB`` or the user's cache directory + ``edgekit/tuning``."""
    if os.environ.get("EDGEKIT_TUNING_DB"):
        return Path(os.environ["EDGEKIT_TUNING_DB"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "edgekit" / "tuning"


def target_key(target: Target) -> str:
    """A short stable hash of the resolved TVM target (the CPU LLVM detected, the core count)
    and the TVM version (records are TIR traces)."""
    import tvm

    text = json.dumps({"tvm": str(target.tvm_target()), "version": tvm.__version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def db_dir(target: Target, root: str | Path | None = None) -> Path:
    """The database directory: ``root`` when given, else ``default_root()/target_key``."""
    return Path(root).expanduser() if root is not None else default_root() / target_key(target)


def has_records(db: Path) -> bool:
    f = db / _RECORDS
    return f.is_file() and f.stat().st_size > 0


@contextlib.contextmanager
def locked(db: Path, exclusive: bool = True) -> Iterator[None]:
    """Hold ``db/.edgekit.lock``: exclusive for writers, shared for readers (so a reader never
    sees a line half appended). A read-only database is read without a lock."""
    try:
        if exclusive:
            db.mkdir(parents=True, exist_ok=True)
        fd = os.open(db / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exclusive or exc.errno not in (errno.ENOENT, errno.EACCES, errno.EROFS):
            raise EdgekitError(f"cannot use tuning database {db}: "
                               f"{exc.strerror or exc}") from None
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BadLine:
    """A line of the database that was skipped, and why."""

    file: str
    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.reason}"


def _lines(path: Path) -> list[bytes]:
    """The file's lines; a last line without its newline is kept (it is torn unless whole)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise EdgekitError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return _TORN


_TORN = object()


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Contents:
    """What ``read`` found: an in-memory database of the good records, the skipped lines, and
    the good lines themselves (workloads deduplicated, record indexes renumbered to match)."""

    database: object  # ms.database.MemoryDatabase
    bad: list[BadLine]
    workload_lines: list[bytes]
    record_lines: list[bytes]


def read(db: Path, lock: bool = True) -> Contents:
    """Parse both files (under a shared lock unless the caller holds the lock), keeping every
    good record and skipping torn or foreign lines: not JSON, not MetaSchedule's shape, not
    parseable by TVM, or a record whose workload line is bad or whose arguments do not match
    that workload."""
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase()
    bad: list[BadLine] = []
    with locked(db, exclusive=False) if lock else contextlib.nullcontext():
        wl_raw, rec_raw = _lines(db / _WORKLOADS), _lines(db / _RECORDS)
    workloads: list = []  # per line: (Workload, its argument signature, new index) or None
    out_wl: list[bytes] = []
    seen: list = []  # (canonical Workload, new index): structurally equal lines share one
    for i, raw in enumerate(wl_raw):
        entry = None
        obj = _json(raw)
        if obj is _TORN:
            bad.append(BadLine(_WORKLOADS, i + 1, "torn (not whole JSON)"))
        elif not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str)
                                                                   for x in obj)):
            bad.append(BadLine(_WORKLOADS, i + 1, "foreign (not a [hash, module] pair)"))
        else:
            try:
                work = mem.commit_workload(ms.database.Workload.from_json(obj).mod)
                args = _signature(ms.arg_info.ArgInfo.from_prim_func(work.mod["main"]))
            except Exception as exc:  # noqa: BLE001 - anything TVM cannot read is foreign
                bad.append(BadLine(_WORKLOADS, i + 1, f"foreign ({last_line(exc)})"))
            else:
                idx = next((j for known, j in seen if known.same_as(work)), len(out_wl))
                if idx == len(out_wl):
                    seen.append((work, idx))
                    out_wl.append(raw)
                entry = (work, args, idx)
        workloads.append(entry)
    out_rec: list[bytes] = []
    for i, raw in enumerate(rec_raw):
        obj = _json(raw)
        if obj is _TORN:
            bad.append(BadLine(_RECORDS, i + 1, "torn (not whole JSON)"))
            continue
        if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
                and isinstance(obj[1], list)):
            bad.append(BadLine(_RECORDS, i + 1, "foreign (not a [workload, record] pair)"))
            continue
        if not 0 <= obj[0] < len(workloads) or workloads[obj[0]] is None:
            bad.append(BadLine(_RECORDS, i + 1, f"its workload (line {obj[0] + 1} of "
                                                f"{_WORKLOADS}) is missing or bad"))
            continue
        work, args, idx = workloads[obj[0]]
        try:
            record = ms.database.TuningRecord.from_json(obj[1], work)
        except Exception as exc:  # noqa: BLE001
            bad.append(BadLine(_RECORDS, i + 1, f"foreign ({last_line(exc)})"))
            continue
        if record.args_info is not None and _signature(record.args_info) != args:
            bad.append(BadLine(_RECORDS, i + 1, "its arguments do not match its workload "
                                                f"(line {obj[0] + 1} of {_WORKLOADS})"))
            continue
        mem.commit_tuning_record(record)
        out_rec.append(_dumps([idx, obj[1]]))
    return Contents(mem, bad, out_wl, out_rec)


def _signature(args_info) -> str:
    return json.dumps([a.as_json() for a in args_info], default=str)


def report(db: Path, bad: list[BadLine]) -> None:
    """One warning line (stderr unless the application configures logging) per database."""
    if bad:
        shown = "; ".join(str(b) for b in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        _log.warning("warning: tuning database %s: skipped %d bad line(s) (%s); "
                     "`edgekit tune --repair --tuning-db %s` rewrites it without them",
                     db, len(bad), shown, db)


def open_database(db: Path, quiet: bool = False):
    """The records in ``db`` as a MetaSchedule database (the directory is created when
    missing). Commits go to the files under the lock; bad lines are skipped and reported."""
    try:
        db.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgekitError(f"cannot use tuning database {db}: {exc.strerror or exc}") from None
    contents = read(db)
    if not quiet:
        report(db, contents.bad)
    return shared_database(db, contents.database)


def _append(path: Path, line: bytes) -> None:
    """Append one whole line with one ``write`` (the caller holds the lock); a torn fragment
    at the end of the file first gets its newline, so the new line stays whole."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        data = memoryview((b"\n" if torn else b"") + line + b"\n")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _workload_index(db: Path, line: bytes, workload) -> int:
    """The line number of this workload in the file, appended when absent (lock held): the
    same line, or a line with the same structural hash whose module is structurally equal
    (the same kernel from another model may serialize differently)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi import structural_equal

    lines = _lines(db / _WORKLOADS)
    with contextlib.suppress(ValueError):
        return lines.index(line)
    prefix = line[:line.index(b",") + 1]  # ["<structural hash>",
    for i, other in enumerate(lines):
        if not other.startswith(prefix):
            continue
        try:
            mod = ms.database.Workload.from_json(json.loads(other)).mod
        except Exception:  # noqa: BLE001 - a bad line is no match
            continue
        if structural_equal(mod, workload.mod):
            return i
    _append(db / _WORKLOADS, line)
    return len(lines)


def commit(db: Path, workload, record=None) -> None:
    """Write a workload (and a record of it) to the files: lock, look up or append the
    workload's line, append the record naming that line."""
    line = _dumps(workload.as_json())
    try:
        with locked(db):
            idx = _workload_index(db, line, workload)
            if record is not None:
                _append(db / _RECORDS, _dumps([idx, record.as_json()]))
    except OSError as exc:
        raise EdgekitError(f"cannot write tuning database {db}: "
                           f"{exc.strerror or exc}") from None


def shared_database(db: Path, mem):
    """A MetaSchedule ``PyDatabase``: queries answered from memory, commits written through
    to the files (``commit``)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import PyDatabase

    @derived_object
    class _Shared(PyDatabase):
        def has_workload(self, mod) -> bool:
            return mem.has_workload(mod)

        def commit_workload(self, mod):
            known = mem.has_workload(mod)
            work = mem.commit_workload(mod)
            if not known:
                commit(db, work)
            return work

        def commit_tuning_record(self, record) -> None:
            mem.commit_tuning_record(record)
            commit(db, record.workload, record)

        def get_top_k(self, workload, top_k: int):
            return mem.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return mem.get_all_tuning_records()

        def query_tuning_record(self, mod, target, workload_name):
            return mem.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod, target, workload_name):
            return mem.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name):
            return mem.query_ir_module(mod, target, workload_name)

        def __len__(self) -> int:
            return len(mem)

    return _Shared()


def repair(db: Path) -> Contents:
    """Rewrite the database without its bad lines (workloads deduplicated, record indexes
    renumbered), each file replaced atomically under the lock. Returns what was read: the
    lines kept and the bad lines dropped."""
    if not (db / _WORKLOADS).exists() and not (db / _RECORDS).exists():
        raise EdgekitError(f"no tuning database in {db}")
    with locked(db):  # no writer in between: read and replace as one step
        contents = read(db, lock=False)
        for name, lines in ((_WORKLOADS, contents.workload_lines),
                            (_RECORDS, contents.record_lines)):
            write_atomic(db / name, b"".join(line + b"\n" for line in lines))
    return contents


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a unique temp file beside ``path``, then rename it over ``path`` (keeping the
    file's mode: the database may be shared by a group)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

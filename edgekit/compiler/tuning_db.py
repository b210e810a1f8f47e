"""Where tuning records live, how they are keyed, and opening them.

One directory per target: ``<root>/<target key>/``, root ``$EDGEKIT_TUNING_DB`` or
``$XDG_CACHE_HOME/edgekit/tuning`` (default ``~/.cache/edgekit/tuning``); an explicit
``--tuning-db DIR`` is used as it is. The target key hashes the resolved TVM target (the CPU
LLVM detected, the core count) and the TVM version, since records are TIR traces. Inside, a
MetaSchedule JSON database keys each record by the structural hash of its kernel, so any later
compile for the same target whose model shares a kernel (same op, shapes, dtypes, constants
folded the same way) reuses the record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target

_WORKLOADS = "database_workload.json"
_RECORDS = "database_tuning_record.json"


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


def open_database(db: Path):
    """The MetaSchedule JSON database in ``db`` (created when missing)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        db.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(path_workload=str(db / _WORKLOADS),
                                        path_tuning_record=str(db / _RECORDS),
                                        allow_missing=True)
    except OSError as exc:
        raise EdgekitError(f"cannot use tuning database {db}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise EdgekitError(f"cannot read tuning database {db}: "
                           f"{last_line(exc)}") from None

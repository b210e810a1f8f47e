"""Memory of a model on this machine: the artifact's size on disk, and the resident memory an
engine takes to load the model and to run it, each engine measured in a fresh child process.

Definitions, in bytes, from Linux's ``/proc/self/status`` (VmRSS: resident now; VmHWM: peak
resident since the last reset; writing ``5`` to ``/proc/self/clear_refs`` resets the peak):

- ``base_rss``: resident once the engine's library is imported, its threads set and the inputs
  made, before the model is loaded (so library code counts for no engine);
- ``load``: peak while loading − ``base_rss``;
- ``run``: peak over the first ``runs`` calls − resident after loading (activations, workspace,
  lazily created pools);
- ``total``: peak over loading and the runs − ``base_rss``: what the model adds to a process;
- ``resident``: resident after the runs − ``base_rss``: what stays (a load peak above it is
  transient: bytes read for hashing, a library copy, weights unpacked).

One engine per process: memory freed by one engine is not reliably returned to the OS, and
the allocators of two engines in one process would mix. Preconditions: Linux with a writable
``/proc/self/clear_refs`` (Linux ≥ 4.0); elsewhere the RSS numbers are left out with a note.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MARK = "edgekit-memory:"  # prefixes the child's result line (libraries may print to stdout)
CHILD_TIMEOUT_S = 600


def artifact_sizes(path: str | Path, library: str) -> dict[str, int]:
    """Bytes on disk: the compiled ``library`` file and every regular file of the directory."""
    root = Path(path)
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return {"library_bytes": (root / library).stat().st_size,
            "total_bytes": sum(p.stat().st_size for p in files), "files": len(files)}


def _status(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            value, unit = line.split(":", 1)[1].split()
            return int(value) * 1024 if unit == "kB" else int(value)
    raise EdgekitError(f"{_STATUS} has no {key}")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status("VmRSS")


def peak_bytes() -> int:
    """Peak resident memory since the last ``reset_peak``."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Make the peak start again from the current resident size."""
    _CLEAR_REFS.write_text("5")


def unavailable() -> str | None:
    """Why RSS cannot be measured here, or None when it can."""
    try:
        rss_bytes()
        reset_peak()
    except (OSError, EdgekitError, ValueError) as exc:
        return f"peak RSS needs Linux's /proc/self/status and clear_refs ({exc})"
    return None


def measure_engine(load: Callable[[], Callable[[], object]], runs: int) -> dict[str, int]:
    """RSS growth of ``load()`` (which returns the call to run) and of ``runs`` first calls."""
    base = rss_bytes()
    reset_peak()
    call = load()
    load_peak = peak_bytes()
    loaded = rss_bytes()
    reset_peak()
    for _ in range(runs):
        call()
    run_peak = peak_bytes()
    # Linux syncs a thread's RSS counters into VmHWM lazily (every 64 page faults), so a later
    # VmRSS reading can exceed the peak by a few pages: the peaks are floored at the readings.
    after = rss_bytes()
    load_peak, run_peak = max(load_peak, loaded), max(run_peak, loaded, after)
    return {"base_rss_bytes": base, "load_bytes": load_peak - base,
            "run_bytes": run_peak - loaded, "total_bytes": max(load_peak, run_peak) - base,
            "resident_bytes": after - base, "runs": runs}


def run_child(code: str, spec: dict[str, Any], timeout: float = CHILD_TIMEOUT_S
              ) -> tuple[dict[str, Any] | None, str]:
    """Run ``python -c code`` with ``spec`` as JSON on stdin; (its result, "") or (None, why).
    The child prints its result as one line ``MARK<json>``."""
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), text=True,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"the child process ran past {timeout:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]), ""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return None, (lines[-1] if lines else f"the child process exited with {proc.returncode}")


def emit(result: dict[str, Any]) -> None:
    """The child's side of ``run_child``."""
    print(MARK + json.dumps(result), flush=True)


def mib(n: float | None) -> str:
    """Bytes as MiB for tables ("-" when unknown)."""
    return "-" if n is None else f"{n / 2**20:.1f} MiB"

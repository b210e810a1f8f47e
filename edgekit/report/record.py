"""Turn what ``edgekit.profile`` measured into a schema-conforming run: the environment it ran
in, the phases, every per-call time, bootstrap intervals, the pass ledger, noise warnings.

``measure`` is the timing loop's front door: a fixed number of calls, a fixed duration, or
``"auto"`` (until the median's interval is tight, or a time cap). A device profile (runner,
RPC) times on the device and hands its per-call times to ``finalize_device``.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.report import stats as rstats
from edgekit.report.schema import SCHEMA_NAME, SCHEMA_VERSION

NOISY_CV = 0.10  # coefficient of variation above which a run is flagged as noisy
AUTO_CAP_S = 10.0
AUTO_REL_HALF_WIDTH = 0.01


def parse_duration(value: str | float | None) -> float | str | None:
    """``None``, seconds (``"2.5"``), ``"auto"`` or ``"auto:CAP_SECONDS"``."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = value.strip().lower()
    if text == "auto" or text.startswith("auto:"):
        if text == "auto":
            return "auto"
        try:
            cap = float(text[5:])
        except ValueError:
            cap = -1.0
        if cap <= 0:
            raise EdgekitError(f"--duration {value!r}: expected auto:SECONDS with SECONDS > 0")
        return f"auto:{cap:g}"
    try:
        seconds = float(text)
    except ValueError:
        raise EdgekitError(f"--duration {value!r}: expected seconds or 'auto'") from None
    if seconds <= 0:
        raise EdgekitError(f"--duration {value!r}: must be positive")
    return seconds


def measure(fn: Callable[[], object], warmup: int, repeat: int,
            duration: float | str | None) -> tuple[list[float], dict[str, Any]]:
    """Per-call latencies in ms and the steady phase's record (iterations, seconds, why it
    stopped)."""
    duration = parse_duration(duration)
    start = time.perf_counter()
    if isinstance(duration, str):
        cap = float(duration[5:]) if duration.startswith("auto:") else AUTO_CAP_S
        times, stopped = rstats.time_until_stable(fn, warmup, cap, AUTO_REL_HALF_WIDTH)
    else:
        times = rstats.time_calls(fn, warmup, repeat, duration)
        stopped = "duration" if duration else "repeat"
    seconds = time.perf_counter() - start
    return times, {"iterations": len(times), "seconds": round(seconds, 4), "stopped": stopped}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def environment(threads: int, manifest: dict[str, Any],
                device_key: str | None = None) -> dict[str, Any]:
    """Where and with what a run was measured."""
    from edgekit.artifact import versions

    return {
        "cpu": _cpu_model(),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count() or 1,
        "threads": threads,
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "versions": versions(),
        "built_with": {k: str(v) for k, v in manifest.get("versions", {}).items()},
        "target": manifest.get("target", {"name": "unknown"}),
        "device_key": device_key,
    }


def finalize(result: dict[str, Any], times: dict[str, list[float]],
             steady: dict[str, dict[str, Any]], manifest: dict[str, Any], warmup: int,
             device_key: str | None = None) -> dict[str, Any]:
    """Add the schema's fields to a profile result (existing keys are kept as they are)."""
    cis = {name: list(rstats.bootstrap_median_ci(t)) for name, t in times.items()}
    longest = max(len(t) for t in times.values())
    warnings = list(result.get("warnings", []))
    lat = {"edgekit": result["latency_ms"], **result.get("baselines", {})}
    for name, s in lat.items():
        if s["cv"] > NOISY_CV:
            warnings.append(f"noisy measurement: {name} latency CV is {s['cv']:.0%} (above "
                            f"{NOISY_CV:.0%}); close other programs, pin --threads, or use "
                            "--duration auto")
    for name, st in steady.items():
        if st["stopped"] == "time cap":
            lo, hi = cis[name]
            med = lat[name]["median"]
            warnings.append(f"{name}: time cap reached before the median was stable "
                            f"(95% CI ±{(hi - lo) / 2 / med:.1%} of the median)")
    head = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    out = {**head, **result}
    out["environment"] = environment(result["threads"], manifest,
                                     device_key or result.get("device_key"))
    out["phases"] = {"load_ms": result["load_ms"], "first_run_ms": result["first_run_ms"],
                     "warmup_calls": warmup, "steady": steady}
    out["times_ms"] = {k: [round(x, 6) for x in v] for k, v in times.items()}
    out["median_ci_ms"] = cis
    out["ci"] = {"level": rstats.CI_LEVEL, "method": "percentile bootstrap of the median",
                 "resamples": rstats.resamples_for(longest)}
    out["passes"] = list(manifest.get("passes") or [])
    out.setdefault("notes", [])
    out["warnings"] = warnings
    return out


def device_seconds(duration: float | str | None) -> float | None:
    """--duration for a device profile: seconds only (``auto`` needs the local timing loop)."""
    value = parse_duration(duration)
    if isinstance(value, str):
        raise EdgekitError("--duration auto is for local profiles; give seconds or --repeat")
    return value


def finalize_device(result: dict[str, Any], times_ms: list[float], manifest: dict[str, Any],
                    warmup: int, seconds: float, stopped: str,
                    device_key: str | None = None) -> dict[str, Any]:
    """Complete a profile timed on a device (runner, RPC) with the local profile's
    statistics and report fields."""
    result = {**result, "iterations": len(times_ms), "latency_ms": rstats.latency_stats(times_ms)}
    steady = {"iterations": len(times_ms), "seconds": round(seconds, 4), "stopped": stopped}
    return finalize(result, {"edgekit": times_ms}, {"edgekit": steady}, manifest, warmup,
                    device_key)

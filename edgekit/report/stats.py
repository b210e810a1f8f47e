"""The timing loop and its statistics: per-call latencies (a fixed count or duration), their
summary (min, median, percentiles, CV), confidence intervals (bootstrap of the median, of a
ratio of medians) and the stopping rule behind ``--duration auto``.

Latency samples are skewed and heavy-tailed, so intervals are distribution-free: a
percentile bootstrap (resampling the measured calls with replacement, fixed seed so a run
file always reports the same interval) for what is reported, and the binomial order-statistic
interval of the median (O(n), no resampling) for the stopping rule checked while timing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from edgekit.errors import EdgekitError

CI_LEVEL = 0.95
RESAMPLES = 2000
_MAX_DRAWS = 20_000_000  # resamples * n cap: keeps a 100k-call run's bootstrap under ~1 s
_CHUNK = 2_000_000  # draws held in memory at once


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99, max, std and CV (std/mean) of latencies in ms."""
    t = np.asarray(times_ms, dtype=np.float64)
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    return {
        "min": float(t.min()),
        "mean": mean,
        "median": float(np.median(t)),
        "p90": float(np.percentile(t, 90)),
        "p95": float(np.percentile(t, 95)),
        "p99": float(np.percentile(t, 99)),
        "max": float(t.max()),
        "std": std,
        "cv": std / mean if mean > 0 else 0.0,
    }


def time_calls(fn: Callable[[], object], warmup: int, repeat: int,
               duration: float | None = None) -> list[float]:
    """Per-call latencies in ms after ``warmup`` untimed calls: ``repeat`` calls, or as many
    as fit in ``duration`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + duration if duration else None
    while (len(times) < repeat) if deadline is None else (time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if not times:
        raise EdgekitError("no timed run completed; increase --repeat or --duration")
    return times


def resamples_for(n: int, wanted: int = RESAMPLES) -> int:
    """Bootstrap resamples used for ``n`` samples (fewer for very long runs, at least 200)."""
    return max(200, min(wanted, _MAX_DRAWS // max(n, 1)))


def _boot_medians(t: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    rows = max(1, _CHUNK // t.size)
    out = []
    for start in range(0, b, rows):
        k = min(rows, b - start)
        sample = t[rng.integers(0, t.size, size=(k, t.size))]
        lo, hi = (t.size - 1) // 2, t.size // 2  # the median's order statistics
        sample.partition((lo, hi) if hi != lo else lo, axis=1)
        out.append((sample[:, lo] + sample[:, hi]) / 2)
    return np.concatenate(out)


def bootstrap_median_ci(times: Sequence[float], level: float = CI_LEVEL,
                        resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``times``."""
    t = np.asarray(times, dtype=np.float64)
    if t.size < 2:
        m = float(t[0]) if t.size else math.nan
        return m, m
    rng = np.random.default_rng(seed)
    meds = _boot_medians(t, resamples_for(t.size, resamples), rng)
    a = (1 - level) / 2
    lo, hi = np.quantile(meds, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_ratio_ci(new: Sequence[float], old: Sequence[float], level: float = CI_LEVEL,
                       resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """median(new) / median(old) and its percentile-bootstrap interval (samples resampled
    independently: the two runs are independent measurements)."""
    a = np.asarray(new, dtype=np.float64)
    b = np.asarray(old, dtype=np.float64)
    ratio = float(np.median(a) / np.median(b))
    if a.size < 2 or b.size < 2:
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)
    n = resamples_for(max(a.size, b.size), resamples)
    r = _boot_medians(a, n, rng) / _boot_medians(b, n, rng)
    q = (1 - level) / 2
    lo, hi = np.quantile(r, [q, 1 - q])
    return ratio, float(lo), float(hi)


def order_stat_median_ci(times: Sequence[float],
                         level: float = CI_LEVEL) -> tuple[float, float]:
    """Distribution-free interval of the median from order statistics (normal approximation
    of Binomial(n, 1/2) for the ranks); cheap enough to evaluate while timing."""
    t = np.asarray(times, dtype=np.float64)
    n = t.size
    if n < 6:
        return float(t.min()), float(t.max())
    z = {0.90: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    half = z * math.sqrt(n) / 2
    lo_k = max(0, int(math.floor(n / 2 - half)) - 1)
    hi_k = min(n - 1, int(math.ceil(n / 2 + half)))
    part = np.partition(t, (lo_k, hi_k))
    return float(part[lo_k]), float(part[hi_k])


def time_until_stable(fn: Callable[[], object], warmup: int, max_seconds: float = 10.0,
                      rel_half_width: float = 0.01, min_calls: int = 30,
                      check_every: float = 0.25) -> tuple[list[float], str]:
    """Time ``fn`` until the 95% interval of the median is within ``±rel_half_width`` of the
    median (after at least ``min_calls``) or ``max_seconds`` pass. Returns the per-call
    latencies in ms and why it stopped: ``"ci"`` or ``"time cap"``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    next_check = start + check_every
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if t1 - start >= max_seconds and times:
            return times, "time cap"
        if t1 >= next_check and len(times) >= min_calls:
            next_check = t1 + check_every
            lo, hi = order_stat_median_ci(times)
            med = float(np.median(times))
            if med > 0 and (hi - lo) / 2 <= rel_half_width * med:
                return times, "ci"

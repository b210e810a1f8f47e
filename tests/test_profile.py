"""Latency statistics."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.report.stats import latency_stats, time_calls


def test_stats_against_numpy():
    t = np.arange(1, 101, dtype=float)
    s = latency_stats(t)
    assert s["min"] == 1 and s["max"] == 100 and s["median"] == 50.5
    assert s["p90"] == pytest.approx(np.percentile(t, 90))
    assert s["std"] == pytest.approx(np.std(t, ddof=1))
    assert s["cv"] == pytest.approx(s["std"] / s["mean"])


def test_time_calls_counts_and_warmup():
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, repeat=7)
    assert len(times) == 7 and len(calls) == 10 and all(t >= 0 for t in times)


def test_time_calls_duration_must_time_something():
    with pytest.raises(EdgekitError, match="no timed run"):
        time_calls(lambda: None, warmup=0, repeat=1, duration=1e-12)

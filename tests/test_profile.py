"""Latency statistics, and the memory probe's readings against allocations of known size."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.report import memory
from edgekit.report.stats import latency_stats, time_calls

MIB = 2**20


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


@pytest.mark.skipif(memory.unavailable() is not None, reason="needs Linux's clear_refs")
def test_peak_rss_growth_matches_known_allocations():
    """Loading keeps 64 MiB written; each run makes a 32 MiB temporary and frees it: the load
    and run peaks see them, what stays resident sees only the 64 MiB. In a fresh process, as
    profile measures engines: in a long-lived one glibc may have raised its mmap threshold
    (after earlier large frees), and the freed temporary then stays in the heap."""
    code = (
        "import numpy as np\n"
        "from edgekit.report import memory\n"
        "MIB = 1 << 20\n"
        "held = []\n"
        "def load():\n"
        "    held.append(np.ones(64 * MIB // 8))\n"
        "    return lambda: float(np.ones(32 * MIB // 8).sum())\n"
        "memory.emit(memory.measure_engine(load, runs=2))\n")
    m, why = memory.run_child(code, {})
    assert m is not None, why
    assert 60 * MIB < m["load_bytes"] < 80 * MIB
    assert 28 * MIB < m["run_bytes"] < 48 * MIB
    assert 60 * MIB < m["resident_bytes"] < 80 * MIB
    assert m["total_bytes"] >= max(m["load_bytes"], m["resident_bytes"])
    assert m["base_rss_bytes"] > MIB and m["runs"] == 2


def test_artifact_sizes_are_the_files(tmp_path):
    (tmp_path / "model.so").write_bytes(b"x" * 1000)
    (tmp_path / "model.onnx").write_bytes(b"y" * 234)
    assert memory.artifact_sizes(tmp_path, "model.so") == {
        "library_bytes": 1000, "total_bytes": 1234, "files": 2}


def test_child_result_and_failure():
    code = "from edgekit.report import memory; import json, sys; " \
           "print('noise'); memory.emit({'got': json.load(sys.stdin)['x'] * 2})"
    assert memory.run_child(code, {"x": 21}) == ({"got": 42}, "")
    got, why = memory.run_child("raise SystemExit('no such engine here')", {})
    assert got is None and why == "no such engine here"

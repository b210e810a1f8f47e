"""``runtime.set_threads`` leaves the app's CPU affinity alone and really changes the count.

Before: TVM 0.27's pool bound the calling thread to the first ``threads`` cores, so after
``set_threads(1)`` and a run the app's thread sat on core 0 and threads it started later
(torch's, onnxruntime's) inherited that one core; and the pool kept the size it was created
with, so ``set_threads(1)`` then ``set_threads(2)`` ran one thread. Each case runs in a fresh
interpreter: TVM's pools and their bindings live as long as the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# argv: artifact, the CPUs to restrict the caller to first ("" = as inherited)
PROBE = """
import json, os, sys, threading
import numpy as np
from edgekit import runtime

artifact, restrict = sys.argv[1], sys.argv[2]
if restrict:
    os.sched_setaffinity(0, {int(c) for c in restrict.split(",")})
start = sorted(os.sched_getaffinity(0))
model = runtime.load(artifact)
x = [np.ones(s["shape"], s["dtype"]) for s in model.inputs]
steps = []
for n in (1, 2, 1, 2):
    used = runtime.set_threads(n)
    model.run(*x)
    model.prepare(*x)()
    later = []  # a thread the app starts afterwards inherits the caller's affinity
    t = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
    t.start(); t.join()
    steps.append({"asked": n, "used": used, "caller": sorted(os.sched_getaffinity(0)),
                  "later": later[0]})
print(json.dumps({"start": start, "steps": steps}))
"""


def _probe(artifact, restrict: str = "", **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(artifact), restrict],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_kept(report: dict) -> None:
    for step in report["steps"]:
        assert step["used"] == min(step["asked"], len(report["start"])), step
        assert step["caller"] == report["start"], step
        assert step["later"] == report["start"], step


needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                    reason="CPU affinity is a Linux interface")


@needs_affinity
def test_caller_keeps_its_affinity_and_the_count_changes(compiled_default):
    _assert_kept(_probe(compiled_default.path))


@needs_affinity
def test_a_restricted_caller_stays_restricted(compiled_default):
    """An app started under ``taskset`` on its last CPU: TVM's binding would move it to
    core 0 (outside the set the app was given) or widen it to cores 0..n-1."""
    cpus = sorted(os.sched_getaffinity(0))
    report = _probe(compiled_default.path, str(cpus[-1]))
    assert report["start"] == [cpus[-1]]
    _assert_kept(report)  # 2 threads asked on 1 CPU: 1 used


@needs_affinity
def test_binding_asked_for_still_spares_the_caller(compiled_default):
    """``TVM_BIND_THREADS=1`` turns TVM's worker binding back on; the caller is restored."""
    _assert_kept(_probe(compiled_default.path, TVM_BIND_THREADS="1"))


def test_bad_thread_counts_are_refused():
    from edgekit import runtime

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be an integer"):
            runtime.set_threads(bad)

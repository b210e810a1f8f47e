"""Every loader runs the bytes it hashed (issue 18, Why 2: the time-of-check/time-of-use gap).

Before: ``runtime.load`` loaded the hashed bytes, but per-op timing, the device runner and the
farm's upload read ``model.so`` from the path again after the check, so a library swapped in
between ran unchecked (its constructors included). Each test swaps ``model.so`` right after
the hash check (a hook on ``runtime._check``, the one check every path goes through) for a
different real library and requires the hashed (old) bytes to be the ones that run. Real
compiles and the real runner process; the farm's case is in ``tests/test_devices_farm.py``,
beside the loopback tracker and server it needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _swap import swap_after_check
from _tiny_graphs import elementwise

from edgekit import api, per_op, runtime
from edgekit.devices import runner

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture(scope="module")
def add_and_mul(tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts of the same signature: x + 1 (kernel ``add``), x * 100 (``multiply``)."""
    d = tmp_path_factory.mktemp("toctou")
    add = api.compile(elementwise(d / "add.onnx", "Add", 1.0), "host", d / "add.edgekit").path
    mul = api.compile(elementwise(d / "mul.onnx", "Mul", 100.0), "host", d / "mul.edgekit").path
    return add, mul


@pytest.fixture
def swapped(add_and_mul, tmp_path, monkeypatch):
    """A copy of the add artifact whose model.so becomes the mul artifact's right after each
    hash check; returns (artifact, {"swaps": count})."""
    add, mul = add_and_mul
    art = Path(shutil.copytree(add, tmp_path / "add.edgekit"))
    return art, swap_after_check(monkeypatch, art, (mul / runtime.LIBRARY).read_bytes())


def test_runtime_load_runs_the_hashed_library(swapped):
    art, state = swapped
    np.testing.assert_array_equal(runtime.load(art).run(X)["y"], X + 1)
    assert state["swaps"] == 1


def test_per_op_times_the_hashed_library(swapped):
    """Before: per-op timing loaded model.so from the path again and timed ``multiply``."""
    art, state = swapped
    result = per_op.profile_per_op(art, {"x": X}, warmup=1, repeat=2)
    kernels = " ".join(str(r) for r in result["per_op"])
    assert "add" in kernels and "multiply" not in kernels, kernels
    assert state["swaps"] == 1


def test_device_runner_runs_the_hashed_library(swapped):
    """Before: the runner was handed ``artifact/model.so`` and ran x * 100."""
    if shutil.which("g++") is None:
        pytest.skip("the host runner needs g++")
    art, state = swapped
    outputs, _ = runner.invoke(art, {"x": X}, runner="native", warmup=1, repeat=2)
    np.testing.assert_array_equal(outputs["y"], X + 1)
    assert state["swaps"] == 1

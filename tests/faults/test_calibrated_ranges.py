"""Inputs outside the calibrated range warn at run time (issue 18, item 4).

Why: a fitted (polynomial) pass is only accurate inside the range it was fitted on; on real
data outside it the output can be far off or non-finite, silently. ``rewrite`` now records
each input's min/max over the real calibration samples in the ONNX metadata, ``compile``
copies it into the manifest, and the runtime warns once per input per loaded model, in one
line, when a value falls outside (NaN included); ``warn_ranges=False`` /
``--no-range-warnings`` turn it off. Real rewrite (poly-gelu), real compile, the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, runtime

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]
KEY = "edgekit.calibrated_ranges"


def _gelu_model(path: Path) -> Path:
    """y = GELU(x @ W) in the erf form exporters write, x: 1x8."""
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 3
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w"], ["h"]), n("Div", ["h", "sqrt2"], ["s"]),
             n("Erf", ["s"], ["e"]), n("Add", ["e", "one"], ["a"]), n("Mul", ["h", "a"], ["m"]),
             n("Mul", ["m", "half"], ["y"])]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8, 8], w.ravel().tolist()),
             *(helper.make_tensor(k, TensorProto.FLOAT, [], [v])
               for k, v in (("sqrt2", 2.0**0.5), ("one", 1.0), ("half", 0.5)))]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(artifact, calibration array): poly-gelu fitted on 16 samples uniform in [-2, 2]."""
    d = tmp_path_factory.mktemp("ranges")
    calib = np.random.default_rng(1).uniform(-2, 2, (16, 1, 8)).astype(np.float32)
    calib[0, 0, 0], calib[1, 0, 1] = -2.0, 2.0  # the exact bounds are in the data
    np.savez(d / "calib.npz", x=calib)
    result = api.rewrite(_gelu_model(d / "m.onnx"), "poly-gelu", calibration=d / "calib.npz",
                         out=d / "poly.onnx", strict=True)
    assert [r.status for r in result.ledger] == ["applied"]
    api.compile(d / "poly.onnx", "host", d / "poly.edgekit")
    return d / "poly.edgekit", calib


def test_rewrite_records_ranges_and_compile_copies_them(calibrated, tmp_path):
    art, calib = calibrated
    meta = {p.key: p.value for p in onnx.load(art.parent / "poly.onnx").metadata_props}
    assert json.loads(meta[KEY]) == {"x": {"min": -2.0, "max": 2.0, "samples": 16}}
    manifest = runtime.read_manifest(art)
    assert manifest["calibrated_ranges"]["x"] == {"min": -2.0, "max": 2.0, "samples": 16}
    # seeded calibration is not data: nothing recorded
    seeded = api.rewrite(_gelu_model(tmp_path / "m.onnx"), "poly-gelu", calibration="seeded")
    assert KEY not in {p.key for p in seeded.model.metadata_props}


def _run(model: runtime.CompiledModel, x: np.ndarray) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.run(x)
    return [str(w.message) for w in caught if issubclass(w.category, runtime.RangeWarning)]


def test_runtime_warns_once_per_input_outside_the_range(calibrated):
    art, calib = calibrated
    model = runtime.load(art)
    assert _run(model, calib[3]) == []  # a calibration sample: inside
    outside = calib[3].copy()
    outside[0, 2] = 5.0
    (line,) = _run(model, outside)
    assert "input 'x' has values in [" in line and "5]" in line and "[-2, 2]" in line
    assert "\n" not in line
    assert _run(model, outside * 2) == []  # once per input for the loaded model
    nan = calib[3].copy()
    nan[0, 0] = np.nan
    (line,) = _run(runtime.load(art), nan)  # a new model warns again; NaN counts as outside
    assert "has NaN" in line
    assert _run(runtime.load(art, warn_ranges=False), outside) == []


def test_cli_run_warns_in_one_line_and_can_be_silenced(calibrated, tmp_path):
    art, _ = calibrated
    np.save(tmp_path / "x.npy", np.full((1, 8), 7.0, np.float32))
    cmd = [*EDGEKIT, "run", str(art), "--input", f"x={tmp_path / 'x.npy'}",
           "-o", str(tmp_path / "y.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: input 'x' has values in [7, 7]")
    proc = subprocess.run([*cmd, "--no-range-warnings"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr

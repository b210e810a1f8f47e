"""Sizes and versions checked up front, for real (the CLI, onnx, a forged .npy header).

Why (issue 18, items 8 and 9): a 192-byte ``.npy`` declaring 1x3x64x64000000 reached
``np.load`` and a MemoryError ("internal error"); an ONNX input of 1x3x100000x100000 compiled
in full before the check's seeded inputs ran out of memory; opset 99 was refused by
onnxruntime only after a whole TVM build. Each is now one ``error:`` line within seconds.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from numpy.lib import format as npy
from onnx import TensorProto, helper

from edgekit import api, intake, runtime
from edgekit.cli import cli
from edgekit.errors import EdgekitError
from edgekit.manifest import available_memory


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _run(tmp_path: Path, npy_file: Path):
    """``edgekit run m.edgekit --input x=FILE -o y.npz`` in ``tmp_path``."""
    return _cli("run", str(tmp_path / "m.edgekit"), "--input", f"x={npy_file}",
                "-o", str(tmp_path / "y.npz"))


def _relu(path: Path, shape: list[int], opset: int = 17) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return lines[0]


def test_forged_npy_header_is_refused_before_reading(tmp_path):
    """Before: MemoryError from np.load; after: the declared size is named, nothing read."""
    model = _relu(tmp_path / "m.onnx", [1, 3, 64, 64])
    api.compile(model, "host", tmp_path / "m.edgekit")
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                        "shape": (1, 3, 64, 64000000)})
    forged = tmp_path / "x.npy"
    forged.write_bytes(header.getvalue().ljust(192, b"\0"))
    assert forged.stat().st_size == 192
    line = _one_error_line(_run(tmp_path, forged))
    assert "1x3x64x64000000 float32 (45.8 GiB)" in line and "64 bytes" in line


def test_truncated_npy_is_refused(tmp_path):
    """A real array cut short: the header's size against what the file holds."""
    full = tmp_path / "full.npy"
    np.save(full, np.ones((4, 1000), np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(full.read_bytes()[:2000])
    model = _relu(tmp_path / "m.onnx", [4, 1000])
    api.compile(model, "host", tmp_path / "m.edgekit")
    line = _one_error_line(_run(tmp_path, cut))
    assert "4x1000 float32" in line


def test_huge_onnx_input_is_refused_before_the_build(tmp_path):
    """Before: a full TVM build, then MemoryError in the check; after: the estimate against
    MemAvailable, in seconds, nothing written."""
    need = 3 * 100000 * 100000 * 4
    free = available_memory()
    if free is None or free > 2 * need:
        pytest.skip("this machine has the memory for a 1x3x100000x100000 float tensor")
    model = _relu(tmp_path / "big.onnx", [1, 3, 100000, 100000])
    start = time.monotonic()
    line = _one_error_line(_cli("compile", str(model), "-o", str(tmp_path / "big.edgekit")))
    assert time.monotonic() - start < 20
    assert "estimated" in line and "GiB" in line and "available" in line
    assert not (tmp_path / "big.edgekit").exists()
    start = time.monotonic()  # tuning runs the kernels here too: the same check first
    line = _one_error_line(_cli("tune", str(model), "--trials", "4",
                                "--tuning-db", str(tmp_path / "db")))
    assert time.monotonic() - start < 20
    assert line.startswith("error: tuning big.onnx") and "available" in line


def test_load_checks_the_recorded_memory_estimate(tmp_path):
    """The manifest records the compile-time estimate; load compares it with MemAvailable.
    Forged to need more than this machine has: one line naming both sizes, from the API and
    from ``edgekit run``, before anything is loaded."""
    api.compile(_relu(tmp_path / "m.onnx", [2, 8]), "host", tmp_path / "m.edgekit")
    manifest_path = tmp_path / "m.edgekit" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["memory"] == {"inputs": 64, "weights": 0, "activations": 64}
    runtime.load(tmp_path / "m.edgekit")  # fits
    free = available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    manifest["memory"]["activations"] = 4 * free
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match=r"needs an estimated .* GiB .* but .* "
                                                    r"is available"):
        runtime.load(tmp_path / "m.edgekit")
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    line = _one_error_line(_run(tmp_path, tmp_path / "x.npy"))
    assert "recorded at compile time" in line and "available" in line
    manifest["memory"]["activations"] = -1  # malformed: named by the schema check
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="memory must be an object"):
        runtime.load(tmp_path / "m.edgekit")


def test_memory_estimate_counts_inputs_weights_and_activations(tmp_path):
    """The estimate's parts from shape inference on a real model (weights: the Conv's)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], [0.1] * 216)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    est = intake.estimate_memory(intake.load_onnx(path))
    assert (est.inputs, est.weights, est.activations) == (1200, 864, 2 * 2048)


def test_opset_99_is_refused_before_the_build(tmp_path):
    """Before: about 30 s of TVM build, then onnxruntime's "Opset 99 is under development";
    after: refused at intake with the supported range."""
    model = _relu(tmp_path / "o.onnx", [1, 4], opset=99)
    start = time.monotonic()
    line = _one_error_line(_cli("compile", str(model), "-o", str(tmp_path / "o.edgekit")))
    assert time.monotonic() - start < 10
    newest = onnx.defs.onnx_opset_version()
    assert "opset 99" in line and f"1 to {newest}" in line
    assert not (tmp_path / "o.edgekit").exists()


def test_forged_npz_member_is_refused_before_reading(tmp_path):
    """Calibration archives get the same header check, member by member."""
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                        "shape": (1, 3, 64, 64000000)})
    forged = tmp_path / "calib.npz"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("x.npy", header.getvalue().ljust(192, b"\0"))
    with pytest.raises(EdgekitError, match=r"member x\.npy: its header declares 1x3x64x64000000"):
        api.load_calibration(forged)

"""The CLI through click's CliRunner: exit codes, one-line errors, JSON shapes, end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit import api
from edgekit.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_help_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example:" in result.output


def test_graphs_and_targets_listing():
    assert "mobile-cnn (default)" in invoke("graphs").output
    targets = json.loads(invoke("targets", "--json").output)
    names = {t["name"] for t in targets}
    assert {"host", "rpi4", "cuda-sm80", "jetson-orin"} <= names
    assert next(t for t in targets if t["name"] == "host")["runs_on_host"]


def test_usage_error_exits_2():
    result = invoke("export")
    assert result.exit_code == 2


def test_user_error_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    result = invoke("compile", str(bad), "-o", str(tmp_path / "x.edgekit"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "x.edgekit").exists()


def test_unknown_target_lists_names(add_relu_onnx, tmp_path):
    result = invoke("compile", str(add_relu_onnx), "--target", "pdp11", "-o",
                    str(tmp_path / "x.edgekit"))
    assert result.exit_code == 1 and "rpi4" in result.output


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "run", str(tmp_path / "none"), "--input",
                                      "x=x.npy", "-o", str(tmp_path / "o.npz")])
    assert result.exit_code == 1 and result.exception is not None


def test_export_compile_run_profile_flow(tiny_net_file, tmp_path):
    weights = tiny_net_file.parent / "weights.pt"
    onnx_path, art = tmp_path / "net.onnx", tmp_path / "net.edgekit"
    r = invoke("export", f"{tiny_net_file}:make", "--weights", str(weights), "-o",
               str(onnx_path))
    assert r.exit_code == 0, r.output
    r = invoke("compile", str(onnx_path), "-t", "host", "-o", str(art))
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = invoke("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "-o",
               str(tmp_path / "out.npz"))
    assert r.exit_code == 0, r.output
    (y,) = np.load(tmp_path / "out.npz").values()
    assert y.shape == (1, 4)
    r = invoke("profile", str(art), "--warmup", "1", "--repeat", "5", "--compare", "ort,torch",
               "--source", f"{tiny_net_file}:make", "--json")  # a manifest's .py is not imported
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    stats = {"min", "mean", "median", "p90", "p95", "p99", "max", "std", "cv"}
    assert set(data["latency_ms"]) == stats
    assert set(data["baselines"]) == {"ort", "torch"}
    assert all(set(v) == stats for v in data["baselines"].values())
    assert data["iterations"] == 5 and data["first_run_ms"] > 0


def test_run_rejects_wrong_input(compiled_default, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    r = invoke("run", str(compiled_default.path), "--input", f"image={tmp_path / 'x.npy'}",
               "-o", str(tmp_path / "o.npz"))
    assert r.exit_code == 1 and "expected shape (1, 3, 64, 64)" in r.output
    assert not (tmp_path / "o.npz").exists()


def test_profile_duration_and_table(compiled_default):
    r = invoke("profile", str(compiled_default.path), "--warmup", "0", "--duration", "0.2",
               "--compare", "ort")
    assert r.exit_code == 0, r.output
    assert "median" in r.output and "edgekit ÷ engine" in r.output


def test_profile_unknown_engine(compiled_default):
    r = invoke("profile", str(compiled_default.path), "--compare", "tensorrt")
    assert r.exit_code == 1 and "unknown engine 'tensorrt'" in r.output


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", "--out", str(out), "--warmup", "1", "--repeat", "5")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["profile"]["baselines"]) == {"ort", "torch"}
    assert all(c["ok"] for c in report["compile_check"]["outputs"])
    assert (out / "mobile-cnn.edgekit" / "manifest.json").is_file()


def _conv_bn_onnx(path: Path) -> Path:
    """Conv (3 -> 8 channels, 3x3, on 8x8) -> BatchNormalization."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.standard_normal((8, 3, 3, 3))), ("scale", rng.uniform(0.5, 2, 8)),
        ("bias", rng.standard_normal(8)), ("mean", rng.standard_normal(8)),
        ("var", rng.uniform(0.5, 2, 8))]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"],
                          name="bn")],
        "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_rewrite_counts_ops_and_flops_before_and_after(tmp_path):
    src = _conv_bn_onnx(tmp_path / "convbn.onnx")
    np.savez(tmp_path / "calib.npz",
             x=np.random.default_rng(1).standard_normal((4, 1, 3, 8, 8)).astype(np.float32))
    result = api.rewrite(src, "fold-bn", calibration=tmp_path / "calib.npz",
                         out=tmp_path / "api.onnx")
    assert result.ops_before == {"BatchNormalization": 1, "Conv": 1}
    assert result.ops_after == {"Conv": 1}
    assert result.flops_before == result.flops_after == 2 * (8 * 8 * 8) * (3 * 3 * 3)
    assert [n.op_type for n in onnx.load(tmp_path / "api.onnx").graph.node] == ["Conv"]
    r = invoke("rewrite", str(src), "-o", str(tmp_path / "cli.onnx"), "--passes", "fold-bn",
               "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert ((data["ops_before"], data["ops_after"], data["flops_before"], data["flops_after"])
            == (result.ops_before, result.ops_after, result.flops_before, result.flops_after))
    r = invoke("rewrite", str(src), "-o", str(tmp_path / "x.onnx"), "--passes", "fold-bn",
               "--calibration", str(tmp_path / "none.npz"))
    assert r.exit_code == 1 and "calibration file not found" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_per_op_cannot_time_on_a_device(compiled_default):
    r = invoke("profile", str(compiled_default.path), "--per-op", "--runner", "native")
    assert r.exit_code == 1
    assert r.output.strip() == ("error: --per-op times kernels in this process; it cannot be "
                                "combined with --runner or --tracker")


def test_build_runner_copies_the_binary_and_names_its_libraries(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the runner")
    out = tmp_path / "edgekit-runner"
    r = invoke("build-runner", "-o", str(out))
    assert r.exit_code == 0, r.output
    first, *rest = r.output.splitlines()
    assert first == f"runner: {out}"
    libraries = [Path(line.removeprefix("needs:  ")) for line in rest]
    assert sorted(p.name for p in libraries) == ["libtvm_ffi.so", "libtvm_runtime.so"]
    assert all(p.is_file() for p in libraries)
    assert os.access(out, os.X_OK)
    assert out.read_bytes() == api.build_runner().binary.read_bytes()  # the cached build

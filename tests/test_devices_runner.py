"""edgekit-runner: an rpi4 artifact runs its aarch64 code under qemu-user and matches
onnxruntime on the host; the same runner built for the host matches the Python runtime."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit import api, runtime, verify
from edgekit.cli import cli
from edgekit.devices import runner, toolchain
from edgekit.errors import EdgekitError
from edgekit.report import schema
from edgekit.report.stats import latency_stats

STAT_KEYS = set(latency_stats([1.0, 2.0]))


def _conv_net(path) -> None:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, two outputs (logits, softmax)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (8, 3, 3, 3)), ("b", (8,)), ("fc_w", (4, 8)), ("fc_b", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "conv_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install g++-aarch64-linux-gnu "
                    "qemu-user; .ci/run installs them)")


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "conv.onnx"
    _conv_net(path)
    return path


@pytest.fixture(scope="module")
def rpi4_artifact(conv_onnx):
    _need("aarch64-linux-gnu-g++", "qemu-aarch64")
    out = conv_onnx.with_name("conv-rpi4.edgekit")
    api.compile(conv_onnx, "rpi4", out)
    try:
        toolchain.build_runner("aarch64")
    except EdgekitError as exc:  # PyPI unreachable and no cached wheels
        pytest.skip(str(exc))
    return out


def test_rpi4_artifact_under_qemu_matches_onnxruntime(rpi4_artifact, conv_onnx):
    manifest = runtime.read_manifest(rpi4_artifact)
    assert manifest["target"]["machine"] == "aarch64"
    assert manifest["verification"].get("skipped")  # the compile could not check it here
    specs = verify.onnx_input_specs(onnx.load(conv_onnx), [])
    inputs = verify.seeded_inputs(specs, seed=3)
    outputs, report = runner.invoke(rpi4_artifact, inputs, "qemu", warmup=1, repeat=3)
    ref = verify.run_ort(onnx.load(conv_onnx), inputs)
    assert list(outputs) == ["logits", "probs"]
    for got, want in zip(outputs.values(), ref, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert report["iterations"] == 3 and set(report["latency_ms"]) == STAT_KEYS


def test_cli_profile_with_qemu_runner(rpi4_artifact):
    res = CliRunner().invoke(cli, ["profile", str(rpi4_artifact), "--runner", "qemu",
                                   "--warmup", "1", "--repeat", "4", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["target"] == "rpi4" and result["iterations"] == 4
    assert set(result["latency_ms"]) == STAT_KEYS
    assert result["runner"] == {"kind": "qemu", "arch": "aarch64"}
    assert any("emulation" in n for n in result["notes"])
    assert result["latency_ms"]["min"] > 0 and result["first_run_ms"] > 0
    assert schema.validate(result) == []  # the same run format as a local profile


def test_wrong_runner_or_compare_fails_in_one_line(rpi4_artifact):
    res = CliRunner().invoke(cli, ["profile", str(rpi4_artifact), "--runner", "native"])
    assert res.exit_code == 1
    assert "built for 'rpi4' (aarch64)" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["profile", str(rpi4_artifact), "--runner", "qemu",
                                   "--compare", "ort"])
    assert res.exit_code == 1 and "--compare" in res.output
    with pytest.raises(runtime.ArtifactError, match=r"built for 'rpi4' \(aarch64\)"):
        runtime.load(rpi4_artifact)


def test_host_runner_matches_python_runtime(compiled_default):
    """The C++ embedding example: the runner built for this machine."""
    art = compiled_default.path
    model = runtime.load(art)
    specs = [verify.TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in model.inputs]
    inputs = verify.seeded_inputs(specs, seed=1)
    outputs, report = runner.invoke(art, inputs, "native", warmup=0, repeat=2, threads=1)
    want = model.run(inputs)
    assert report["threads"] == 1
    for name, got in outputs.items():
        np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-6)


def test_host_runner_help_prints_usage():
    binary, _ = toolchain.build_runner("host")
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: edgekit-runner")
    assert "--dim N=LO..HI" in result.stdout
    bad = subprocess.run([str(binary), "model.so", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: edgekit-runner")

"""The runtime's checks of symbolic inputs (issue 17 item 4), on a real compiled library: the
add-relu artifact with its manifest declaring a symbolic length ``n`` (1..4), so the checks
``runtime.run`` makes before the VM are seen without the symbolic compiler. The VM itself is
reached only at n = 4, the length the library was compiled for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit import api, runtime
from edgekit.errors import EdgekitError


@pytest.fixture(scope="module")
def artifact(add_relu_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("varlen") / "m.edgekit"
    api.compile(add_relu_onnx, "host", out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["inputs"][0]["shape"] = [1, "n"]
    manifest["dims"] = {"n": [1, 4]}
    manifest_path.write_text(json.dumps(manifest))  # the files' digests are unchanged
    return out


def test_a_length_in_bounds_runs(artifact):
    x = np.array([[1.0, 2.0, -3.0, 4.0]], np.float32)
    out = runtime.load(artifact).run(x=x)["y"]
    np.testing.assert_allclose(out, np.maximum(x + [0.5, -1.0, 2.0, -3.0], 0))


@pytest.mark.parametrize("shape,dtype,why", [
    ((1, 5), "float32", r"input 'x': dim 'n' \(axis 1\) is 5, outside its bounds 1\.\.4"),
    ((4,), "float32", r"input 'x' has rank 1, the model expects rank 2 \(1xn\)"),
    ((2, 3), "float32", r"input 'x' has shape 2x3, the model expects 1xn \(axis 0\)"),
    ((1, 3), "float64", r"input 'x': expected dtype float32, got float64"),
])
def test_rank_dtype_and_bounds_are_one_clear_error(artifact, shape, dtype, why):
    model = runtime.load(artifact)
    with pytest.raises(ValueError, match=why):
        model.run(x=np.zeros(shape, dtype))
    with pytest.raises(EdgekitError, match=why):
        api.run(artifact, {"x": np.zeros(shape, dtype)})


def test_a_manifest_without_the_bounds_is_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "m.edgekit"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["dims"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="inputs use the dim 'n', which dims does "
                                                    "not bound"):
        runtime.load(copy)


def test_profile_lengths_need_a_symbolic_dim_and_stay_in_bounds(artifact, add_relu_onnx,
                                                                tmp_path):
    with pytest.raises(EdgekitError, match=r"--lengths 9: outside the bounds of 'n', 1\.\.4"):
        api.profile(artifact, lengths=[4, 9], memory=False, repeat=3, warmup=1)
    static = tmp_path / "s.edgekit"
    api.compile(add_relu_onnx, "host", static)
    with pytest.raises(EdgekitError, match="this one has static inputs"):
        api.profile(static, lengths=[4], memory=False, repeat=3, warmup=1)
    result = api.profile(artifact, lengths=[4], compare=["ort"], memory=False, repeat=5,
                         warmup=1)
    (row,) = result["lengths"]
    assert row["lengths"] == {"n": 4} and set(row["baselines"]) == {"ort"}
    assert row["latency_ms"]["median"] > 0 and row["ratios"]["ort"] > 0


def test_the_cpp_runner_checks_lengths_against_the_bounds(artifact, tmp_path):
    import subprocess

    from edgekit.devices import runner, toolchain

    outputs, _ = runner.invoke(artifact, {"x": np.ones((1, 4), np.float32)}, "native",
                               warmup=0, repeat=1)  # runner.py passes --shape/--dim
    np.testing.assert_allclose(outputs["y"], np.maximum(1 + np.array([[0.5, -1, 2, -3]]), 0))
    with pytest.raises(EdgekitError, match=r"dim 'n' \(axis 1\) is 6, outside its bounds"):
        runner.invoke(artifact, {"x": np.ones((1, 6), np.float32)}, "native")
    # the binary itself, as on a device without Python: the .npy defines the length
    binary, _ = toolchain.build_runner("host")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    run = subprocess.run([str(binary), str(artifact / "model.so"), "--shape", "0=1xn",
                          "--dim", "n=1..3", "--repeat", "1", str(tmp_path / "x.npy")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == ("error: input 0: dim 'n' (axis 1) is 4, outside its bounds "
                                  "1..3")


def test_profile_times_the_users_arrays_at_their_length(artifact):
    result = api.profile(artifact, inputs={"x": np.ones((1, 4), np.float32)}, memory=False,
                         repeat=3, warmup=1)
    assert [r["lengths"] for r in result["lengths"]] == [{"n": 4}]
    with pytest.raises(EdgekitError, match=r"dim 'n' \(axis 1\) is 7, outside its bounds"):
        api.profile(artifact, inputs={"x": np.ones((1, 7), np.float32)}, memory=False)
    with pytest.raises(EdgekitError, match="missing input 'x'"):
        api.profile(artifact, inputs={}, memory=False)
